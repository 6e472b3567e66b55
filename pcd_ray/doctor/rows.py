"""One doctor row per check, the table they print as, and a way to probe libraries without their log noise."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Row:
    check: str
    verdict: str
    detail: str
    fix: str | None = None
    """What to run or which config key to change; set on FAIL (and on a warn that has a remedy)."""

    def to_dict(self) -> dict:
        return asdict(self)


def relevant(row: Row, needed: bool, why: str) -> Row:
    """A failure in a check the config does not depend on is a warning: it names the problem without failing."""
    if needed or row.verdict != FAIL:
        return row
    return Row(row.check, WARN, f"{row.detail} (not needed: {why})", row.fix)


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.verdict == FAIL]


def format_rows(rows: list[Row]) -> str:
    """A plain table, ``fix:`` lines under the rows that have one, and a one-line summary."""
    width = max([len("check")] + [len(r.check) for r in rows]) + 2
    verdict_width = len("verdict") + 2
    lines = [f"{'check':<{width}}{'verdict':<{verdict_width}}detail"]
    for r in rows:
        lines.append(f"{r.check:<{width}}{r.verdict:<{verdict_width}}{r.detail}")
        if r.fix and r.verdict in (FAIL, WARN):
            lines.append(f"{'':<{width + verdict_width}}fix: {r.fix}")
    lines.append(f"doctor: {len(rows)} checks, {len(failed(rows))} failed")
    return "\n".join(lines)


class Captured:
    """What a quiet block swallowed, for a check whose failure is explained only there (Ray logs why it cannot
    connect, then raises a bare ConnectionError)."""

    def __init__(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.native = b""

    def last_line(self) -> str:
        text = "\n".join([self.out.getvalue(), self.err.getvalue(), self.native.decode(errors="replace")])
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # Drop a native log prefix: "[2026-01-01 00:00:00,000 W 123 123] gcs_client.cc:210: ".
        return re.sub(r"^\[[^]]*\]\s*\S+:\d+:\s*", "", lines[-1]) if lines else ""


@contextmanager
def quiet(fds: bool = False) -> Iterator[Captured]:
    """Silence what libraries print while being probed: logging (DeepSpeed's accelerator warning, Ray's connect
    messages, torch's CUDA_HOME notice), Python warnings and stray prints; with ``fds``, also what native code
    writes to file descriptors 1 and 2 (Ray's core worker logs its connection attempts there).

    A library that creates a StreamHandler inside this block binds it to the throwaway buffer (DeepSpeed binds
    sys.stdout when its logger is created); such handlers are pointed back at the real streams on exit, so the
    library's later output, outside the doctor, is not lost.
    """
    captured = Captured()
    real = {id(captured.out): sys.stdout, id(captured.err): sys.stderr}
    previous_disable = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with (
            _native_output_captured(fds, captured),
            redirect_stdout(captured.out),
            redirect_stderr(captured.err),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        logging.disable(previous_disable)
        loggers = [logging.getLogger()] + [
            lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
        ]
        for lg in loggers:
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and id(h.stream) in real:
                    h.setStream(real[id(h.stream)])


@contextmanager
def _native_output_captured(enabled: bool, captured: Captured) -> Iterator[None]:
    if not enabled:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.native = sink.read()[-65536:]


def one_line(error: BaseException | str) -> str:
    """An exception as one short line (botocore and Ray messages can span lines)."""
    text = (
        error
        if isinstance(error, str)
        else (f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
    )
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
