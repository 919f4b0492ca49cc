"""The errors xpcnn reports to its users, each as one line that says what is wrong.

An :class:`XpcnnError` is a problem the user can fix: bad input, a missing file,
device or package, a run that diverged.  The command line shows it as one line
(``XPCNN_DEBUG=1`` shows its traceback too); any other exception is a bug in
xpcnn, shown with its traceback and a request to report it.  Library functions
also raise plain ``ValueError`` for arguments a program got wrong (a layer fed
the wrong shape): from the command line, those are bugs too.
"""

from __future__ import annotations


class XpcnnError(Exception):
    """A problem the user can fix; its message is one line."""


class ConfigError(XpcnnError, ValueError):
    """A training setting out of range or unknown.

    ``setting`` names it (a ``TrainConfig`` field), so that the command line can name its flag.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


def one_line(text: object) -> str:
    """``text`` with its whitespace (newlines included) collapsed, so that a message stays on one line."""
    return " ".join(str(text).split())
