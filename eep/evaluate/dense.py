"""Dense, cheap search fitness: one teacher-forced forward per document instead of the task's own metric.

``search.fitness=likelihood``: the reference answers' likelihood, the mean over answer tokens of ``p(token)`` given
everything before it (generation tasks: the document's target after its prompt; multiple-choice tasks: the gold
choice after its context), continuous where exact match is flat, and no generation loop (the arithmetic mean of
the probabilities, not ``exp`` of the mean log-probability, which is 0 to four digits for most bad candidates).
``search.fitness=agreement``: label-free, the mean over answer positions of ``sum_v min(p_v, q_v)``, the overlap of
the candidate's next-token distribution ``p`` with the full model's ``q`` (EvoESAP, arXiv 2603.06003), teacher-forced on the task's prompts followed by the
full model's own greedy answers (generation tasks) or by every choice (multiple-choice tasks). The full model's side
(its answers and, per position, its top-``K`` probabilities plus the remaining mass) is computed once, when the
scorer is built, on the unpatched model: ``sum_v min(p_v, q_v)`` is then taken over ``q``'s top ``K`` tokens plus
``min(p_rest, q_rest)`` for the rest (exact when ``K`` covers the vocabulary). Both lie in [0, 1] (1: the full model
itself, for agreement), the units the EEP strategy's margins are set in. Per task the mean over its documents'
answer positions; tasks weighted as the Evaluator weights them.
``search.fitness=match+likelihood``: the task's exact match read off the same single teacher-forced forward, plus
:data:`BLEND_WEIGHT` times the likelihood: a generation document matches when, fed its reference answer after
the prompt (the prompt's tokens exactly as generation encodes them), the greedy token (argmax) is the reference's at
every answer position and a stop string's token right after it (no stop needed where the answer fills
``max_gen_toks``). That is what greedy decoding would produce up to near-ties of the logits and a non-canonical
tokenisation of the same string (both rare: no document differed in ``bench/match_fitness.py``, docs/results.md),
at the cost of one forward instead of a generation loop plus a forward. For generation tasks scored by plain
``exact_match`` (no filters or options), greedy, with single-token stop strings; other tasks are refused with the
reason (:func:`match_refusal`).
``search.fitness=task+likelihood`` (or ``task+agreement``): :class:`Blend`, the task's metric plus
:data:`BLEND_WEIGHT` times the dense fitness, which orders candidates the metric ties (exact match on 100 documents
moves in steps of 0.01 and plateaus at a seed's value) at the cost of one extra teacher-forced forward.
docs/methods.md section 7.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eep.errors import UserError
from eep.evaluate.calibration import reference_answer
from eep.evaluate.generation import is_greedy, single_token_ids
from eep.evaluate.score import WORST_FITNESS, Score

MATCH = "match+likelihood"
KINDS = ("likelihood", "agreement", MATCH)
log = logging.getLogger(__name__)
BLEND_WEIGHT = 0.01   # task+<dense>: at most one document's worth of exact match on 100 documents


@dataclass
class _Batch:
    ids: torch.Tensor        # long[B, S], right-padded
    mask: torch.Tensor       # long[B, S]
    rows: torch.Tensor       # long[N]: batch row of each scored position
    cols: torch.Tensor       # long[N]: the position whose logits predict the token
    targets: torch.Tensor    # long[N]: the token predicted (likelihood)
    task: torch.Tensor       # long[N]: index of the position's task
    stop: torch.Tensor | None = None   # bool[N] (match): the position after an answer, which must predict a stop
    stops: torch.Tensor | None = None  # long[N, K] (match): per position, the token ids of its stop strings,
                                       # padded with -1 (all -1 where no stop is accepted or none is asked)


class DenseFitness:
    """``evaluate()`` -> :class:`Score` of the model as it is now, from one teacher-forced pass over ``evaluator``'s
    documents (an :class:`~eep.evaluate.evaluator.Evaluator` built on the unpatched model: its requests, tasks and
    weights). ``kind``: ``likelihood`` or ``agreement``; ``top``: ``K``, the full model's probabilities kept per
    position. ``forward_tokens``: token positions one evaluation runs through the model."""

    def __init__(self, evaluator, kind: str, *, batch_size: int = 64, top: int = 64):
        if kind not in KINDS:
            raise ValueError(f"search.fitness={kind!r}: use task, {', '.join(KINDS)}")
        self.evaluator, self.kind, self.model = evaluator, kind, evaluator.model
        self.tasks, self.requests, self.role = evaluator.tasks, evaluator.requests, evaluator.role
        self.names = list(evaluator.tasks)
        weights = {name: sum(w for (t, _), w in evaluator.weights.items() if t == name) for name in self.names}
        total = sum(weights.values()) or 1.0
        self.task_weights = torch.tensor([weights[n] / total for n in self.names], dtype=torch.float64)
        pairs = self._pairs()
        self.batches = self._layout(pairs, batch_size)
        self.forward_tokens = int(sum(b.ids.numel() for b in self.batches))
        self.reference = self._reference(top) if kind == "agreement" else None

    # ------------------------------------------------------------------ set-up (once)
    def _pairs(self) -> list[tuple]:
        """``(task index, context ids, answer ids)`` per scored sequence; with ``match``, also its stop token
        ids (a tuple; ``()`` where none is needed, ``None`` where the answer cannot be generated whole)."""
        if self.kind == MATCH:
            return self._match_pairs()
        tok, out = self.evaluator.lm.tokenizer, []
        answers = self._full_answers() if self.kind == "agreement" else None
        for inst_i, inst in enumerate(self.requests.get("generate_until", [])):
            task = self.tasks[inst.task_name]
            answer = answers[inst_i] if answers is not None else reference_answer(task, inst.doc)
            out.append((self.names.index(inst.task_name), inst.args[0], answer))
        for inst in self.requests.get("loglikelihood", []):
            if self.kind == "likelihood" and inst.idx != _gold_index(self.tasks[inst.task_name], inst.doc):
                continue
            out.append((self.names.index(inst.task_name), inst.args[0], inst.args[1]))
        encoded = []
        for task, context, answer in out:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            ans = tok(answer, add_special_tokens=False)["input_ids"]
            if ans:
                encoded.append((task, ctx, ans))
        return encoded

    def _match_pairs(self) -> list[tuple]:
        reason = match_refusal(self.evaluator)
        if reason is not None:
            raise UserError(f"search.fitness={MATCH}: {reason}; use task+likelihood (or auto)")
        gen, lm, out = self.evaluator.generation_scorer(), self.evaluator.lm, []
        for inst, (prompt, batch) in zip(self.requests["generate_until"], gen.prompts(), strict=True):
            stop_ids = single_token_ids(lm.tokenizer, batch.until)
            answer = reference_answer(self.tasks[inst.task_name], inst.doc)
            ans = lm.tok_encode(inst.args[0] + answer)[len(lm.tok_encode(inst.args[0])):] if answer else []
            room = batch.max_length - batch.ids.shape[1]
            stop = tuple(stop_ids) if len(ans) < room else (() if len(ans) == room else None)
            if ans and any(u in answer for u in batch.until):
                stop = None   # generation would be cut inside the answer
            out.append((self.names.index(inst.task_name), prompt, ans, stop))
        return out

    def _full_answers(self) -> list[str]:
        """The full model's greedy answers to the generation requests, as the Evaluator generates them."""
        reqs = self.requests.get("generate_until", [])
        if not reqs:
            return []
        gen = self.evaluator.generation_scorer()
        texts = gen.run(False) if gen is not None else self.evaluator.lm.generate_until(reqs, disable_tqdm=True)
        return [t if t.strip() else "\n" for t in texts]

    def _layout(self, pairs, batch_size: int) -> list[_Batch]:
        pad = self.evaluator.lm.tokenizer.pad_token_id or 0
        device = next(self.model.parameters()).device
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][1]) + len(pairs[i][2])))
        batches = []
        for start in range(0, len(order), batch_size):
            chunk = [pairs[i] for i in order[start:start + batch_size]]
            width = max(len(p[1]) + len(p[2]) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            rows, cols, targets, tasks, stop, stops = [], [], [], [], [], []
            for r, (task, ctx, ans, *ends) in enumerate(chunk):
                seq = ctx + ans
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
                for j, token in enumerate(ans):
                    rows.append(r), cols.append(len(ctx) + j - 1), targets.append(token), tasks.append(task)
                    stop.append(False), stops.append(())
                if ends and ends[0] != ():   # match: the position after the answer must predict a stop token
                    rows.append(r), cols.append(len(seq) - 1), targets.append(pad), tasks.append(task)
                    stop.append(True), stops.append(ends[0] if ends[0] is not None else ())
            batch = _Batch(ids.to(device), mask.to(device), torch.tensor(rows), torch.tensor(cols),
                           torch.tensor(targets), torch.tensor(tasks))
            if self.kind == MATCH:
                width = max(map(len, stops), default=0) or 1
                batch.stop = torch.tensor(stop)
                batch.stops = torch.tensor([list(ids_) + [-1] * (width - len(ids_)) for ids_ in stops],
                                           dtype=torch.long).reshape(len(stops), width)
            batches.append(batch)
        return batches

    @torch.no_grad()
    def _reference(self, top: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per batch, the full model's ``(top-K probabilities float[N, K], their token ids long[N, K], the rest's
        mass float[N])`` at the scored positions."""
        out = []
        for b in self.batches:
            probs = self._probs(b)
            k = min(top, probs.shape[-1])
            values, idx = probs.topk(k, dim=-1)
            out.append((values, idx, (1.0 - values.sum(-1)).clamp(min=0.0)))
        return out

    def _probs(self, b: _Batch) -> torch.Tensor:
        logits = self.model(input_ids=b.ids, attention_mask=b.mask).logits
        return F.softmax(logits[b.rows.to(logits.device), b.cols.to(logits.device)].double(), dim=-1).cpu()

    # ------------------------------------------------------------------ per candidate
    @torch.no_grad()
    def evaluate(self) -> Score:
        """The fitness of the model as it is now; never raises for a failing candidate (worst fitness, reason)."""
        start = time.perf_counter()
        try:
            sums = torch.zeros((2, len(self.names)), dtype=torch.float64)    # [dense, match] sums per task
            counts = torch.zeros((2, len(self.names)), dtype=torch.float64)
            for i, b in enumerate(self.batches):
                probs = self._probs(b)
                if not torch.isfinite(probs).all():
                    return Score(WORST_FITNESS, {}, "non-finite logits", time.perf_counter() - start)
                scored = ~b.stop if b.stop is not None else torch.ones(len(b.task), dtype=torch.bool)
                sums[0].index_add_(0, b.task[scored], self._values(i, b, probs)[scored])
                counts[0].index_add_(0, b.task[scored], torch.ones(int(scored.sum()), dtype=torch.float64))
                if b.stop is not None:
                    task, matched = _matches(b, probs)
                    sums[1].index_add_(0, task, matched)
                    counts[1].index_add_(0, task, torch.ones(len(task), dtype=torch.float64))
            per_task = sums / counts.clamp(min=1)
            if self.kind == MATCH:
                fitness = float(((per_task[1] + BLEND_WEIGHT * per_task[0]) * self.task_weights).sum())
                metrics = {name: {"exact_match_forced": float(m), "likelihood": float(v)}
                           for name, v, m in zip(self.names, per_task[0], per_task[1])}
            else:
                fitness = float((per_task[0] * self.task_weights).sum())
                metrics = {name: {self.kind: float(v)} for name, v in zip(self.names, per_task[0])}
            if not math.isfinite(fitness):
                return Score(WORST_FITNESS, metrics, "non-finite fitness", time.perf_counter() - start)
            return Score(fitness, metrics, None, time.perf_counter() - start, forward_tokens=self.forward_tokens)
        except Exception as err:  # containment: one bad candidate must not end a search
            log.warning("candidate evaluation failed: %r", err)
            return Score(WORST_FITNESS, {}, f"{type(err).__name__}: {err}", time.perf_counter() - start)

    def _values(self, i: int, b: _Batch, probs: torch.Tensor) -> torch.Tensor:
        """Per scored position: ``p(target)`` (likelihood, match) or ``sum_v min(p_v, q_v)`` (agreement)."""
        if self.kind != "agreement":
            return probs.gather(1, b.targets[:, None])[:, 0]
        q, idx, rest = self.reference[i]
        p = probs.gather(1, idx)
        return torch.minimum(p, q).sum(-1) + torch.minimum((1.0 - p.sum(-1)).clamp(min=0.0), rest)


def _matches(b: _Batch, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(task index long[B], matched float[B])`` of a match batch's documents (one per row): 1 where the argmax is
    the reference token at every answer position and a stop token at the stop position, else 0."""
    greedy = probs.argmax(-1)
    stop_ok = (b.stops == greedy[:, None]).any(-1)
    ok = torch.where(b.stop, stop_ok, greedy == b.targets)
    rows = b.ids.shape[0]
    wrong = torch.zeros(rows, dtype=torch.long).index_add_(0, b.rows, (~ok).long())
    task = torch.zeros(rows, dtype=torch.long).index_put_((b.rows,), b.task)
    return task, (wrong == 0).double()


class Blend:
    """``evaluate()`` -> Score with ``fitness = task + weight * dense`` (``task``: the Evaluator, ``dense``: a
    :class:`DenseFitness` on its documents); metrics of both, forward tokens and seconds summed. A failed task
    evaluation is returned as it is (the dense pass is not run)."""

    def __init__(self, task, dense: DenseFitness, weight: float = BLEND_WEIGHT):
        self.task, self.dense, self.weight = task, dense, weight

    def __getattr__(self, name):   # tasks, requests, role, ... of the task's Evaluator
        if name in ("task", "dense", "weight"):   # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)

    def evaluate(self) -> Score:
        first = self.task.evaluate()
        if first.error:
            return first
        second = self.dense.evaluate()
        if second.error:
            return second
        fitness = first.fitness + self.weight * second.fitness
        metrics = {name: {**first.metrics.get(name, {}), **second.metrics.get(name, {})}
                   for name in {**first.metrics, **second.metrics}}
        return Score(fitness, metrics, None, first.seconds + second.seconds,
                     forward_tokens=first.forward_tokens + second.forward_tokens)


def _gold_index(task, doc) -> int:
    """A multiple-choice document's gold choice index (the first of several)."""
    gold = task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold[0] if isinstance(gold, list) else gold)


