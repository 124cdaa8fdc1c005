"""``HFLM.generate_until`` for a fixed request list: batches and encoded prompts prepared once, same output strings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm


SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def single_token_ids(tokenizer, stops: list[str]) -> list[int] | None:
    """Token ids of ``stops`` if every stop string is exactly one token that decodes back to itself, else None."""
    ids = []
    for stop in stops:
        enc = tokenizer.encode(stop, add_special_tokens=False)
        if len(enc) != 1 or tokenizer.decode(enc, skip_special_tokens=False) != stop:
            return None
        ids.append(enc[0])
    return ids


def is_greedy(kwargs: dict) -> bool:
    """Whether ``HFLM._model_generate`` decodes greedily with these (normalised) generation kwargs."""
    do_sample = kwargs.get("do_sample")
    return do_sample is False or (do_sample is None and kwargs.get("temperature", 0.0) == 0.0)


@dataclass
class _GenBatch:
    """One ``generate`` call: prompts ``ids``/``mask`` long [B, T] (left-padded, as ``tok_batch_encode``), the stop
    strings ``until``, ``max_length`` (T + max new tokens), the remaining generation kwargs, and the stop strings'
    token ids when generation may stop on tokens instead of strings (else None)."""

    ids: torch.Tensor
    mask: torch.Tensor
    until: list[str]
    max_length: int
    kwargs: dict
    stop_ids: list[int] | None


def _prepare(lm, chunk: list[tuple[str, dict]], eos: str) -> _GenBatch:
    """Encode one of ``HFLM.generate_until``'s batches as it does: normalised kwargs, stop strings with EOS, prompts
    left-truncated to ``max_length - max_gen_toks``."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    contexts, all_kwargs = zip(*chunk, strict=True)
    kwargs = normalize_gen_kwargs(all_kwargs[0], lm.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = kwargs.pop("max_gen_toks")
    if lm.max_length - max_gen_toks <= 0:
        raise ValueError(f"max_gen_toks {max_gen_toks} is not below the model's max length {lm.max_length}")
    ids, mask = lm.tok_batch_encode(contexts, left_truncate_len=lm.max_length - max_gen_toks,
                                    truncation=lm.truncation)
    max_length = kwargs.pop("max_length", ids.shape[1] + max_gen_toks)
    tok = lm.tokenizer
    pad_is_special = tok.pad_token_id is not None and tok.pad_token_id in tok.all_special_ids
    fast = pad_is_special and is_greedy(kwargs) and lm.mixed_precision_dtype is None
    stop_ids = single_token_ids(tok, until) if fast else None
    return _GenBatch(ids.to(lm.device), mask.to(lm.device), until, max_length, kwargs, stop_ids)


class GenerationScorer:
    """``HFLM.generate_until`` over fixed ``generate_until`` instances, with the same batches (lm-eval's
    ``Collator``: grouped by generation kwargs, longest prompt first), prompts, ``max_length`` and post-processing,
    so every output string is the same; prompts are sorted, grouped and encoded once, not per candidate.

    When decoding is greedy, padding is a special token and every stop string is a single token, generation stops on
    those token ids per row instead of decoding all rows at every step to look for the strings: each row's text up to
    its first stop string is the same (greedy rows do not interact; lm-eval cuts at the first stop string either way).
    Not reproduced (``build`` returns None, use ``HFLM``'s method): seq2seq models, ``think_end_token``,
    ``batch_size="auto"``.
    """

    forward_tokens = 0   # of the last run: batch x (prompt + generated) positions

    def __init__(self, lm, batches: list[_GenBatch], order: list[int]):
        self.lm, self.batches, self.order = lm, batches, order

    @classmethod
    def build(cls, lm, instances: list) -> GenerationScorer | None:
        from lm_eval.models.utils import Collator

        if lm.backend != "causal" or lm.think_end_token is not None or not isinstance(lm.batch_size, int):
            return None
        args = [inst.args for inst in instances]
        collator = Collator(args, sort_fn=lambda req: (-len(lm.tok_encode(req[0])), req[0]),
                            group_by="gen_kwargs", group_fn=lambda req: req[1])
        chunks = list(collator.get_batched(n=lm.batch_size))
        eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
        order = collator.get_original(list(range(len(args))))  # position of each request's answer in batch order
        return cls(lm, [_prepare(lm, chunk, eos) for chunk in chunks], order)

    def _generate(self, batch: _GenBatch) -> torch.Tensor:
        """Token ids [B, T + new] of one batch: stopping on token ids when allowed, else through ``HFLM``."""
        if batch.stop_ids is None:
            return self.lm._model_generate(context=batch.ids, attention_mask=batch.mask, stop=list(batch.until),
                                           max_length=batch.max_length, **batch.kwargs)
        # greedy: sampling-only flags change nothing, and transformers warns about them ("generation flags are not
        # valid"), so they are not passed
        kwargs = {k: v for k, v in batch.kwargs.items() if k not in SAMPLING_ONLY}
        kwargs["do_sample"] = False
        return self.lm.model.generate(input_ids=batch.ids, attention_mask=batch.mask, max_length=batch.max_length,
                                      eos_token_id=batch.stop_ids, pad_token_id=self.lm.tokenizer.pad_token_id,
                                      use_cache=True, **kwargs)

    def prompts(self) -> list[tuple[list[int], _GenBatch]]:
        """Per instance, in the instances' order: its prompt's token ids exactly as generation encodes them (the
        padding removed) and its batch (stop strings, ``max_length``, generation kwargs)."""
        rows = [(b.ids[r][b.mask[r].bool()].tolist(), b) for b in self.batches for r in range(b.ids.shape[0])]
        return [rows[i] for i in self.order]

    def run(self, progress: bool = False) -> list[str]:
        """The generated text per instance, in the instances' order."""
        from lm_eval.models.utils import postprocess_generated_text

        texts, self.forward_tokens = [], 0
        for batch in tqdm(self.batches, disable=not progress, desc="generation batches"):
            out = self._generate(batch)
            self.forward_tokens += out.numel()   # the prompt, then one position per row and generated step
            for row in out[:, batch.ids.shape[1]:].tolist():
                texts.append(postprocess_generated_text(self.lm.tok_decode(row), batch.until, None))
        return [texts[i] for i in self.order]
