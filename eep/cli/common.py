"""What the Hydra apps share: user errors become one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)   # bad settings, tasks, methods, genomes, folders


@contextmanager
def user_errors(prog: str):
    """Catch the errors that mean bad input (settings, tasks, methods, genomes, folders) and exit 2 with the message."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