def match_refusal(evaluator) -> str | None:
    """Why ``match+likelihood`` cannot score ``evaluator``'s tasks (None where it can): each must be a generation
    task scored by plain ``exact_match`` (no filters or options) against one reference answer per document, decoded
    greedily, with single-token stop strings, through eep's own generation batches."""
    lls = evaluator.requests.get("loglikelihood")
    if lls:
        return f"{', '.join(sorted({i.task_name for i in lls}))} is scored by loglikelihood, not generation"
    for name, task in evaluator.tasks.items():
        metrics = task.config.metric_list or [{"metric": "exact_match"}]
        options = [{k: v for k, v in m.items() if k not in ("metric", "aggregation", "higher_is_better")}
                   for m in metrics]
        if [m["metric"] for m in metrics] != ["exact_match"] or any(options) or task.config.filter_list:
            return (f"task {name} is not scored by plain exact_match (metrics {[m['metric'] for m in metrics]}, "
                    f"options {options}, filters {bool(task.config.filter_list)})")
    for inst in evaluator.requests.get("generate_until", []):
        target = evaluator.tasks[inst.task_name].doc_to_target(inst.doc)
        if isinstance(target, list) and len(target) > 1:
            return f"task {inst.task_name} has documents with several reference answers (exact match takes any)"
    gen = evaluator.generation_scorer()
    if gen is None:
        return "generation runs through lm-eval's HFLM here (a seq2seq model, think_end_token or batch_size=auto)"
    for batch in gen.batches:
        if not is_greedy(batch.kwargs):
            return f"generation samples ({batch.kwargs})"
        if single_token_ids(evaluator.lm.tokenizer, batch.until) is None:
            return f"a stop string of {batch.until} is more than one token"
    return None
