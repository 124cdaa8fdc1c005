"""One candidate's evaluation, the single result type of the evaluator, the search loop and its workers."""
from __future__ import annotations

from dataclasses import dataclass, field

WORST_FITNESS = -1.0   # the fitness of a candidate that could not be scored


@dataclass
class Score:
    """One evaluation: ``fitness`` (the weighted sum of the tasks' metrics, higher is better; :data:`WORST_FITNESS`
    for a failed candidate), ``metrics[task][metric]`` in lm-eval's 0-1 units (groups included), ``error`` (None,
    or why it failed), ``seconds`` (apply + score), ``applied`` (False if the materialiser refused the genome) and
    ``forward_tokens``, the cost: token positions run through the model (batch x width of every forward, prompts
    and generated tokens; padding included, since it is computed)."""

    fitness: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    applied: bool = True
    forward_tokens: int = 0
    fidelity: float = 1.0   # the share of the search documents it was scored on (racing's slice: < 1)

    @property
    def raised(self) -> bool:
        """Whether the evaluation failed by raising (or the genome was refused); NaN/inf logits (``non-finite ...``,
        which merging can legitimately produce) are a scored candidate, not a failure."""
        return bool(self.error) and not str(self.error).startswith("non-finite")
