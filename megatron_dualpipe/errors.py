"""The project's own user-error type.

A `UserError` is a mistake the user can fix (a recipe field, a path, a command-line argument).
The command line prints it as one line and exits with status 2; every other exception keeps its
traceback. Raise it with a message that names the file, the field path and, where there is a
set, the allowed values.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""

    exit_code = 2
