"""torch.compile (fullgraph, no graph breaks) and torch.export of whole models: eager logits and gradients.

The selective scan is the custom op ``defmamba::selective_scan`` under the compiler; the deformable ops are aten ops.
"""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from classification.models.registry import create_model
from classification.ops import custom_ops, selective_scan_fn, selective_scan_ref
from scan_cases import CASES, make_inputs

REPO = Path(__file__).resolve().parents[1]
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


def test_fullgraph_compile_with_gradient_checkpointing_gives_the_eager_results_and_batchnorm_statistics():
    """DAMamba (the family with BatchNorm), checkpointed and compiled: the logits, gradients and running statistics of
    the eager model without checkpointing (the compiler recomputes in its backward graph, updating no buffer)."""
    torch._dynamo.reset()
    model = _model("damamba_tiny", "torch").train()
    eager = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    x = torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE)
    compiled_logits, compiled_grads = _logits_and_grads(model, torch.compile(model, fullgraph=True,
                                                                             backend="aot_eager"), x)
    logits, grads = _logits_and_grads(eager, eager, x)
    torch.testing.assert_close(compiled_logits, logits, rtol=RTOL, atol=ATOL)
    for param_name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[param_name], grad, rtol=RTOL, atol=RTOL * grad.abs().max().item(),
                                   msg=param_name)
    eager_buffers = dict(eager.named_buffers())
    assert any(name.endswith("num_batches_tracked") for name in eager_buffers)
    for buffer_name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, eager_buffers[buffer_name], rtol=RTOL, atol=ATOL, msg=buffer_name)


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


def test_damamba_exports_with_dynamic_height_and_width_and_loads_in_a_fresh_process(tmp_path):
    """One exported DAMamba takes any input size from 33 pixels on (a backbone for dense prediction), saved and loaded
    where only the package is imported (which registers the scan op the program calls)."""
    model = _model("damamba_tiny", "auto").eval()
    dynamic = {"x": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    torch.export.save(torch.export.export(model, (torch.randn(BATCH, 3, 40, 48),), dynamic_shapes=dynamic),
                      tmp_path / "damamba.pt2")
    other = torch.randn(BATCH, 3, 56, 36)  # another height and width than traced
    with torch.no_grad():
        torch.save({"input": other, "logits": model(other)}, tmp_path / "expected.pt")
    script = (
        "import sys, torch, classification.models\n"
        "program = torch.export.load(sys.argv[1])\n"
        "expected = torch.load(sys.argv[2])\n"
        f"torch.testing.assert_close(program.module()(expected['input']), expected['logits'], rtol={RTOL}, "
        f"atol={ATOL})\n"
    )
    files = [str(tmp_path / "damamba.pt2"), str(tmp_path / "expected.pt")]
    result = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


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


@pytest.mark.parametrize("dtypes, expected", [
    ((torch.float16, torch.float16), torch.float32),  # half inputs are computed in float32
    ((torch.bfloat16, torch.float32), torch.float32),  # autocast: half projections, float32 parameters
    ((torch.float32, torch.float64), torch.float64),  # promoted
], ids=["fp16", "bf16-with-fp32-weights", "fp32-with-fp64-weights"])
def test_fake_scan_gives_the_eager_output_dtype(dtypes, expected):
    """The fake implementation (what the compiler plans with) promises y's dtype: the eager one."""
    sequence_dtype, weight_dtype = dtypes
    inputs = make_inputs(CASES[1], torch.float64)
    inputs = {name: None if t is None else t.detach().to(weight_dtype if name in ("A", "D", "delta_bias")
                                                          else sequence_dtype) for name, t in inputs.items()}
    assert selective_scan_fn(**inputs, delta_softplus=True, backend="torch").dtype == expected
    with FakeTensorMode() as mode:
        fake = [None if t is None else mode.from_tensor(t) for t in inputs.values()]
        y = torch.ops.defmamba.selective_scan(*fake, True, "torch")
    assert y.dtype == expected and y.shape == inputs["u"].shape


def test_fake_scan_checks_the_inputs_at_trace_time():
    inputs = {name: None if t is None else t.detach() for name, t in make_inputs(CASES[0], torch.float32).items()}
    inputs["delta"] = inputs["delta"][..., 1:]
    with FakeTensorMode() as mode:
        fake = [None if t is None else mode.from_tensor(t) for t in inputs.values()]
        with pytest.raises(ValueError, match=r"delta: got shape \(2, 6, 96\), need \(2, 6, 97\)"):
            torch.ops.defmamba.selective_scan(*fake, True, "torch")


def test_backward_op_gives_zeros_for_the_gradients_not_asked_for():
    """The opaque backward op: wanted gradients are ref's (float64), the others zeros of their input's shape, and an
    absent D or delta_bias an empty tensor."""
    case = CASES[3]  # no D, no delta_bias
    inputs = make_inputs(case, torch.float64)
    grad_y = torch.randn_like(inputs["u"])
    needs_grad = [True, False, True, False, True, False, False]  # u, A, C
    torch.full((4096,), float("nan"), dtype=torch.float64)  # leave freed memory that is not zero
    grads = custom_ops.selective_scan_backward(grad_y, *inputs.values(), case.softplus, "torch", needs_grad)
    leaves = [inputs[name] for name in ("u", "A", "C")]
    expected = dict(zip(("u", "A", "C"), torch.autograd.grad(
        selective_scan_ref(**inputs, delta_softplus=case.softplus), leaves, grad_y)))
    for (name, t), grad in zip(inputs.items(), grads):
        if t is None:
            assert grad.numel() == 0, name
        elif name in expected:
            torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
        else:
            assert grad.shape == t.shape and torch.equal(grad, torch.zeros_like(t)), name
