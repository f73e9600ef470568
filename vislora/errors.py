"""The errors a user can fix, and which process reports them. Standard library only: the CLI catches
these before torch is imported (argument, recipe and path checks) as well as after (training,
export).
"""

from __future__ import annotations

import os


class VisloraError(ValueError):
    """Bad input the user can fix (a recipe key, a file, a value): shown as one line, never a
    traceback."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# what `vislora` prints as one line `vislora CMD: error: ...` with exit code 2; any other exception
# (a plain ValueError included: a bug in vislora) keeps its traceback, so that it can be reported
USER_ERRORS = (FileNotFoundError, VisloraError, NotImplementedError, TrainingDiverged)


def first_rank() -> bool:
    """This process is rank 0 of a torchrun launch, or runs alone (readable before the process group
    exists)."""
    return os.environ.get("RANK", "0") == "0"
