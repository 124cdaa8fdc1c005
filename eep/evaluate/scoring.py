"""Model calls for fixed lm-eval requests, laid out once and reproducing ``HFLM``'s batches and results bit for bit.

``LoglikelihoodScorer`` replaces ``HFLM._loglikelihood_tokens`` and ``GenerationScorer`` replaces
``HFLM.generate_until`` for a request list that does not change between candidates: everything that does not depend
on the model's weights (ordering, grouping, padding, token tensors, gather indices, encoded prompts) is computed at
construction, so per candidate only the forwards (or ``generate`` calls) and a few tensor ops per batch run. Both
``build`` classmethods return None for set-ups they do not reproduce; the caller then uses ``HFLM``'s own method.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def _sort_key(request) -> tuple:
    """``HFLM._loglikelihood_tokens``'s Collator sort key: longest context + continuation first, then the tokens."""
    toks = request[1] + request[2]
    return -len(toks), tuple(toks)


def plan_batches(requests: list, batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """The batches ``HFLM._loglikelihood_tokens`` forms (``Collator``, ``group_by="contexts"``).

    Requests sharing ``context + continuation[:-1]`` form one group, run once as its first request with the longest
    continuation (the representative); groups are sorted by :func:`_sort_key` of the representative (stable) and cut
    into ``batch_size`` rows. Returns per batch a list of ``(representative, members)`` request indices, members in
    request order (the representative among them).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        groups.setdefault(tuple(ctx + cont[:-1]), []).append(i)
    reps = [(max(members, key=lambda i: len(requests[i][2])), members) for members in groups.values()]
    reps.sort(key=lambda rep: _sort_key(requests[rep[0]]))
    size = batch_size if batch_size > 0 else max(len(reps), 1)
    return [reps[i:i + size] for i in range(0, len(reps), size)]


@dataclass
class _Part:
    """The requests of one batch whose continuations have ``L`` tokens (``n`` of them); positions are flat rows of
    the batch's ``[B * T, V]`` log-probs."""

    logprob_rows: torch.Tensor  # long [n, L]: rows whose log-prob of the continuation token is summed
    greedy_at: torch.Tensor  # long [n, L]: indices into the batch's ``greedy_rows`` for the is-greedy check
    tokens: torch.Tensor  # long [n, L]: continuation tokens
    out: torch.Tensor  # long [n]: the requests' indices in the caller's list


@dataclass
class _Batch:
    """One forward: ``ids`` long [B, T] (right-padded with 0, as ``pad_and_concat``), the flat rows whose argmax is
    needed ``greedy_rows`` long [U], and the requests it answers by continuation length."""

    ids: torch.Tensor
    greedy_rows: torch.Tensor
    parts: list[_Part]


def _layout(requests: list, chunk: list[tuple[int, list[int]]], max_length: int, device) -> _Batch:
    """Token tensor and gather indices of one batch, exactly as ``HFLM._loglikelihood_tokens`` slices its logits.

    Each representative's input is ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation); its
    continuation logits are rows ``[inplen - contlen, inplen)``. A member with a shorter continuation of ``l``
    tokens reads, as lm-eval's ``torch.gather`` does, the first ``l`` of those rows for its log-prob and the last
    ``l`` for its greedy check.
    """
    inputs = [(requests[rep][1] + requests[rep][2])[-(max_length + 1):][:-1] for rep, _ in chunk]
    width = max(map(len, inputs))
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    by_len: dict[int, tuple[list, list, list, list]] = defaultdict(lambda: ([], [], [], []))
    for b, ((rep, members), inp) in enumerate(zip(chunk, inputs, strict=True)):
        ids[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        end = b * width + len(inp)
        start = end - len(requests[rep][2])
        for m in members:
            cont = requests[m][2]
            rows, greedy, toks, out = by_len[len(cont)]
            rows.append(range(start, start + len(cont)))
            greedy.append(range(end - len(cont), end))
            toks.append(cont)
            out.append(m)
    needed = sorted({r for rows in (v[1] for v in by_len.values()) for rng in rows for r in rng})
    where = {r: i for i, r in enumerate(needed)}
    parts = [_Part(torch.tensor([list(r) for r in rows], device=device),
                   torch.tensor([[where[r] for r in rng] for rng in greedy], device=device),
                   torch.tensor(toks, device=device), torch.tensor(out, device=device))
             for rows, greedy, toks, out in by_len.values()]
    return _Batch(ids.to(device), torch.tensor(needed, device=device), parts)


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    """``values [n, L]`` summed per row, each sum bit-equal to lm-eval's ``.sum()`` over that row alone ([n]).

    On CPU ``sum(dim=1)`` reduces each contiguous row as a lone ``[1, L]`` tensor is reduced (checked in the tests
    for L up to 199); elsewhere each row is summed on its own.
    """
    if values.shape[1] == 1:
        return values[:, 0]
    if values.device.type == "cpu":
        return values.sum(dim=1)
    return torch.stack([row.sum() for row in values])


class LoglikelihoodScorer:
    """``HFLM._loglikelihood_tokens`` for a fixed list of ``((context, continuation), ctx_tokens, cont_tokens)``
    requests, with the same batches, forwards (``lm._model_call``), ``log_softmax`` and per-request sums and
    greedy checks, so each ``(logprob, is_greedy)`` is bit-identical; only the per-request Python work is gone.

    Not reproduced (``build`` returns None, use ``HFLM``'s method): seq2seq models, ``logits_cache=False``,
    ``batch_size="auto"``; rolling loglikelihood requests never come here.
    """

    def __init__(self, lm, batches: list[_Batch], n: int):
        self.lm, self.batches, self.n = lm, batches, n

    @classmethod
    def build(cls, lm, requests: list) -> LoglikelihoodScorer | None:
        if lm.backend != "causal" or not lm.logits_cache or not isinstance(lm.batch_size, int):
            return None
        for _, ctx, cont in requests:
            if not ctx or not cont or len(cont) > lm.max_length:
                raise ValueError(f"loglikelihood request with {len(ctx)} context and {len(cont)} continuation "
                                 f"tokens (max length {lm.max_length})")
        batches = [_layout(requests, chunk, lm.max_length, lm.device)
                   for chunk in plan_batches(requests, lm.batch_size)]
        return cls(lm, batches, len(requests))

    def run(self, progress: bool = False) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, whether every continuation token is the argmax)`` per request."""
        return self.run_tensors(progress).pairs()

    def run_tensors(self, progress: bool = False) -> LoglikelihoodResults:
        """:meth:`run`'s results as two tensors, without building a Python pair per request."""
        values = greedy = None
        for batch in tqdm(self.batches, disable=not progress, desc="loglikelihood batches"):
            logp = F.log_softmax(self.lm._model_call(batch.ids), dim=-1, dtype=self.lm.softmax_dtype)
            flat = logp.reshape(-1, logp.shape[-1])  # [B * T, V]
            argmax = flat[batch.greedy_rows].argmax(dim=-1)  # [U]
            if values is None:
                values = torch.empty(self.n, dtype=logp.dtype, device=logp.device)
                greedy = torch.empty(self.n, dtype=torch.bool, device=logp.device)
            for part in batch.parts:
                values[part.out] = _row_sums(flat[part.logprob_rows, part.tokens])
                greedy[part.out] = (argmax[part.greedy_at] == part.tokens).all(dim=1)
        if values is None:
            return LoglikelihoodResults(torch.empty(0), torch.empty(0, dtype=torch.bool))
        return LoglikelihoodResults(values, greedy)


@dataclass
class LoglikelihoodResults:
    """Per request of a :class:`LoglikelihoodScorer`: ``values`` (sum of continuation log-probs) and ``greedy``
    (every continuation token is the argmax), as tensors ``[n]``."""

    values: torch.Tensor
    greedy: torch.Tensor

    @classmethod
    def from_pairs(cls, pairs: list[tuple[float, bool]]) -> LoglikelihoodResults:
        """From ``HFLM._loglikelihood_tokens``'s list (float64 holds every Python float exactly)."""
        return cls(torch.tensor([v for v, _ in pairs], dtype=torch.float64),
                   torch.tensor([g for _, g in pairs], dtype=torch.bool))

    def pairs(self) -> list[tuple[float, bool]]:
        """``HFLM._loglikelihood_tokens``'s ``(float, bool)`` per request."""
        return list(zip(self.values.tolist(), self.greedy.tolist(), strict=True))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``values`` as float64 (exact: the Python floats of :meth:`pairs`) and ``greedy`` as bool numpy arrays."""
        return self.values.detach().double().cpu().numpy(), self.greedy.detach().cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Per-document metrics, vectorised
#
# ``ConfigurableTask.process_results`` runs per document and candidate (numpy on a handful of values, ~35-60 us per
# document); for the metrics below the same per-document values come out of a few array operations over all of a
# task's documents at once. Everything that depends on the documents alone (gold indices, choice lengths, which
# requests belong to which document, rendered targets) is computed once. What is not reproduced here exactly
# (``task_metrics`` returns None) goes through lm-eval's own ``process_results``; aggregation is always lm-eval's.

#: Per output type, the metrics ``ConfigurableTask.process_results`` emits that are computed here, in its order.
CHOICE_METRICS = ("acc", "f1", "mcc", "acc_norm", "acc_bytes", "exact_match")
LOGLIKELIHOOD_METRICS = ("perplexity", "acc")
GENERATION_METRICS = ("exact_match",)
_EXACT_MATCH_KWARGS = {"regexes_to_ignore", "ignore_case", "ignore_punctuation", "ignore_numbers"}


def task_metrics(task, doc_instances: list[tuple[object, list]], loglikelihood_requests: list):
    """The vectorised ``process_results`` of ``task`` (a :class:`ChoiceMetrics`, :class:`LoglikelihoodMetrics` or
    :class:`GenerationMetrics`), or None where lm-eval's own must run: a task class or config with its own
    ``process_results``, a metric or filter not reproduced here, documents whose gold is not a valid choice (lm-eval
    warns for those, per call), mutual-information or multiple-target generation set-ups.

    ``doc_instances``: ``(doc, instances in request order)`` per document, as ``lm_eval.evaluator.evaluate`` pairs
    them; ``loglikelihood_requests``: the evaluator's loglikelihood instances, in the order of the results it gets.
    """
    from lm_eval.api.task import ConfigurableTask

    if (not isinstance(task, ConfigurableTask) or type(task).process_results is not ConfigurableTask.process_results
            or callable(task.config.process_results) or not doc_instances):
        return None
    builder = {"multiple_choice": ChoiceMetrics, "loglikelihood": LoglikelihoodMetrics,
               "generate_until": GenerationMetrics}.get(task.OUTPUT_TYPE)
    try:
        return builder and builder.build(task, doc_instances, loglikelihood_requests)
    except Exception:  # anything unexpected in a task's documents: lm-eval's own code decides (and reports) it
        return None


def _default_filters(task) -> bool:
    """Whether the task's only filter is lm-eval's default ``none`` = ``take_first`` (so a document's filtered
    responses are its instances' first responses)."""
    from lm_eval.filters.selection import TakeFirstFilter

    filters = getattr(task, "_filters", None)
    return (task.config.filter_list is None and filters is not None and len(filters) == 1
            and filters[0].name == "none" and len(filters[0].filters) == 1
            and getattr(filters[0].filters[0], "func", None) is TakeFirstFilter
            and not getattr(filters[0].filters[0], "args", ()) and not getattr(filters[0].filters[0], "keywords", {}))


def _metrics(task, known: tuple[str, ...]) -> list[str] | None:
    """The task's metrics in ``process_results``'s order, or None if it uses one not in ``known``."""
    used = list(task._metric_fn_list)
    return [m for m in known if m in used] if set(used) <= set(known) else None


def _plan(task, known: tuple[str, ...], loglikelihood_requests: list) -> tuple[list[str], dict[int, int]] | None:
    """A loglikelihood task's metrics (:func:`_metrics`) and the position of each request among the results, or
    None where its metrics or filters are not reproduced."""
    metrics = _metrics(task, known)
    if metrics is None or not _default_filters(task):
        return None
    return metrics, {id(inst): i for i, inst in enumerate(loglikelihood_requests)}


class LoglikelihoodMetrics:
    """``process_results`` of ``output_type: loglikelihood`` (one request per document): ``perplexity`` is the
    log-likelihood, ``acc`` whether the continuation is greedy."""

    def __init__(self, metrics: list[str], index: torch.Tensor):
        self.metrics, self.index = metrics, index

    @classmethod
    def build(cls, task, doc_instances, loglikelihood_requests):
        plan = _plan(task, LOGLIKELIHOOD_METRICS, loglikelihood_requests)
        if plan is None or any(len(insts) != 1 for _, insts in doc_instances):
            return None
        metrics, where = plan
        return cls(metrics, torch.tensor([where[id(insts[0])] for _, insts in doc_instances], dtype=torch.long))

    def collect(self, raw: dict, results: LoglikelihoodResults | None) -> bool:
        index = self.index.to(results.values.device)
        values, greedy = results.values[index].tolist(), results.greedy[index].int().tolist()
        for metric in self.metrics:
            raw[(metric, "none")] = values if metric == "perplexity" else greedy
        return True


class ChoiceMetrics:
    """``process_results`` of ``output_type: multiple_choice`` for ``acc``, ``acc_norm``, ``acc_bytes``,
    ``exact_match``, ``f1`` and ``mcc``, for all documents at once.

    The documents' log-likelihoods are laid out ``[D, C]`` (C: the most choices; missing ones ``-inf``, which never
    beat a real choice and leave ``argmax`` of a row what it is for the row alone, NaN included); each prediction is
    numpy's ``argmax`` of the same float64 values lm-eval divides and compares, so every per-document value is
    lm-eval's.
    """

    def __init__(self, metrics, index, valid, char_len, byte_len, gold_mask, golds):
        self.metrics, self.index, self.valid = metrics, index, valid
        self.char_len, self.byte_len, self.gold_mask, self.golds = char_len, byte_len, gold_mask, golds
        self.rows = np.arange(len(index))

    @classmethod
    def build(cls, task, doc_instances, loglikelihood_requests):
        plan = _plan(task, CHOICE_METRICS, loglikelihood_requests)
        if plan is None:
            return None
        metrics, where = plan
        width = max(len(insts) for _, insts in doc_instances)
        shape = (len(doc_instances), width)
        index, valid = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=bool)
        char_len, byte_len = np.ones(shape), np.ones(shape)
        gold_mask, golds = np.zeros(shape, dtype=bool), []
        for d, (doc, insts) in enumerate(doc_instances):
            choices = task.doc_to_choice(doc)
            if (not isinstance(choices, list) or len(choices) != len(insts)
                    or not all(isinstance(c, str) for c in choices)):
                return None
            gold = _gold(task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc), choices,
                         bool(task.multiple_target))
            if gold is None:
                return None
            n = len(choices)
            index[d, :n], valid[d, :n] = [where[id(inst)] for inst in insts], True
            char_len[d, :n] = [float(len(c)) for c in choices]
            byte_len[d, :n] = [float(len(c.encode("utf-8"))) for c in choices]
            gold_mask[d, gold if isinstance(gold, list) else [gold]] = True
            golds.append(gold)
        return cls(metrics, index, valid, char_len, byte_len, gold_mask, golds)

    def collect(self, raw: dict, results: LoglikelihoodResults | None) -> bool:
        values, greedy = results.arrays()
        lls = np.where(self.valid, values[self.index], -np.inf)
        out = {}
        for metric in self.metrics:
            if metric in ("acc", "f1", "mcc") and "pred" not in out:
                out["pred"] = lls.argmax(axis=1)
            if metric == "acc":
                out[metric] = self.gold_mask[self.rows, out["pred"]].astype(np.float64).tolist()
            elif metric in ("f1", "mcc"):
                out[metric] = list(zip(self.golds, out["pred"], strict=True))
            elif metric in ("acc_norm", "acc_bytes"):
                pred = (lls / (self.char_len if metric == "acc_norm" else self.byte_len)).argmax(axis=1)
                out[metric] = self.gold_mask[self.rows, pred].astype(np.float64).tolist()
            elif metric == "exact_match":
                hit = (greedy[self.index] & self.valid & self.gold_mask).any(axis=1)
                out[metric] = hit.astype(np.int64).tolist()
        for metric in self.metrics:
            raw[(metric, "none")] = out[metric]
        return True


