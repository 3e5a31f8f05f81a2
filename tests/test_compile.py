"""torch.compile (fullgraph, no graph breaks) and torch.export of whole models: eager logits and gradients.

The selective scan is the custom op ``defmamba::selective_scan`` under the compiler; the deformable ops are aten ops.
"""
import pytest
import torch

from classification.models.registry import create_model
from classification.ops import custom_ops, selective_scan_fn
from scan_cases import CASES, make_inputs

NUM_CLASSES = 5
BATCH, IMG_SIZE = 2, 32
TINY = {
    "defmamba_tiny": dict(embed_dim=8, depths=(1, 1, 1, 1)),
    "damamba_tiny": dict(dims=(16, 16, 16, 16), depths=(1, 1, 1, 1), head_dim=8),
}
# float32, same ops in the same order: the compiled graph differs from eager by rounding of fused reductions only.
RTOL, ATOL = 1e-5, 1e-6


def _model(name: str, backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, drop_path_rate=0.0, scan_backend=backend, **TINY[name])


def _logits_and_grads(model: torch.nn.Module, forward, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits of ``forward(x)`` (the model or its compiled twin) and the gradients it leaves on ``model``."""
    model.zero_grad(set_to_none=True)
    logits = forward(x)
    logits.square().sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name, backend", [("defmamba_tiny", "torch"), ("defmamba_tiny", "auto"),
                                           ("damamba_tiny", "torch")])
def test_fullgraph_compile_gives_the_eager_logits_and_gradients(name, backend):
    torch._dynamo.reset()
    model = _model(name, backend).train()
    x = torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE)
    # fullgraph=True raises on any graph break; aot_eager traces forward and backward through AOTAutograd.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled_logits, compiled_grads = _logits_and_grads(model, compiled, x)
    logits, grads = _logits_and_grads(model, model, x)
    torch.testing.assert_close(compiled_logits, logits, rtol=RTOL, atol=ATOL)
    assert all(g is not None for g in grads.values())
    for param_name, grad in grads.items():
        # Relative to each gradient's own scale: in this tiny model some (dt_proj, dt_bias) are ~1e-10.
        torch.testing.assert_close(compiled_grads[param_name], grad, rtol=RTOL, atol=RTOL * grad.abs().max().item(),
                                   msg=param_name)


@pytest.mark.parametrize("name", TINY)
def test_export_captures_the_scan_as_one_op_and_round_trips(name):
    model = _model(name, "auto").eval()
    x = torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE)
    exported = torch.export.export(model, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.defmamba.selective_scan.default in targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=RTOL, atol=ATOL)
        other = torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE)  # a different input: nothing was baked in
        torch.testing.assert_close(exported.module()(other), model(other), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=lambda case: case.id)
def test_custom_op_passes_opcheck(case):
    """Schema, fake (meta) implementation against the real one, autograd registration, AOT dispatch."""
    inputs = make_inputs(case, torch.float32)
    args = (*inputs.values(), case.softplus, "torch")
    torch.library.opcheck(custom_ops.selective_scan, args)


@pytest.mark.parametrize("case", [CASES[4], CASES[6]], ids=lambda case: case.id)
def test_backward_op_passes_opcheck_on_strided_inputs(case):
    """The backward op's fake outputs have the real outputs' strides, also for inputs that are views."""
    inputs = make_inputs(case, torch.float32)
    grad_y = torch.randn_like(inputs["u"])
    needs_grad = [t is not None for t in inputs.values()]
    args = (grad_y, *inputs.values(), case.softplus, "torch", needs_grad)
    # No aot_dispatch checks: the backward op has no autograd of its own (double backward is not supported).
    torch.library.opcheck(custom_ops.selective_scan_backward, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("compiler, backend", [("aot_eager", "ref"), ("aot_eager", "torch"), ("aot_eager", "auto"),
                                               ("inductor", "torch")])
@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=lambda case: case.id)
def test_compiled_scan_gives_every_eager_gradient(case, compiler, backend):
    """All seven gradients through the custom op equal eager's (also with flat (batch, N, L) B/C, strided views, and
    the ``ref`` backend, whose ops all run inside the op's recompute); inductor also checks the fake strides."""
    torch._dynamo.reset()

    def scan(inputs: dict) -> torch.Tensor:
        return selective_scan_fn(**inputs, delta_softplus=case.softplus, backend=backend)

    compiled_inputs, inputs = make_inputs(case, torch.float32), make_inputs(case, torch.float32)
    compiled_y = torch.compile(scan, fullgraph=True, backend=compiler)(compiled_inputs)
    y = scan(inputs)
    (compiled_y.square().sum() + y.square().sum()).backward()
    torch.testing.assert_close(compiled_y, y, rtol=RTOL, atol=ATOL)
    for name, t in inputs.items():
        if t is not None:
            assert t.grad.abs().max() > 0, name
            scale = t.grad.abs().max().item()
            torch.testing.assert_close(compiled_inputs[name].grad, t.grad, rtol=RTOL, atol=RTOL * scale, msg=name)
