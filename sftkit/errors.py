"""Exception types shared by the library, the registry and the command line.

The CLI maps ``BadInputError`` to exit code 2 (the user can fix it) and every other
``SftkitError`` to exit code 1 (something failed), so raise the most precise one.
"""

from __future__ import annotations


class SftkitError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class BadInputError(SftkitError, ValueError):
    """The user's input (a file, a flag, a reference) is wrong; the message says how to fix it."""


class BaseMismatchError(BadInputError):
    """An SFT was trained on a different base model than the one it is applied to."""


class BaseUnavailableError(BadInputError):
    """The base model is neither local nor cached, and the Hub cannot be reached (or offline mode is on)."""


class NotFoundError(BadInputError, LookupError):
    """A reference, file or record does not exist."""
