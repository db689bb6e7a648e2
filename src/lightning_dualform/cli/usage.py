"""The command's name, its usage error and the one-line form of an error: what the parser needs before any
command runs (and the defaults its help shows), kept free of numpy so that ``--version`` and ``--help`` start in a
fraction of a second."""

from __future__ import annotations

#: the command's name, as usage lines and messages spell it
PROG = "lightning-dualform"
#: recorded queries ``attend`` shows when --index is not given
DEFAULT_QUERIES = 4
#: ``attend --top-k`` when not given, and the viewer's: a table per query and layer that fits a terminal, a row of
#: thumbnails on the page (the library's own default, ``AttendRequest.top_k``, is 10)
TERMINAL_TOP_K = 5


class UsageError(Exception):
    """A user's mistake that the CLI reports in one line with exit code 2."""


def error_message(err: BaseException) -> str:
    """``err`` as one line (a KeyError's message without its quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__

