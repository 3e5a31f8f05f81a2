"""When the Triton backend says it can run, and what it says when it cannot.

These tests run on every machine (the kernel tests in test_selective_scan_triton.py skip where the backend is
unavailable): CUDA, the TRITON_INTERPRET variable and the ``triton`` import are all faked.
"""
import pytest
import torch

from classification.ops import selective_scan_triton

INTERPRET_ENV = "TRITON_INTERPRET"
# Placeholder for the imported triton package: is_available() and unavailable_reason() only test it against None.
FAKE_TRITON = object()
NOT_INSTALLED_ERROR = ModuleNotFoundError("No module named 'triton'", name="triton")
NOT_INSTALLED = ("triton is not installed", "pip install -r requirements.txt")
BROKEN_ERROR = RuntimeError("built for another torch")  # e.g. a triton for another torch failing at import
BROKEN = ("triton fails to import (RuntimeError: built for another torch)", "pip install -r requirements.txt")
NO_DEVICE = ("needs a CUDA device", "TRITON_INTERPRET=1")


@pytest.mark.parametrize(
    "installed, cuda, interpret, reason_phrases",
    [
        (True, True, None, None),  # a GPU
        (True, False, "1", None),  # the interpreter on the CPU
        (True, True, "1", None),
        (True, False, None, NO_DEVICE),  # neither
        (True, False, "0", NO_DEVICE),  # only "1" turns the interpreter on
        (NOT_INSTALLED_ERROR, True, "1", NOT_INSTALLED),  # no triton: nothing else helps
        (NOT_INSTALLED_ERROR, False, None, NOT_INSTALLED),
        (BROKEN_ERROR, True, None, BROKEN),
    ],
)
def test_availability_and_reason(monkeypatch, installed, cuda, interpret, reason_phrases):
    """``installed`` True, or the error importing triton raised; ``reason_phrases`` None: available, otherwise the
    phrases the unavailable reason must contain."""
    monkeypatch.setattr(selective_scan_triton, "triton", FAKE_TRITON if installed is True else None)
    monkeypatch.setattr(selective_scan_triton, "_IMPORT_ERROR", None if installed is True else installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if interpret is None:
        monkeypatch.delenv(INTERPRET_ENV, raising=False)
    else:
        monkeypatch.setenv(INTERPRET_ENV, interpret)
    assert selective_scan_triton.is_available() is (reason_phrases is None)
    if reason_phrases is not None:
        reason = selective_scan_triton.unavailable_reason()
        assert all(phrase in reason for phrase in reason_phrases), reason
        others = {NO_DEVICE[0], NOT_INSTALLED[0], BROKEN[0]} - {reason_phrases[0]}
        assert not any(phrase in reason for phrase in others), reason


def test_scan_without_triton_raises_the_install_hint(monkeypatch):
    monkeypatch.setattr(selective_scan_triton, "triton", None)
    monkeypatch.setattr(selective_scan_triton, "_IMPORT_ERROR", NOT_INSTALLED_ERROR)
    u = torch.zeros(1, 1, 1)
    A, B = torch.zeros(1, 1), torch.zeros(1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r"backend 'triton' is unavailable: triton is not installed"):
        selective_scan_triton.scan(u, u, A, B, B, None, None, delta_softplus=False)
