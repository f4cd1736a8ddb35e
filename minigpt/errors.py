"""The errors a user can fix: the command line prints their message alone and exits with 2.

Anything else that goes wrong is a bug in minigpt or its dependencies, and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["MinigptError", "NaNLogitsError", "NetworkError", "Stopped"]


class MinigptError(Exception):
    """A failure whose message says what went wrong and what to do about it."""


class NaNLogitsError(MinigptError):
    """The model's next-token logits are NaN: decoding would pick garbage (argmax takes NaN as
    the largest value) instead of failing, so generation stops with this instead."""


class NetworkError(MinigptError):
    """A download or online service that failed or did not answer in time."""


class Stopped(MinigptError):
    """SIGTERM (a scheduler's preemption, ``kill``, the end of a time slot) stopped a training run
    after a whole step and a checkpoint: the same command again resumes it. The command line
    exits with 143 (128 + SIGTERM), as a process that signal ends does."""
