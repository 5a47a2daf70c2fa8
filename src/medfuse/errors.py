"""User-facing errors (DESIGN "Errors" contract).

A user's mistake raises a :class:`MedfuseError` subclass. The CLI catches it, prints exactly one
line of the form ``<where>: <problem>. Fix: <what to do>`` and exits with code 2 (130 for
:class:`Interrupted`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class MedfuseError(Exception):
    """Base class of every error caused by user input.

    Args:
        where: the file, directory or config key at fault (a path is printed as given).
        problem: what is wrong, without a trailing period.
        fix: what the user should do about it.
    """

    exit_code = 2

    def __init__(self, where: str | Path, problem: str = "", fix: str = ""):
        if not problem:
            # Re-raised from a DataLoader worker as ``cls(message_with_traceback)``: recover the
            # original one-line message from the last line of the traceback text.
            lines = [ln for ln in str(where).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else str(where)
            prefix = f"{type(self).__name__}: "
            where = last.split(prefix, 1)[1] if prefix in last else last
        self.where = str(where)
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The single line the CLI prints (newlines in parts are flattened)."""
        if not self.problem:
            return _printable(" ".join(self.where.split()))
        text = f"{self.where}: {self.problem}"
        if self.fix:
            text += f". Fix: {self.fix}"
        return _printable(" ".join(text.split()))


def _printable(text: str) -> str:
    """``text`` with undecodable bytes of file names (lone surrogates) shown as ``\\udcXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ConfigError(MedfuseError):
    """Unknown key, wrong type, or inconsistent values in a config or override."""


class DataError(MedfuseError):
    """Missing, unreadable, inconsistent or invalid input data."""


class WeightsError(MedfuseError):
    """A weights or checkpoint file that cannot be loaded safely or does not match the model."""


class RunDirError(MedfuseError):
    """A run directory that is missing pieces (config, checkpoints) needed by the command."""


class Interrupted(MedfuseError):
    """The user stopped a command (Ctrl-C). Not a mistake, but reported the same way: one line
    (where the last checkpoint is and how to resume) and exit code 130 (128 + SIGINT)."""

    exit_code = 130


class MissingExtraError(MedfuseError):
    """An optional dependency is needed for a feature the user asked for."""

    def __init__(self, feature: str, package: str, extra: str):
        super().__init__(
            feature,
            f"needs the optional package '{package}', which is not installed",
            f"pip install 'medfuse[{extra}]'",
        )
