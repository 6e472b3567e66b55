"""What a person at the terminal sees: pcd-ray's own progress and results; everything else goes to a log file.

A stage's run prints through several libraries that each write to the process's stdout and stderr: Ray's Python
loggers, its C++ core (``core_worker.cc ... E`` lines that read like failures and are not), the lines Ray forwards
from every worker process (DeepSpeed's banners, library warnings), tqdm bars of Ray Data. No library setting quiets
all of them, so ``quiet`` works one level down: file descriptors 1 and 2 are pointed at the log file, which catches
every writer, Python or native, and the terminal is kept on duplicated descriptors for pcd-ray's own output:

- ``say`` (the stage lines of the pipeline, the tables) and the ``pcd_ray`` logger write to the terminal;
- a line forwarded from a worker reaches the terminal only if it is one of pcd-ray's progress lines
  (``USER_LINE``: the training loop prints these on rank 0);
- everything goes to the log file too, so the file alone tells the whole story.

``pcd-ray -v`` leaves the streams alone (the old behaviour: everything on the terminal).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from typing import TextIO

WIDTH = 120
"""Terminal lines stay within this many columns: tables are laid out for it (eval/report.py), other lines wrap."""

USER_LINE = re.compile(r"^\[(train|base_train)\] ")
"""Lines of pcd-ray's own that are printed inside Ray workers (training progress), matched after Ray's prefix."""
_RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)?\([^)]*\)(\x1b\[[0-9;]*m)? ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_out: TextIO | None = None  # the terminal's stdout and stderr while ``quiet`` holds descriptors 1 and 2
_err: TextIO | None = None
log_path: str | None = None


def terminal(err: bool = True) -> TextIO:
    """The stream that reaches the person running pcd-ray: its stderr (progress, errors) or stdout (results)."""
    if _err is None:
        return sys.stderr if err else sys.stdout
    return _err if err else _out


def fit(text: str, width: int = WIDTH) -> str:
    """``text`` with each line longer than ``width`` wrapped at spaces, continuation lines indented by four (a
    word longer than a line, a long path say, stays whole)."""
    import textwrap

    out = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
        else:
            out += textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(out)


def say(text: str = "", *, err: bool = False) -> None:
    """Print a line of pcd-ray's own output on the terminal (stdout unless ``err``), and in the log file."""
    out = terminal(err)
    out.write(fit(text) + "\n")
    out.flush()
    if _err is not None:
        sys.stdout.log.write(text + "\n")


class _Route(io.TextIOBase):
    """sys.stdout / sys.stderr under ``quiet``: every line to the log file, pcd-ray's worker lines also to the
    terminal. Ray's log monitor writes forwarded worker lines here (it looks sys.stdout up at each write)."""

    def __init__(self, log: TextIO, term: TextIO):
        self.log, self.term, self.pending = log, term, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # libraries draw progress bars only on a terminal: none here
        return False

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            plain = _RAY_PREFIX.sub("", line, count=1)
            if USER_LINE.match(_ANSI.sub("", plain)):
                self.term.write(fit(_ANSI.sub("", plain)) + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.term.flush()

    def fileno(self) -> int:
        return self.log.fileno()


def _reopen(fd: int) -> TextIO:
    return io.TextIOWrapper(os.fdopen(fd, "wb", buffering=0), encoding="utf-8", line_buffering=True, errors="replace")


def quiet(log_file: str) -> None:
    """Send descriptors 1 and 2 (and so every library's output) to ``log_file``; keep the terminal for pcd-ray.

    Call before Ray is imported: Ray's loggers bind the stream they find at import time.
    """
    global _out, _err, log_path
    if _err is not None:
        return
    os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = _reopen(os.dup(1)), _reopen(os.dup(2))
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    log = _reopen(os.dup(1))
    log.write(f"--- pcd-ray {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    sys.stdout, sys.stderr = _Route(log, out), _Route(log, err)
    _out, _err, log_path = out, err, log_file


class _Fitted(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return fit(super().format(record))


def setup_logging(verbose: bool) -> None:
    """pcd-ray's own INFO lines on the terminal; libraries' WARNING and up (to the log file under ``quiet``)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ours = logging.getLogger("pcd_ray")
    ours.setLevel(logging.INFO)
    if _err is not None and not verbose:
        # Ours go to the terminal in a short form and, through the root logger, to the log file in full.
        handler = logging.StreamHandler(_err)
        handler.setFormatter(_Fitted("%(message)s"))
        ours.addHandler(handler)
