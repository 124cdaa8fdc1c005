"""lm-eval ``custom_dataset`` loader for the skills tasks: finds the JSONL splits next to this package, from any cwd."""
from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _rows(skill: str, split: str, multiple_choice: bool) -> list[dict]:
    path = DATA_DIR / skill / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"skills data file {path} is missing; regenerate it with `python -m eep.tasks.generate`")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if multiple_choice:
        from eep.tasks.skills import mc_choices

        for row in rows:
            row["choices"] = mc_choices(skill, row)
            row["target"] = row["choices"].index(row["answer"])
    return rows


def load(skill: str, multiple_choice: bool = False, **_metadata) -> datasets.DatasetDict:
    """``DatasetDict`` with the ``search``, ``validation`` and ``test`` splits of ``skill``.

    lm-eval calls this with the task's ``metadata`` and ``dataset_kwargs`` as keyword arguments; only ``skill`` and
    ``multiple_choice`` (adds ``choices: list[str]`` and ``target: int`` to every row) are used.
    """
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(_rows(skill, split, multiple_choice))
        for split in ("search", "validation", "test")
    })
