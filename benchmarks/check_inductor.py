"""torch.compile with the default (inductor) backend on tiny DefMamba and DAMamba, against eager, in one run.

For each model: compile time and the largest logit difference (eval mode), then compile time of the training graph
and the relative error of the input gradient against eager, in float32 and in float64 (float64 tells rounding apart
from a wrong gradient). Too slow for the test suite (the suite checks the ``aot_eager`` backend and the scan op under
inductor, ``tests/test_compile.py``); run by hand::

    .venv/bin/python benchmarks/check_inductor.py
"""
import argparse
import logging
import time

import torch

from _common import parse_args
from classification.models import create_model

logger = logging.getLogger("check_inductor")

NUM_CLASSES = 5
BATCH, IMG_SIZE = 2, 32
TINY = {
    "defmamba_tiny": dict(embed_dim=8, depths=(1, 1, 1, 1)),
    "damamba_tiny": dict(dims=(16, 16, 16, 16), depths=(1, 1, 1, 1), head_dim=8),
}


def _input_grad(forward, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    forward(x).square().sum().backward()
    return x.grad


def check(name: str, dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, drop_path_rate=0.0, scan_backend="auto", **TINY[name])
    model = model.to(dtype).eval()
    x = torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE, dtype=dtype)
    with torch.no_grad():
        start = time.perf_counter()
        compiled_logits = torch.compile(model, fullgraph=True)(x)
        eval_seconds = time.perf_counter() - start
        logit_diff = (compiled_logits - model(x)).abs().max().item()
    model.train()
    start = time.perf_counter()
    compiled_grad = _input_grad(torch.compile(model, fullgraph=True), x)
    train_seconds = time.perf_counter() - start
    grad = _input_grad(model, x)
    grad_error = ((compiled_grad - grad).norm() / grad.norm()).item()
    logger.info("%s %s: eval compile+run %.1f s, max |logit diff| %.3g; train compile+step %.1f s, input-gradient "
                "relative error %.3g", name, str(dtype).removeprefix("torch."), eval_seconds, logit_diff,
                train_seconds, grad_error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parse_args(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())
    for name in TINY:
        for dtype in (torch.float32, torch.float64):
            check(name, dtype)


if __name__ == "__main__":
    main()
