"""What a user needs to know about the selective-scan backends before a long run.

``python -m classification.ops`` prints :func:`backend_report`; ``main.py`` logs the same lines at start.
"""
import platform

import torch

from . import selective_scan_cpu, selective_scan_cuda, selective_scan_triton
from .selective_scan import AUTO_ORDER, BACKENDS, backend_unavailable_reason, kernel_module, resolve_backend


def _cuda_extension_arch_status(device: torch.device) -> str:
    """Whether the CUDA extension runs on ``device``: a one-element scan, which fails without a kernel image for it."""
    major, minor = torch.cuda.get_device_capability(device)
    build = selective_scan_cuda.build_command(f"{major}.{minor}")
    if kernel_module("cuda") is None or not kernel_module("cuda").is_available():
        return f"not built; build it with: {build}"
    probe = torch.ones(1, 1, 1, device=device)
    try:
        kernel_module("cuda").scan(probe, probe, -probe[0], probe[:, None], probe[:, None], None, None, False)
        torch.cuda.synchronize(device)
    except RuntimeError as error:
        return f"built, but NOT for this GPU (sm_{major}{minor}): {error}; rebuild with {build}"
    return f"built, runs on this GPU (sm_{major}{minor})"


def backend_report() -> list[str]:
    """Versions, devices, and for each device type the available backends and what ``backend='auto'`` picks."""
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"triton {selective_scan_triton.installed_version()}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
        lines.append(f"GPU: {torch.cuda.get_device_name(devices[-1])}")
    else:
        lines.append("GPU: none visible to torch")
    for device in devices:
        for name in BACKENDS:
            reason = backend_unavailable_reason(name, device)
            if name in AUTO_ORDER.get(device.type, ()) or reason is None:
                lines.append(f"  {device.type:4s} backend {name:7s} {'available' if reason is None else reason}")
        lines.append(f"{device.type}: backend='auto' uses {resolve_backend('auto', device)!r}")
    if backend_unavailable_reason("cpu", torch.device("cpu")) is not None:
        lines.append("CPU kernel not built (the 'torch' backend is slower); build it with "
                     f"{selective_scan_cpu.BUILD_COMMAND}")
    else:
        lines.append(f"CPU kernel: {selective_scan_cpu.instruction_set()} build (picked for this CPU at run time)")
    if torch.cuda.is_available():
        lines.append(f"CUDA extension: {_cuda_extension_arch_status(devices[-1])}")
    return lines