def _gold(gold, choices: list[str], multiple_target: bool):
    """The document's gold choice index (a list of them for multiple targets), exactly as ``process_results``
    reads it; None where lm-eval would flag an invalid label or behave otherwise than a valid index (its own code
    then runs, and warns)."""
    if multiple_target:
        if not isinstance(gold, list) or not all(type(g) is int and 0 <= g < len(choices) for g in gold):
            return None
        return list(gold)
    if type(gold) is str:
        return choices.index(gold) if gold in choices else None
    return gold if type(gold) is int and 0 <= gold < len(choices) else None


class GenerationMetrics:
    """``process_results`` of ``output_type: generate_until`` for lm-eval's ``exact_match`` (with any of its
    ``regexes_to_ignore``, ``ignore_case``, ``ignore_punctuation``, ``ignore_numbers``) under any filters (lm-eval's
    own filters run first): one comparison over all documents' filtered responses and targets."""

    def __init__(self, task, docs, references, kwargs):
        self.task, self.docs, self.kwargs = task, docs, kwargs
        self.references = _exact_match_side(references, **kwargs)  # the targets as compared, computed once

    @classmethod
    def build(cls, task, doc_instances, loglikelihood_requests):
        from lm_eval.api.metrics import exact_match_fn

        if (_metrics(task, GENERATION_METRICS) != ["exact_match"] or task.multiple_target
                or task._metric_fn_list["exact_match"] is not exact_match_fn):
            return None
        kwargs = dict(task._metric_fn_kwargs.get("exact_match", {}))
        regexes = kwargs.get("regexes_to_ignore")
        if not set(kwargs) <= _EXACT_MATCH_KWARGS or (regexes is not None and not list(regexes)):
            return None  # an empty regex list leaves lm-eval comparing Python lists: not reproduced
        references = []
        for doc, insts in doc_instances:
            if len(insts) != 1:
                return None
            gold = task.doc_to_target(doc)
            if task.config.doc_to_choice is not None:
                gold = task.doc_to_choice(doc)[gold]
                if type(gold) is not str:
                    return None  # lm-eval casts no choice; a non-string one is not reproduced
            # process_results casts a target of another type to the response's, ``str`` (checked per call)
            references.append(gold if type(gold) is str else str(gold))
        return cls(task, doc_instances, references, kwargs)

    def collect(self, raw: dict, results: LoglikelihoodResults | None = None) -> bool:
        """Apply the task's filters (lm-eval's code) and add ``exact_match`` per filter; False (nothing added) if a
        filtered response is not a ``str`` (lm-eval's own ``process_results`` must then decide)."""
        self.task.apply_filters()
        per_key = {}
        for key in self.docs[0][1][0].filtered_resps:
            predictions = [insts[0].filtered_resps[key] for _, insts in self.docs]
            if not all(type(p) is str for p in predictions):
                return False
            per_key[key] = predictions
        for key, predictions in per_key.items():
            p = np.asarray(_exact_match_side(predictions, **self.kwargs))
            raw[("exact_match", key)] = (p == np.asarray(self.references)).astype(np.float64).tolist()
        return True


