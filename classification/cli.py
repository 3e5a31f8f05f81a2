"""What the command-line tools share: exit status 2 for a mistake in what the user gave (as in ``main.py``), and the
``--scan-backend`` option."""
import argparse
import sys
from typing import Callable

import torch

from classification.config import SCAN_BACKENDS
from classification.ops import resolve_backend

USAGE_ERROR_STATUS = 2  # argparse's status for a bad argument, and main.py's for a bad config, dataset or checkpoint


def run_tool(main: Callable[[], object]) -> None:
    """Runs a tool's ``main``; its ``SystemExit(message)`` (a usage error, which Python would end with status 1) prints
    the message and exits with :data:`USAGE_ERROR_STATUS`. Numeric exits (argparse's, ``--help``) pass through."""
    try:
        main()
    except SystemExit as exit_request:
        if not isinstance(exit_request.code, str):
            raise
        sys.stderr.write(f"{exit_request.code}\n")
        sys.exit(USAGE_ERROR_STATUS)


def add_scan_backend_option(parser: argparse.ArgumentParser) -> None:
    """``--scan-backend``, which replaces a config's MODEL.SCAN_BACKEND: a run's config may name a backend of the
    machine it trained on, and what a tool computes does not depend on the backend (only how fast)."""
    parser.add_argument("--scan-backend", choices=SCAN_BACKENDS, default="auto",
                        help="selective-scan backend, replacing the config's MODEL.SCAN_BACKEND (default: auto, the "
                             "fastest this machine runs)")


def check_scan_backend(parser: argparse.ArgumentParser, backend: str, device: torch.device) -> None:
    """A usage error (argparse's, status 2) when ``backend`` cannot run on ``device``, with the reason."""
    try:
        resolve_backend(backend, device)
    except RuntimeError as err:
        parser.error(f"--scan-backend {backend}: {err}")
