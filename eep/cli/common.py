"""What the Hydra apps share: user errors become one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)   # bad settings, tasks, methods, genomes, folders


def fail(prog: str, err: Exception) -> int:
    """Print ``prog: error: <err>`` on stderr; the exit status of a user error, 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


@contextmanager
def user_errors(prog: str):
    """Catch the errors that mean bad input (settings, tasks, methods, genomes, folders) and exit 2 with the message."""
    try:
        yield
    except USER_ERRORS as err:
        sys.exit(fail(prog, err))


def call(prog: str, fn, *args, errors: tuple[type[Exception], ...] = USER_ERRORS) -> int:
    """``fn(*args)`` for an argparse CLI's ``main``: 0, or 2 with one line on stderr for a user error."""
    try:
        fn(*args)
    except errors as err:
        return fail(prog, err)
    return 0
