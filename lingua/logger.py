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
    _STATE["rank"], _STATE["formatter"] = rank, fmt
    if log_file:
        add_log_file(log_file)


_STATE: dict = {"rank": 0, "formatter": None}


class _FileHandler(logging.FileHandler):
    """A log file that never disturbs the run: when a write fails (a full disk), one line says so on stderr and
    the file is dropped, instead of logging's '--- Logging error ---' traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger().removeHandler(self)
        sys.stderr.write(f"log file {self.baseFilename} is not writable any more (disk full?); "
                         "logging to the console only\n")


def add_log_file(path: str) -> None:
    """Rank 0 also logs to `path` (appended across restarts)."""
    if _STATE["rank"] != 0:
        return
    handler = _FileHandler(path, mode="a")
    handler.setFormatter(_STATE["formatter"] or _Formatter(0))
    logging.getLogger().addHandler(handler)
