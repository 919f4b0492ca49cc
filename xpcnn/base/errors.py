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


class NonFiniteOutputs(XpcnnError, ValueError):
    """A model whose outputs are NaN or infinite although its weights are finite: damaged weights (a negative
    variance edited in) or weights so large that the arithmetic overflows float32."""

    def __init__(self, where: str = ""):
        lead = f"{where}: the model's" if where else "the model's"
        super().__init__(
            f"{lead} outputs are NaN or infinite: its weights are damaged, or so large that float32 overflows"
        )


def one_line(text: object) -> str:
    """``text`` with its whitespace (newlines included) collapsed, so that a message stays on one line."""
    return " ".join(str(text).split())


def printable(text: object) -> str:
    """``text`` with its control characters (a newline, a terminal's escape) written as escapes (``\\n``), so that
    a file name cannot forge lines of output or drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))
