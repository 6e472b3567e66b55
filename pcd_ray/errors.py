"""Errors whose message is the whole story for a user: what failed and what to do. The CLI prints them on one line
and exits 1, without a traceback (which would bury the message under Ray's and the engine's frames)."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage stopped for a reason its message explains (a model that cannot be loaded, an engine that kept
    failing); everything it committed before stays."""
