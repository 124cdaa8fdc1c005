"""Per-document metrics, vectorised: lm-eval's ``process_results`` for all of a task's documents at once.

``ConfigurableTask.process_results`` runs per document and candidate (numpy on a handful of values, ~35-60 us per
document); for the metrics below the same per-document values come out of a few array operations over all of a
task's documents at once. Everything that depends on the documents alone (gold indices, choice lengths, which
requests belong to which document, rendered targets) is computed once. What is not reproduced here exactly
(``task_metrics`` returns None) goes through lm-eval's own ``process_results``; aggregation is always lm-eval's.
"""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import torch

from eep.evaluate.scoring import LoglikelihoodResults

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
