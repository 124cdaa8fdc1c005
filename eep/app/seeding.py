"""A search's first generation: the genomes of the cheap statistics (one calibration pass) and of other methods.

``search.init_from`` (default ``[reap, soft_activation, frequency, enumeration, enumeration_progressive]``) names
the methods; the EEP strategy fills the rest of its first generation with random subsets. ``frequency``,
``soft_activation`` and ``reap`` come from one pass over the search split's first ``evaluator.limit`` documents
(``eep.methods.expert_scores``), saved to the run folder as ``statistics.safetensors`` and reused without
calibrating by ``statistics=<file>`` (any E' or k', here or in eep-compare). ``enumeration`` and
``enumeration_progressive`` run only where they score at most :data:`ENUMERATION_LIMIT` subsets per layer
(exhaustively, or by greedy elimination where ``C(E, E')`` is larger: ``eep.methods.enumeration.subsets_scored``;
logged otherwise). With depth groups (``search.layer_groups`` a number) a statistic keeps the experts of highest
score summed over the group's layers, and a per-layer genome the experts its layers keep most often.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from omegaconf import DictConfig

from eep.genome import Genome
from eep.settings import init_methods

log = logging.getLogger("eep.search")

ENUMERATION_LIMIT = 10_000   # subsets scored per layer above which enumeration is left out of the first generation
STATISTICS_FILE = "statistics.safetensors"


def seed_genomes(cfg: DictConfig, session, template: Genome, run_dir: Path) -> list[tuple[str, Genome]]:
    """``(method, genome)`` per method of ``search.init_from`` that applies here, duplicates (by hash) dropped."""
    from eep.methods import compute
    from eep.methods.expert_scores import STATISTICS, genome_from_scores, group_genome

    methods = init_methods(cfg)
    calibration = functools.cache(lambda: _calibration(cfg, session))   # one pass, shared by every method
    subsets, out, seen = _subsets(template, session), [], set()
    scores = _scores(cfg, session, run_dir, [m for m in methods if m in STATISTICS], calibration)
    for method in methods:
        if method in scores:
            genome = genome_from_scores(session.mat, scores[method], template)
        elif method.startswith("enumeration") and (subsets is None or subsets > ENUMERATION_LIMIT):
            log.info("search.init_from: %s left out (it would score %s subsets per layer of C(%d, %d); limit %d)",
                     method, subsets, template.num_experts, template.num_kept, ENUMERATION_LIMIT)
            continue
        else:
            genome = compute(method, session.model, session.mat, calibration(), num_kept=template.num_kept,
                             top_k=template.top_k, seed=cfg.seed).genome
            if genome.is_pruning:
                genome = group_genome(session.mat, genome, template)
        if genome.content_hash() not in seen:
            seen.add(genome.content_hash())
            out.append((method, genome))
    return out


def _subsets(template: Genome, session) -> int | None:
    from eep.methods.enumeration import subsets_scored

    return subsets_scored(template.num_experts, template.num_kept, session.mat.adapter.expert_groups)


def _calibration(cfg: DictConfig, session) -> dict:
    """The search split's first ``evaluator.limit`` (or 64) requests with their answers, as tokens."""
    from eep.methods import calibration_batch

    return calibration_batch(session.model, session.tok, session.search_tasks or session.evaluator("search"),
                             n=cfg.evaluator.limit or 64)


def _scores(cfg: DictConfig, session, run_dir: Path, wanted: list[str], calibration) -> dict:
    """The statistics ``wanted``: from ``statistics=<file>`` if given, else computed on ``calibration()`` (and
    saved in ``run_dir``)."""
    from eep.methods.expert_scores import expert_scores, load_scores, save_scores

    if not wanted:
        return {}
    adapter = session.mat.adapter
    if cfg.get("statistics"):
        scores, info = load_scores(cfg.statistics, len(adapter.layers), adapter.num_experts)
        log.info("statistics from %s (%s)", cfg.statistics, info.get("calibration", "?"))
        return scores
    tokens = calibration()
    scores = expert_scores(session.mat, tokens)
    info = {"model": str(cfg.model.path or cfg.model.name), "calibration": f"{list(cfg.task.names)} search split",
            "requests": int(tokens["input_ids"].shape[0]), "tokens": int(tokens["attention_mask"].sum())}
    save_scores(run_dir / STATISTICS_FILE, scores, info)
    return scores
