"""The library's own error types, so callers can tell our diagnoses from bugs."""

from __future__ import annotations


class DualFormError(Exception):
    """Base class of every error raised on purpose by lightning-dualform."""


class StoreError(DualFormError, ValueError):
    """A file is not a usable store: missing, foreign, corrupted, truncated or inconsistent."""


class StoreBusyError(StoreError):
    """Another process is writing the store right now (finalising it, certifying it, recording queries):
    what a reader saw may be half written. Retry when that process is done."""


class StaleQueriesError(DualFormError, ValueError):
    """A recorded query set went through another model than the one the store now rebuilds (the run was resumed
    and trained on, or rolled back): its layer inputs and predictions are that model's. Record it again."""


class InexactError(DualFormError, RuntimeError):
    """The training run cannot be written as an exact dual form (e.g. Rprop, value clipping) and no opt-in was given."""


class WriterError(DualFormError, RuntimeError):
    """The background writer failed (disk full, permissions): recording stopped, nothing was dropped silently."""


class DiskSpaceError(DualFormError, OSError):
    """The planned store does not fit on the target disk (checked before recording starts)."""
