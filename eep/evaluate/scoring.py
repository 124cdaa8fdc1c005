"""Model calls for fixed lm-eval requests, laid out once and reproducing ``HFLM``'s batches and results bit for bit.

``LoglikelihoodScorer`` replaces ``HFLM._loglikelihood_tokens`` and ``GenerationScorer`` replaces
``HFLM.generate_until`` for a request list that does not change between candidates: everything that does not depend
on the model's weights (ordering, grouping, padding, token tensors, gather indices, encoded prompts) is computed at
construction, so per candidate only the forwards (or ``generate`` calls) and a few tensor ops per batch run. Both
``build`` classmethods return None for set-ups they do not reproduce; the caller then uses ``HFLM``'s own method.
"""
from __future__ import annotations

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


def row_sums(values: torch.Tensor) -> torch.Tensor:
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
        self.forward_tokens = sum(b.ids.numel() for b in batches)   # per run: batch x width of every forward

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
                values[part.out] = row_sums(flat[part.logprob_rows, part.tokens])
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
