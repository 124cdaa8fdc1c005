"""Write the skills tasks' JSONL splits deterministically: ``python -m eep.tasks.generate``."""
from __future__ import annotations

import json
import random
from pathlib import Path

from eep.tasks.skills import SKILLS, sample

SPLITS: dict[str, int] = {"search": 300, "validation": 300, "test": 500}
DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 20261122


def make_splits(skill: str, seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits of ``skill``: distinct prompts drawn with a seeded RNG, cut in the order of ``SPLITS``."""
    rng = random.Random(f"{seed}-{skill}")
    seen: dict[str, dict[str, str]] = {}
    need = sum(SPLITS.values())
    while len(seen) < need:
        doc = sample(skill, rng)
        seen.setdefault(doc["prompt"], doc)
    docs = list(seen.values())
    out, start = {}, 0
    for split, n in SPLITS.items():
        out[split] = [{"id": f"{skill}-{split}-{i}", **d} for i, d in enumerate(docs[start:start + n])]
        start += n
    return out


def write_all(data_dir: Path = DATA_DIR) -> None:
    """(Re)write ``data/<skill>/<split>.jsonl`` for every skill."""
    for skill in SKILLS:
        folder = data_dir / skill
        folder.mkdir(parents=True, exist_ok=True)
        for split, docs in make_splits(skill).items():
            text = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
            (folder / f"{split}.jsonl").write_text(text)


def read_split(skill: str, split: str, data_dir: Path = DATA_DIR) -> list[dict[str, str]]:
    """The documents of one split, as written by :func:`write_all`."""
    path = data_dir / skill / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


if __name__ == "__main__":
    write_all()
    print(f"wrote {len(SKILLS)} skills x {list(SPLITS)} under {DATA_DIR}")
