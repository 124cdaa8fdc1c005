"""Offline lm-eval tasks for the six synthetic skills, and helpers to find and check task names."""
from __future__ import annotations

import difflib
from pathlib import Path

from eep.tasks.skills import MC_SKILLS, SKILLS

HARNESS_DIR = Path(__file__).resolve().parent / "harness"
SPLIT_NAMES: tuple[str, ...] = ("search", "validation", "test")


def include_path() -> Path:
    """The folder to pass as lm-eval's ``--include_path`` / ``TaskManager(include_path=...)``."""
    return HARNESS_DIR


def task_names() -> list[str]:
    """Names of the shipped tasks: ``skills_<skill>``, ``skills_<skill>_mc`` and the group ``skills_all``."""
    return [f"skills_{s}" for s in SKILLS] + [f"skills_{s}_mc" for s in MC_SKILLS] + ["skills_all"]


def unknown_task_error(name: str, known: list[str]) -> ValueError:
    """A short error for an unknown task name that suggests close names and says where the known ones come from."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    shipped = ", ".join(task_names())
    return ValueError(f"unknown lm-eval task {name!r}.{hint} eep ships: {shipped}; any task of lm-eval itself or of "
                      f"an --include_path folder is accepted too.")


def check_shipped(names: list[str]) -> list[str]:
    """Return ``names`` if all are shipped tasks, else raise :func:`unknown_task_error` for the first unknown one."""
    known = task_names()
    for name in names:
        if name not in known:
            raise unknown_task_error(name, known)
    return names
