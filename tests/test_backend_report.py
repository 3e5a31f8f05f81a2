"""The backend report (`python -m classification.ops`): what it says matches what the dispatcher does."""
import os
import subprocess
import sys

import torch

from classification.ops import available_backends, report, resolve_backend
from classification.ops.report import backend_report
from conftest import REPO


def test_report_names_versions_and_the_auto_choice():
    lines = backend_report()
    assert lines[0].startswith("python ") and f"torch {torch.__version__}" in lines[0]
    assert f"cpu: backend='auto' uses {resolve_backend('auto', 'cpu')!r}" in lines
    for name in available_backends("cpu"):
        assert any(line.split() == ["cpu", "backend", name, "available"] for line in lines), name
    if "cpu" not in available_backends("cpu"):
        assert any("CPU kernel not built" in line and "make kernels-cpu" in line for line in lines)
    else:
        from defmamba_scan_cpu import isa

        assert f"CPU kernel: {isa()} build (picked for this CPU at run time)" in lines


def test_module_entry_point_prints_the_report():
    result = subprocess.run([sys.executable, "-m", "classification.ops"], capture_output=True, text=True, check=True)
    assert f"cpu: backend='auto' uses {resolve_backend('auto', 'cpu')!r}" in result.stdout


def test_cuda_not_built_line_gives_the_architecture_of_this_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(report, "kernel_module", lambda name: None)
    line = report._cuda_extension_arch_status(torch.device("cuda", 0))
    assert line.startswith("not built; build it with: ") and "TORCH_CUDA_ARCH_LIST='8.6' " in line
    assert line.endswith("pip install --no-build-isolation ./kernels/selective_scan")


def test_a_triton_that_fails_at_import_leaves_the_other_backends_working(tmp_path):
    """A triton installed but broken (here raising RuntimeError at import, as a build for another torch may): the
    report and the backend's reason name the error; `import classification.ops` and the CPU backends still work."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('built for another torch')\n")
    script = (
        "import torch\n"
        "from classification.ops import selective_scan_fn, selective_scan_ref\n"
        "from classification.ops.report import backend_report\n"
        "from classification.ops.selective_scan import backend_unavailable_reason\n"
        "print('\\n'.join(backend_report()))\n"
        "print('reason:', backend_unavailable_reason('triton', torch.device('cpu')))\n"
        "args = [torch.rand(1, 2, 5), torch.rand(1, 2, 5), -torch.rand(2, 3), torch.rand(1, 1, 3, 5),\n"
        "        torch.rand(1, 1, 3, 5)]\n"
        "print('max diff:', (selective_scan_fn(*args) - selective_scan_ref(*args)).abs().max().item())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "triton fails to import (RuntimeError: built for another torch)" in lines[0]
    reason = next(line for line in lines if line.startswith("reason: "))
    assert "unavailable: triton fails to import (RuntimeError: built for another torch)" in reason
    assert float(next(line for line in lines if line.startswith("max diff: ")).split()[-1]) < 1e-5
