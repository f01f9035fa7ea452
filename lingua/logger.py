"""Console + file logging with the rank and elapsed time on every line."""

import logging
import os
import sys
import time

_START = time.time()


class _Formatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        elapsed = record.created - _START
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{record.levelname[0]} {stamp} {elapsed:8.1f}s r{self.rank} {record.name}: {msg}"


def init_logger(rank: int = 0, log_file: str = None, level: str = None) -> None:
    """Every rank logs warnings to stderr; rank 0 logs info to stdout and, if given, to log_file."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = level or os.environ.get("LINGUA_LOG_LEVEL", "INFO")
    root.setLevel(level)
    fmt = _Formatter(rank)
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setLevel(level if rank == 0 else "WARNING")
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file and rank == 0:
        file_handler = logging.FileHandler(log_file, mode="a")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
