"""The backend report (`python -m classification.ops`): what it says matches what the dispatcher does."""
import subprocess
import sys

import torch

from classification.ops import available_backends, report, resolve_backend
from classification.ops.report import backend_report


def test_report_names_versions_and_the_auto_choice():
    lines = backend_report()
    assert lines[0].startswith("python ") and f"torch {torch.__version__}" in lines[0]
    assert f"cpu: backend='auto' uses {resolve_backend('auto', 'cpu')!r}" in lines
    for name in available_backends("cpu"):
        assert any(line.split() == ["cpu", "backend", name, "available"] for line in lines), name
    if "cpu" not in available_backends("cpu"):
        assert any("CPU kernel not built" in line and "make kernels-cpu" in line for line in lines)


def test_module_entry_point_prints_the_report():
    result = subprocess.run([sys.executable, "-m", "classification.ops"], capture_output=True, text=True, check=True)
    assert f"cpu: backend='auto' uses {resolve_backend('auto', 'cpu')!r}" in result.stdout


def test_cuda_not_built_line_gives_the_architecture_of_this_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(report, "kernel_module", lambda name: None)
    line = report._cuda_extension_arch_status(torch.device("cuda", 0))
    assert line.startswith("not built; build it with: ") and "TORCH_CUDA_ARCH_LIST='8.6' " in line
    assert line.endswith("pip install --no-build-isolation ./kernels/selective_scan")
