"""Ops shared by the model families. Every op comes with a plain-PyTorch ``*_ref`` twin of the same signature."""

from .deformable import bilinear_sample, bilinear_sample_ref
from .deformable import sort_tokens_straight_through, sort_tokens_straight_through_ref, unsort_tokens, unsort_tokens_ref
from .selective_scan import available_backends, resolve_backend, selective_scan_fn, selective_scan_ref
from . import custom_ops  # registers torch.ops.defmamba.selective_scan, which a saved torch.export program calls
