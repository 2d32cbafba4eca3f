"""A quiet command: everything the process writes goes to the run's log.txt, except what it shows.

Why file descriptors and not ``sys.stdout``: in a simulation output comes from everywhere.
Logging handlers made at import time (Flower's, Hydra's, Ray's) hold the ``sys.stderr`` or
``sys.stdout`` object; Ray's driver thread prints each site's (actor's) output with
``print`` to whatever ``sys.stdout``/``sys.stderr`` are at that moment; warnings, C
extensions and the processes Ray starts write to descriptors 1 and 2 directly or inherit
them.  Pointing descriptors 1 and 2 at the log file catches all of it, whichever thread or
process writes, while ``sys.stdout`` and ``sys.stderr`` stay the objects every library
already holds.  What the command means to show goes explicitly to the console it is
handed: a duplicate of the original stdout.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

LOG_FILE = "log.txt"


def _flush_std_streams() -> None:
    """Flush what is buffered for descriptors 1 and 2: the current streams and the interpreter's own."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()


def _set_line_buffering(enabled: bool) -> bool:
    """Line-buffer the interpreter's stdout (block-buffered off a terminal); returns the old setting.

    Otherwise stdout's lines reach the log in late blocks, out of order with stderr's.
    """
    stream = sys.__stdout__
    before = bool(getattr(stream, "line_buffering", False))
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=enabled)
    return before


@contextmanager
def output_to_log(log_path: Path) -> Iterator[TextIO]:
    """Send descriptors 1 and 2 to ``log_path`` (appended) for the block; yield the console.

    The console is line-buffered so a row shows when it is written.  On exit, normal or
    not, the descriptors are restored first, so an error raised from the block reaches
    the real stderr.  Child processes started inside the block keep writing to the log
    for as long as they live.
    """
    _flush_std_streams()
    saved_out, saved_err = os.dup(1), os.dup(2)
    encoding = getattr(sys.__stdout__, "encoding", None) or "utf-8"
    console = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding=encoding, errors="replace")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    line_buffered = _set_line_buffering(True)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield console
    finally:
        _flush_std_streams()
        console.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (log_fd, saved_out, saved_err):
            os.close(fd)
        console.close()
        _set_line_buffering(line_buffered)


class HeldRecords(logging.Handler):
    """Log records kept back until the run's log exists, then handled as if logged now."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        """Hand each kept record to the root logger's handlers as they are now (e.g. into log.txt)."""
        for record in self.records:
            logging.getLogger().handle(record)
        self.records.clear()


@contextmanager
def hold_log_records() -> Iterator[HeldRecords]:
    """Keep back what the root logger's handlers would print inside the block.

    Libraries log at import time (bitsandbytes warns about an optional CPU kernel package
    it cannot find), before a quiet command knows its run directory; their lines belong
    in log.txt with everything else, not on the console above the run's summary.
    """
    root = logging.getLogger()
    held, saved = HeldRecords(), list(root.handlers)
    for handler in saved:
        root.removeHandler(handler)
    root.addHandler(held)
    try:
        yield held
    finally:
        root.removeHandler(held)
        for handler in saved:
            root.addHandler(handler)
