"""The error a user's settings raise: printed by the apps as one line, exit status 2, no traceback."""
from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's settings: the message names the key, the value and what would be valid."""
