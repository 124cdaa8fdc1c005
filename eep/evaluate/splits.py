"""Which documents each role (search fitness, validation pick, test report) scores, disjoint by construction."""
from __future__ import annotations

import random
from dataclasses import dataclass

ROLES: tuple[str, ...] = ("search", "validation", "test")


@dataclass(frozen=True)
class SplitRef:
    """A task's documents for one role: the dataset split ``name`` and, when carved out of a shared split, the
    document ``indices`` (seeded partition); ``indices=None`` means the whole split."""

    name: str
    indices: tuple[int, ...] | None = None

    def overlaps(self, other: SplitRef) -> bool:
        if self.name != other.name:
            return False
        if self.indices is None or other.indices is None:
            return True
        return bool(set(self.indices) & set(other.indices))

    def describe(self) -> dict:
        return {"split": self.name, "docs": None if self.indices is None else len(self.indices),
                "partition": self.indices is not None}


def _available(task) -> dict[str, str | None]:
    """The split a task itself declares for each role (lm-eval's training/validation/test splits)."""
    cfg = task.config
    return {"search": cfg.training_split, "validation": cfg.validation_split, "test": cfg.test_split}


def plan_splits(task, overrides: dict[str, str | None] | None = None, seed: int = 0) -> dict[str, SplitRef]:
    """Assign documents to the three roles for one lm-eval task.

    A role uses the split named in ``overrides`` (``{"search": ..., "validation": ..., "test": ...}``), else the
    task's own split for that role (its training split for search), else the task's evaluation split (test, else
    validation). Roles that end up on one split share it as a seeded, disjoint partition of equal parts, unless the
    user named that split for both: overlapping documents are refused with a ValueError naming task and roles.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    own = _available(task)
    source = own["test"] or own["validation"] or own["search"]
    use = {role: overrides.get(role) or own[role] or source for role in ROLES}
    by_split: dict[str, list[str]] = {}
    for role in ROLES:
        by_split.setdefault(use[role], []).append(role)
    plan: dict[str, SplitRef] = {}
    for split, roles in by_split.items():
        explicit = [r for r in roles if r in overrides]
        if len(explicit) > 1:
            raise ValueError(f"task {task.config.task}: the {' and '.join(explicit)} splits are both {split!r}, so "
                             f"their documents overlap; name disjoint splits, or leave one unset to get a seeded "
                             f"partition")
        plan.update({roles[0]: SplitRef(split)} if len(roles) == 1 else _partition(task, split, roles, seed))
    _check_disjoint(task.config.task, plan)
    return plan


def _partition(task, split: str, roles: list[str], seed: int) -> dict[str, SplitRef]:
    n = len(task.dataset[split])
    order = list(range(n))
    random.Random(f"{seed}-{task.config.task}-{split}").shuffle(order)
    cuts = [round(i * n / len(roles)) for i in range(len(roles) + 1)]
    return {role: SplitRef(split, tuple(sorted(order[cuts[i]:cuts[i + 1]]))) for i, role in enumerate(roles)}


def _check_disjoint(task_name: str, plan: dict[str, SplitRef]) -> None:
    for i, a in enumerate(ROLES):
        for b in ROLES[i + 1:]:
            if a in plan and b in plan and plan[a].overlaps(plan[b]):
                raise ValueError(f"task {task_name}: the {a} and {b} documents overlap (split {plan[a].name!r}); "
                                 f"name disjoint splits")
