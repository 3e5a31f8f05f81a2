"""Exit statuses of the command-line tools: a mistake in what the user gave ends with status 2, as in ``main.py``."""
import sys
from typing import Callable

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
