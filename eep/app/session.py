"""A config's model, tokenizer and materialiser, loaded once, and the evaluators and pools built on them.

Every app builds its model through :class:`Session` (``eep-search`` in its process and in each Ray worker,
``eep-compare``, ``eep-export``), so the same config always gives the same model, splits and calibration.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math

from omegaconf import DictConfig, OmegaConf

from eep.evaluate.score import Score
from eep.search.run import score

log = logging.getLogger(__name__)

GATE_REFIT_DOCS = 256   # calibration documents (validation split) for refitting merged gates on export


def task_names(cfg: DictConfig) -> tuple[list[str], tuple[str, ...]]:
    """The task config's lm-eval task names and include paths."""
    names = list(cfg.task.names)
    paths = (str(cfg.task.include_path),) if cfg.task.include_path else ()
    return names, paths


def model_config(cfg: DictConfig):
    """The ``model`` group of ``cfg`` as an :class:`eep.models.ModelConfig`."""
    from eep.models import ModelConfig

    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def make_evaluator(cfg: DictConfig, model, tokenizer, role: str):
    """The Evaluator of ``role`` (search, validation or test) for ``cfg``'s tasks, splits and evaluator keys."""
    from eep.evaluate.evaluator import Evaluator

    names, paths = task_names(cfg)
    ev = cfg.evaluator
    limits = {"search": ev.limit, "validation": ev.validation_limit, "test": ev.test_limit}
    overrides = {"search": cfg.task.search_split, "validation": cfg.task.validation_split,
                 "test": cfg.task.report_split}
    weights = OmegaConf.to_container(cfg.task.weights) if cfg.task.weights else None
    return Evaluator(model, tokenizer, names, role=role, limit=limits[role], batch_size=ev.batch_size,
                     include_paths=paths, split_overrides=overrides, split_seed=ev.split_seed, weights=weights,
                     num_fewshot=ev.num_fewshot, apply_chat_template=ev.apply_chat_template,
                     progress=ev.progress and role == "search")


def fitness_kind(cfg: DictConfig, evaluator) -> str:
    """``search.fitness`` as it runs on ``evaluator``'s tasks: ``auto`` is ``match+likelihood`` where every task
    allows it (:func:`~eep.evaluate.dense.match_refusal`: generation scored by plain exact match, greedy), else
    ``task+likelihood`` (the same fitness values at about 2.3x the forward tokens and 3.4x the seconds on the
    shipped models; docs/results.md)."""
    kind = cfg.search.get("fitness", "task")
    if kind != "auto":
        return kind
    from eep.evaluate.dense import MATCH, match_refusal

    reason = match_refusal(evaluator)
    if reason is not None:
        log.info("search.fitness=auto: task+likelihood (%s, so not %s)", reason, MATCH)
    return MATCH if reason is None else "task+likelihood"


def fitness_scorer(cfg: DictConfig, evaluator):
    """What scores a candidate on the search split (``search.fitness``, :func:`fitness_kind`): ``evaluator``
    itself (``task``, the task's metric), a :class:`~eep.evaluate.dense.DenseFitness` on its documents
    (``likelihood``, ``agreement``, ``match+likelihood``: exact match and likelihood from one teacher-forced forward)
    or the task's metric with a dense tie-break (``task+likelihood``, ``task+agreement``:
    :class:`~eep.evaluate.dense.Blend`), built now, on the unpatched model, since agreement reads the full model's
    side once."""
    kind = fitness_kind(cfg, evaluator)
    if kind == "task":
        return evaluator
    from eep.evaluate.dense import Blend, DenseFitness

    dense = DenseFitness(evaluator, kind.removeprefix("task+"), batch_size=cfg.evaluator.batch_size)
    return Blend(evaluator, dense) if kind.startswith("task+") else dense


class Session:
    """One loaded model with its tokenizer and materialiser, and (``search=True``) its search-split fitness:
    what a serial search holds, what every Ray worker builds from the same config (:func:`replica_scorer`), and
    what ``eep-compare`` and ``eep-export`` score and export with."""

    def __init__(self, cfg: DictConfig, search: bool = True, loaded: Session | None = None):
        """``loaded``: a session of the same model config whose model, tokenizer and materialiser are reused
        (restored to the original weights first) instead of loading the model a second time (``eep-compare``'s
        search rows); another model config loads its own."""
        from eep.materialize import Materializer
        from eep.models import load_model

        self.cfg = cfg
        if loaded is not None and model_config(loaded.cfg) == model_config(cfg):
            loaded.mat.restore()
            self.model, self.tok, self.mat = loaded.model, loaded.tok, loaded.mat
        else:
            self.model, self.tok = load_model(model_config(cfg))
            self.mat = Materializer(self.model)
        self.search_tasks = self.evaluator("search") if search else None   # the task's metric on the search split
        self.searcher = fitness_scorer(cfg, self.search_tasks) if search else None
        self.slicer = None   # racing's first stage: the same fitness on the first documents of the search split

    def evaluator(self, role: str):
        """A new Evaluator of ``role`` on this session's model (:func:`make_evaluator`)."""
        return make_evaluator(self.cfg, self.model, self.tok, role)

    def score(self, genome, stage: str | None = None) -> Score:
        """``genome`` applied and scored on the search split (:func:`eep.search.run.score`); ``stage="slice"``:
        on its first ``search.racing.slice`` share of documents only (``fidelity`` records the share)."""
        if stage is None:
            return score(self.mat, self.searcher, genome)
        if self.slicer is None:
            share = float(self.cfg.search.racing.slice)
            limit = self.cfg.evaluator.limit or max(self.search_tasks.documents().values())
            sliced = OmegaConf.create(OmegaConf.to_container(self.cfg))
            sliced.evaluator.limit = max(1, math.ceil(share * limit))
            self.slicer = fitness_scorer(sliced, make_evaluator(sliced, self.model, self.tok, "search"))
            self.slice_share = sliced.evaluator.limit / limit
        result = score(self.mat, self.slicer, genome)
        result.fidelity = self.slice_share
        return result

    def gate_calibration(self, validator=None) -> dict:
        """The tokens merged gates are refit on at export: the first :data:`GATE_REFIT_DOCS` requests of the
        validation split (``validator``, or a new validation Evaluator), the same for ``eep-search`` and
        ``eep-export``."""
        from eep.evaluate.calibration import calibration_tokens

        return calibration_tokens(validator or self.evaluator("validation"), self.tok, n=GATE_REFIT_DOCS)


def replica_scorer(cfg: dict):
    """Run once in each Ray worker: a :class:`Session` of the (resolved, plain) config; its ``score``."""
    return Session(OmegaConf.create(cfg)).score


def pool(cfg: DictConfig, session: Session | None):
    """The serial pool over ``session``, or a RayPool of ``evaluator.workers`` sessions (a context manager)."""
    from eep.search.loop import SerialPool

    ev = cfg.evaluator
    if ev.workers == 1:
        return contextlib.nullcontext(SerialPool(session.score))
    from eep.parallel import RayPool

    build = functools.partial(replica_scorer, OmegaConf.to_container(cfg, resolve=True))
    gpu = cfg.model.device != "cpu" or cfg.model.device_map is not None
    return RayPool(build, ev.workers, ev.threads, ev.ray_address, gpus=gpu)
