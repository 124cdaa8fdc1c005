"""The method registry: each method is one registered function with its metadata; ``compute`` runs one.

``METHODS`` maps a name to its function, ``METHOD_INFO`` to its :class:`MethodInfo` (kind, seedable, calibration);
``eep-compare``'s method list and ``search.init_from``'s choices are read from here (:func:`method_names`)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eep.materialize import Materializer
from eep.methods.result import MethodResult

log = logging.getLogger(__name__)

KINDS = ("baseline", "statistic", "enumeration", "skipping", "merging", "compression")   # listing order


@dataclass(frozen=True)
class MethodInfo:
    """A method's metadata. ``kind``: one of :data:`KINDS`; ``seedable``: its result is a genome over the original
    weights alone (no weight rewrite, no routing patch), so ``search.init_from`` may start a search from it;
    ``needs_calibration``: it reads calibration tokens; ``summary``: one line for tables and errors."""

    name: str
    kind: str
    seedable: bool
    needs_calibration: bool = True
    summary: str = ""


# name -> fn(materializer, calibration, *, num_kept, top_k, seed, **options) -> MethodResult
METHODS: dict[str, Callable[..., MethodResult]] = {}
METHOD_INFO: dict[str, MethodInfo] = {}


class MethodError(ValueError):
    """A method that cannot run with these settings on this model: the message says why and what would work."""


def register(name: str, *, kind: str, seedable: bool, needs_calibration: bool = True,
             summary: str = "") -> Callable[[Callable[..., MethodResult]], Callable[..., MethodResult]]:
    """Decorator adding a method to :data:`METHODS` and its :class:`MethodInfo` to :data:`METHOD_INFO`; a name
    registered twice, or an unknown ``kind``, raises ValueError."""
    if kind not in KINDS:
        raise ValueError(f"method {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")

    def add(fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered (by {METHODS[name].__module__})")
        METHODS[name] = fn
        METHOD_INFO[name] = MethodInfo(name, kind, seedable, needs_calibration, summary)
        return fn
    return add


def method_names(*, seedable: bool | None = None) -> list[str]:
    """The registered methods in listing order (by :data:`KINDS`, then registration); ``seedable=True``: only
    those a search may start from."""
    import eep.methods  # noqa: F401  (registers every method)

    infos = sorted(METHOD_INFO.values(), key=lambda i: KINDS.index(i.kind))  # stable: registration order within
    return [i.name for i in infos if seedable is None or i.seedable == seedable]


def _check_counts(materializer: Materializer, num_kept: int, top_k: int) -> None:
    num_experts = materializer.adapter.num_experts
    if not 1 <= num_kept <= num_experts:
        raise MethodError(f"num_kept={num_kept} must be between 1 and the model's E={num_experts}")
    if not 1 <= top_k <= num_kept:
        raise MethodError(f"top_k={top_k} must be between 1 and num_kept={num_kept}")


def compute(name: str, model: nn.Module, materializer: Materializer | None = None, calibration: dict | None = None,
            *, num_kept: int, top_k: int, seed: int = 0, **options) -> MethodResult:
    """Run method ``name`` on ``model`` and return its :class:`MethodResult` (genome validated for the model).

    ``calibration``: ``{"input_ids", "attention_mask": long[B, S]}`` (see :mod:`eep.methods.calibration`), needed by
    every method but ``random``; ``num_kept`` is ``E'``, ``top_k`` is ``k'``; ``options`` are the method's own keyword
    arguments. Statistics are collected on the original model; the materialiser is left as it was found.
    """
    import eep.methods  # noqa: F401  (registers every method)

    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    materializer = materializer or Materializer(model)
    if materializer.model is not model:
        raise MethodError("the materialiser was built on another model than the one given")
    _check_counts(materializer, num_kept, top_k)
    if calibration is None and METHOD_INFO[name].needs_calibration:
        raise MethodError(f"method {name!r} needs calibration tokens: eep.methods.calibration.calibration_batch(...)")
    start = time.perf_counter()
    with torch.no_grad(), materializer.preserved():
        result = METHODS[name](materializer, calibration, num_kept=num_kept, top_k=top_k, seed=seed, **options)
    materializer.adapter.validate(result.genome)
    result.info.update(num_kept=num_kept, top_k=top_k, seed=seed, options=options,
                       seconds=round(time.perf_counter() - start, 3),
                       calibration_tokens=0 if calibration is None else int(calibration["attention_mask"].sum()))
    log.info("method %s: E'=%d, k'=%d, genome %s in %.2f s", name, num_kept, top_k, result.genome.content_hash(),
             result.info["seconds"])
    return result
