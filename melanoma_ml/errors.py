"""The project's error hierarchy: what counts as bad input is decided by type, not by where it was raised.

Every error raised because of something the user gave us (a config value, a data folder, a table row,
an image file, a bundle, a registry entry, a request) derives from ``MelanomaInputError`` and carries a
message that names the file/row/setting and the fix. The CLI prints such errors as one ``error:`` line;
anything else is a bug and keeps its traceback.

The concrete classes also derive from the builtin they used to be (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` in callers keeps working.
"""

from __future__ import annotations


class MelanomaInputError(Exception):
    """Base of every error caused by bad input; its message says what to fix."""


class InputValueError(MelanomaInputError, ValueError):
    """A value (config setting, table cell, argument) that cannot be used as given."""


class InputFileNotFoundError(MelanomaInputError, FileNotFoundError):
    """A file or folder the user pointed at does not exist."""


class InputStateError(MelanomaInputError, RuntimeError):
    """The artifacts on disk are not in a state the request needs (e.g. a step has not run yet)."""


def is_input_error(err: BaseException) -> bool:
    """Whether ``err`` is bad input (ours, or a pydantic config validation error) rather than a bug."""
    if isinstance(err, MelanomaInputError):
        return True
    from pydantic import ValidationError

    return isinstance(err, ValidationError)