def _exact_match_side(strings: list[str], regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False,
                      ignore_numbers=False) -> list[str]:
    """One side of ``lm_eval.api.metrics.exact_match_hf_evaluate`` for each string as lm-eval processes it alone,
    in a one-element array: the strings as that array holds them after the transformations (trailing NULs dropped,
    as numpy stores them); two sides compare equal exactly where lm-eval's ``predictions == references`` is true."""
    import string

    if regexes_to_ignore is not None:
        for i, s in enumerate(regexes_to_ignore):
            if i:
                strings = np.array(strings).tolist()  # lm-eval stores each step's result in an array
            strings = [re.sub(s, "", x) for x in strings]
    if not strings:
        return []
    # numpy sizes a string array by its widest string and ``lower`` cuts a lengthened string ('İ') to that width:
    # lower strings of one length together, as wide as lm-eval's one-element array of each
    strings = _equal_widths(np.char.lower, strings) if ignore_case else np.asarray(strings).tolist()
    for flag, chars in ((ignore_punctuation, string.punctuation), (ignore_numbers, string.digits)):
        if flag:  # deletions only: the width does not matter
            strings = np.char.translate(np.asarray(strings), table=chars.maketrans("", "", chars)).tolist()
    return strings


def _equal_widths(fn, strings: list[str]) -> list[str]:
    """``fn(np.asarray([s]))[0]`` for each string, computed over groups of equal length."""
    out: list = [None] * len(strings)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(strings):
        groups[len(s)].append(i)
    for idx in groups.values():
        for i, r in zip(idx, fn(np.asarray([strings[i] for i in idx])).tolist(), strict=True):
            out[i] = r
    return out


def exact_match_scores(predictions: list[str], references: list[str], **kwargs) -> np.ndarray:
    """Per pair, ``exact_match_hf_evaluate(predictions=[p], references=[r], **kwargs)["exact_match"]`` (float64
    0.0 or 1.0), for all pairs at once."""
    if not predictions:
        return np.zeros(0)
    p, r = _exact_match_side(predictions, **kwargs), _exact_match_side(references, **kwargs)
    return (np.asarray(p) == np.asarray(r)).astype(np.float64)
