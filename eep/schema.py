"""The apps' typed schema: every key of ``eep-search`` and ``eep-compare`` with its type, range and meaning of null.

:data:`SEARCH` and :data:`COMPARE` map a dotted key to a checker (:class:`Int`, :class:`Num`, :class:`Text`, ...)
whose ``check(key, value)`` raises a :class:`~eep.errors.UserError` naming the key, the value and what would be
valid; :func:`walk` and :func:`unknown_key` find and name keys the schema does not know. Used by ``eep.settings``.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from eep.errors import UserError


def show(value) -> str:
    """A value as it would be written on the command line (null, true, [a,b], text unquoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return str(value)


def bad(key: str, value, valid: str) -> UserError:
    return UserError(f"{key}={show(value)}: {valid}")


# ---------------------------------------------------------------------------------------------------- key types
@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None
    null: str | None = None     # what null means, when allowed

    def valid(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"an integer between {self.lo} and {self.hi}"
        else:
            text = "an integer" + (f" >= {self.lo}" if self.lo is not None else "")
        return f"must be {text}" + (f", or null ({self.null})" if self.null else "")

    def check(self, key, v):
        if v is None and self.null:
            return
        if isinstance(v, bool) or not isinstance(v, int) or (self.lo is not None and v < self.lo) \
                or (self.hi is not None and v > self.hi):
            raise bad(key, v, self.valid())


@dataclass(frozen=True)
class Num:
    lo: float = 0.0
    hi: float | None = None
    strict: bool = False        # lo excluded
    null: str | None = None

    def check(self, key, v):
        if v is None and self.null:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
            (v > self.lo if self.strict else v >= self.lo) and (self.hi is None or v <= self.hi)
        if not ok:
            rng = f"between {self.lo} and {self.hi}" if self.hi is not None else f"{'>' if self.strict else '>='} " \
                                                                                 f"{self.lo}"
            raise bad(key, v, f"must be a number {rng}" + (f", or null ({self.null})" if self.null else ""))


@dataclass(frozen=True)
class Bool:
    def check(self, key, v):
        if not isinstance(v, bool):
            raise bad(key, v, "must be true or false")


@dataclass(frozen=True)
class Text:
    null: str | None = None
    choices: tuple[str, ...] = ()

    def check(self, key, v):
        if v is None and self.null:
            return
        if self.choices and v not in self.choices:
            raise bad(key, v, f"use one of {', '.join(self.choices)}")
        if not isinstance(v, str) or not v:
            raise bad(key, v, "must be a non-empty string" + (f", or null ({self.null})" if self.null else ""))


@dataclass(frozen=True)
class Names:
    """A non-empty list of names (a single name is accepted as a list of one)."""
    null: str | None = None

    def check(self, key, v):
        if v is None and self.null:
            return
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
            raise bad(key, v, "must be a non-empty list of names, e.g. [a,b]" +
                      (f", or null ({self.null})" if self.null else ""))


@dataclass(frozen=True)
class MethodList:
    """A list of names, possibly empty (a single name or null, as configs before eep 0.2 wrote it, is accepted)."""

    def check(self, key, v):
        items = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise bad(key, v, "must be a list of method names, e.g. [reap,frequency], or [] (random start)")


@dataclass(frozen=True)
class Counts:
    """An integer >= 1 or a non-empty list of them (or null)."""
    null: str

    def check(self, key, v):
        items = [v] if isinstance(v, int) else v
        if v is None:
            return
        if not isinstance(items, list) or not items or \
                not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in items):
            raise bad(key, v, f"must be an integer >= 1 or a list of them, e.g. [2,4], or null ({self.null})")


@dataclass(frozen=True)
class Mapping:
    """A free-form mapping (its keys are not schema keys), or null."""
    example: str

    def check(self, key, v):
        if v is not None and not isinstance(v, dict):
            raise bad(key, v, f"must be a mapping, e.g. {self.example}, or null")


@dataclass(frozen=True)
class Groups:
    def check(self, key, v):
        if v != "per_layer" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(key, v, "use per_layer or a number of depth groups >= 1")


@dataclass(frozen=True)
class Free:
    """Checked elsewhere (device maps, chat templates)."""

    def check(self, key, v):
        pass


PROBABILITY = Num(0.0, 1.0)
LIMIT = "the whole split"
SEARCH = {
    "seed": Int(),
    "statistics": Text(null="calibrate on the search split"),
    "resume": Text(null="a new run"),
    "resume_force": Bool(),
    "verbose": Bool(),
    "model.name": Text(null="model.path names the model"),
    "model.path": Text(null="the shipped model model.name"),
    "model.dtype": Text(),
    "model.device": Text(),
    "model.device_map": Free(),
    "model.trust_remote_code": Bool(),
    "task.names": Names(),
    "task.include_path": Text(null="no extra task folder"),
    "task.weights": Mapping("{skills_add:2,skills_sort:1}"),
    "task.search_split": Text(null="the task's own split"),
    "task.validation_split": Text(null="the task's own split"),
    "task.report_split": Text(null="the task's own split"),
    "search.num_experts": Int(1),
    "search.top_k": Int(1, null="the model's own, capped at search.num_experts"),
    "search.layer_groups": Groups(),
    "search.prune_budget": Int(0),
    "search.merge_budget": Int(0),
    "search.time_limit": Num(0.0, strict=True, null="no time limit"),
    "search.ask_batch": Int(1, null="evaluator.workers"),
    "search.final_candidates": Int(0),
    "search.init_from": MethodList(),
    "search.fitness": Text(choices=("task", "likelihood", "agreement", "task+likelihood", "task+agreement",
                                         "match+likelihood", "auto")),
    "search.merge_router": Text(choices=("probabilities", "gate_rows")),
    "search.racing.slice": Num(0.0, 1.0, strict=True),
    "search.racing.top": Int(1),
    "search.max_failed_candidates": Int(1),
    "search.eep.population": Int(1),
    "search.eep.group_change": PROBABILITY,
    "search.eep.row_repoint": PROBABILITY,
    "search.eep.parent_margin": Num(0.0),
    "search.eep.crossover_margin": Num(0.0),
    "search.eep.crossover_min_parents": Int(1),
    "search.eep.crossover": PROBABILITY,
    "search.eep.crossover_row": PROBABILITY,
    "search.eep.noise": PROBABILITY,
    "search.eep.noise_sigma": Num(0.0),
    "search.eep.renormalize": PROBABILITY,
    "search.eep.prune_crossover": PROBABILITY,
    "search.eep.seeded_random": Int(0, null="search.eep.population random subsets, as from a random start"),
    "optimizer.name": Text(),
    "optimizer.prune_name": Text(),
    "optimizer.merge_name": Text(),
    "evaluator.limit": Int(1, null=LIMIT),
    "evaluator.validation_limit": Int(1, null=LIMIT),
    "evaluator.test_limit": Int(1, null=LIMIT),
    "evaluator.batch_size": Int(1),
    "evaluator.num_fewshot": Int(0, null="the task's own"),
    "evaluator.apply_chat_template": Free(),
    "evaluator.progress": Bool(),
    "evaluator.split_seed": Int(),
    "evaluator.workers": Int(1),
    "evaluator.threads": Int(1, null="the default"),
    "evaluator.ray_address": Text(null="a local Ray instance"),
}
COMPARE = {
    "compare.methods": Names(null="every method"),
    "compare.num_experts": Counts(null="[search.num_experts]"),
    "compare.random_seeds": Int(1),
    "compare.calibration": Text(choices=("task", "skills_all")),
    "compare.calibration_docs": Int(1),
    "compare.options": Mapping("{enumeration:{max_subsets:2000}}"),
    "compare.export": Bool(),
}
GROUPS = ("model", "task", "search", "optimizer", "evaluator", "experiment")   # Hydra config groups of the apps
SEARCH_CONFIG, COMPARE_CONFIG = "eep_config.yaml", "compare_config.yaml"


def schema(compare: bool = True) -> dict:
    return {**SEARCH, **COMPARE} if compare else dict(SEARCH)


# ---------------------------------------------------------------------------------------------------- unknown keys
def nearest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:  # the nearest key of the same section, by its last part
        section, _, last = key.rpartition(".")
        same = [k for k in known if k.rpartition(".")[0] == section]
        close = [f"{section}.{m}" if section else m for m in
                 difflib.get_close_matches(last, [k.rpartition(".")[2] for k in same], n=1, cutoff=0.5)]
    return f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(sorted(known))}"


def unknown_key(key: str, value, known) -> UserError:
    return UserError(f"{key}={show(value)}: unknown key{nearest(key, known)}")


def walk(data: dict, known: dict, prefix: str = ""):
    """Every leaf path of ``data`` that the schema does not know, with its value."""
    for k, v in data.items():
        path = f"{prefix}{k}"
        if path in known:
            continue
        if isinstance(v, dict) and any(name.startswith(path + ".") for name in known):
            yield from walk(v, known, path + ".")
        else:
            yield path, v
