"""Calibration token batches: a task's search split (through an Evaluator) or the mixed-skills corpus."""
from __future__ import annotations

import logging

from eep.evaluate.calibration import calibration_tokens, encode
from eep.tasks.generate import read_split
from eep.tasks.skills import SKILLS

log = logging.getLogger(__name__)

MIXED = "skills_all"


def mixed_skills_texts(n: int = 64, split: str = "search") -> list[str]:
    """``n`` documents of the shipped ``skills_all`` tasks' ``split``, the six skills interleaved, each written as the
    models are trained on it: ``prompt + answer + "\\n"``."""
    docs = {skill: read_split(skill, split) for skill in SKILLS}
    picked = [docs[SKILLS[i % len(SKILLS)]][i // len(SKILLS)] for i in range(n)]
    return [d["prompt"] + d["answer"] + "\n" for d in picked]


def calibration_batch(model, tokenizer, source=MIXED, *, n: int = 64) -> dict:
    """``{"input_ids", "attention_mask": long[n, S]}`` on the model's device, right-padded.

    ``source``: ``"skills_all"`` (task-agnostic: the mixed-skills corpus, :func:`mixed_skills_texts`), a task name
    (task-specific: its search split with answers, through an :class:`~eep.evaluate.evaluator.Evaluator` and
    :func:`eep.evaluate.calibration.calibration_tokens`), or an Evaluator already built (its role's documents).
    """
    if source == MIXED:
        return encode(tokenizer, mixed_skills_texts(n), next(model.parameters()).device)
    evaluator = source
    if isinstance(source, str):
        from eep.evaluate.evaluator import Evaluator

        evaluator = Evaluator(model, tokenizer, [source], role="search", limit=n)
    log.info("calibration: %d documents of %s (%s split)", n, list(evaluator.tasks), evaluator.role)
    return calibration_tokens(evaluator, tokenizer, n)
