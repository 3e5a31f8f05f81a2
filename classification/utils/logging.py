"""Logging set-up: rank 0 logs INFO to the console and to a file; other ranks log warnings and errors only."""
import logging
import sys
from pathlib import Path

LOG_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d) %(levelname)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup_logging(output_dir: str | Path | None, rank: int, log_name: str) -> logging.Logger:
    """Configures the root logger once per process.

    Args:
        output_dir: Folder of the text log (rank 0 only); None logs to the console only.
        rank: Global rank of this process.
        log_name: File name of the text log in ``output_dir`` (appended to).

    Returns:
        The root logger.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()  # a FileHandler of an earlier call (main() run again in-process) would keep its file open
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    formatter = logging.Formatter(LOG_FORMAT if rank == 0 else f"[rank {rank}] {LOG_FORMAT}", DATE_FORMAT)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    root.addHandler(console)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(output_dir) / log_name, mode="a")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    return root
