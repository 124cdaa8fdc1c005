"""Conformance of every MoE family: a tiny random model per family, pruning in place against the exported
checkpoint reloaded by plain ``from_pretrained``, merging, ``k'``, the one-shot methods; ``eep-zoo archs`` writes
the table (docs/architectures.md).

Tiny models: hidden 32, 8 experts, top-2, 3 layers (the family's dense first layers and other layer kinds
included), float32, seeded; per-expert router tensors that initialise to zero (correction biases) are randomised
so that pruning must slice them.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import torch

from eep.arch.base import MoEAdapter, lookup
from eep.arch.registry import ADAPTERS, REFUSED, adapter_for
from eep.arch.survey import MOE_MODEL_TYPES, families

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64, initializer_range=0.2, intermediate_size=32,
              moe_intermediate_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# by config attribute: the settings a tiny model of any family with that attribute gets (dense first layer,
# one shared expert, two expert groups, multi-head latent attention at tiny width)
BY_ATTRIBUTE = {"first_k_dense_replace": 1, "mlp_layer_types": ["dense", "sparse", "sparse"], "n_shared_experts": 1,
                "n_group": 2, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4,
                "qk_nope_head_dim": 4, "v_head_dim": 8, "routed_scaling_factor": 2.5, "index_head_dim": 8,
                "index_n_heads": 2, "index_topk": 4, "unpadded_vocab_size": 64, "swa_num_attention_heads": 4,
                "swa_num_key_value_heads": 2, "swa_head_dim": 8}

# per family: what differs from COMMON (dense layers, hybrid layer kinds, shared experts, routing settings)
EXTRA: dict[str, dict] = {
    "qwen2_moe": dict(shared_expert_intermediate_size=24, mlp_only_layers=[1]),
    "qwen3_moe": dict(norm_topk_prob=True),
    "deepseek_v2": dict(topk_method="group_limited_greedy"),
    "deepseek_v3": dict(norm_topk_prob=True),
    "glm4_moe": dict(n_group=1, topk_group=1, norm_topk_prob=True),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8),
    "dots3_note_text": dict(num_key_value_heads=4),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                             mamba_chunk_size=8, layer_types=["mamba", "attention", "mamba"]),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                           indexer_compress_ratio=2),
    "gemma4_text": dict(enable_moe_block=True, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8,
                        sliding_window=8),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  mamba_d_state=8, mamba_dt_rank=4),
}


def tiny_config(family: str, num_experts: int = 8, top_k: int = 2, **overrides):
    """The family's transformers config at tiny width with ``num_experts`` experts and top-``top_k``."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls, config_class = ADAPTERS[family], CONFIG_MAPPING[family]
    kwargs = {**COMMON, **{k: v for k, v in BY_ATTRIBUTE.items() if hasattr(config_class, k)}}
    if hasattr(config_class, "kv_lora_rank"):  # latent attention: rotary head dim, one key/value head per head
        kwargs.update(head_dim=kwargs["qk_rope_head_dim"], num_key_value_heads=kwargs["num_attention_heads"])
    kwargs.update({**EXTRA.get(family, {}), cls.num_experts_key: num_experts, cls.top_k_key: top_k, **overrides})
    config = AutoConfig.for_model(family, **kwargs)
    kinds = getattr(config, "layer_types", None) or []
    if kinds and set(kinds) == {"linear_attention"} and "layer_types" not in kwargs:  # hybrids: one attention layer
        kinds = ["full_attention" if i == 1 else kind for i, kind in enumerate(kinds)]
        config = AutoConfig.for_model(family, **kwargs, layer_types=kinds)
    return config


def build_tiny(family: str, seed: int = 0, config=None, **overrides):
    """A seeded random float32 model of ``family`` in eval mode; per-expert router tensors other than the gate rows
    (correction biases, GPT-OSS's router bias) get small random values so that pruning must slice them."""
    from transformers import AutoModelForCausalLM

    config = config if config is not None else tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = ADAPTERS[family](model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter.layers:
            for name in adapter.all_router_tensors():
                if name != adapter.router_weight:
                    tensor = lookup(layer.router, name)
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            for name in adapter.router_args:
                tensor = getattr(layer.block, name, None)
                if tensor is not None:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model


def kept_subsets(adapter: MoEAdapter, num_kept: int, seed: int = 0) -> list[list[int]]:
    """A different random kept subset per MoE layer with the same number in every expert group of the router."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.arange(adapter.num_experts).chunk(adapter.expert_groups)
    share = num_kept // len(groups)
    return [sorted(int(e) for g in groups for e in g[torch.randperm(len(g), generator=gen)[:share]])
            for _ in adapter.layers]


def sample_batch(rows: int = 2, cols: int = 8, seed: int = 0) -> dict:
    """Random calibration tokens ``{"input_ids", "attention_mask": long[rows, cols]}`` over the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, COMMON["vocab_size"], (rows, cols), generator=gen),
            "attention_mask": torch.ones(rows, cols, dtype=torch.long)}


@dataclass
class Conformance:
    """One family's row of the table: ``status`` is ``exact``, ``inexact``, ``refused`` or ``error``."""

    family: str
    aliases: list[str]
    status: str
    adapter: str = ""
    max_diff: float | None = None        # pruning 8 -> 4, in place vs reloaded export: max |logit difference|
    top_k_diff: float | None = None      # the same at k' = 1 (None: k' is fixed)
    merging: str = ""
    gate_rows_diff: float | None = None  # a gate-rows merging genome 8 -> 4, in place vs reloaded export
    methods: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0


def logits_of(model, batch: dict) -> torch.Tensor:
    """``float[B, S, V]`` logits of one forward without a cache."""
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


def exported_diff(model, materializer, genome, batch: dict) -> float:
    """Max |logit difference| between ``genome`` applied in place and its export reloaded by ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from eep.export import export

    with materializer.applied(genome):
        in_place = logits_of(model, batch)
    with tempfile.TemporaryDirectory() as folder:
        export(model, genome, folder, materializer=materializer)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if getattr(reloaded.config, "model_type", None) != model.config.model_type:
            raise ValueError("the export reloaded as another model type")
        return float((logits_of(reloaded, batch) - in_place).abs().max())


def check_methods(model, materializer, batch: dict, num_kept: int, top_k: int) -> dict[str, str]:
    """Each one-shot method's outcome: ``ok`` or the reason it refuses (``MethodError``) or fails."""
    from eep.genome import GenomeError
    from eep.methods import METHODS, MethodError, compute

    options = {"enumeration": {"max_subsets": 100}, "enumeration_progressive": {"max_subsets": 100}}
    out = {}
    for name in METHODS:
        try:
            compute(name, model, materializer, batch, num_kept=num_kept, top_k=top_k, **options.get(name, {}))
            out[name] = "ok"
        except (MethodError, GenomeError) as e:
            out[name] = f"refused: {e}"
        except Exception as e:  # noqa: BLE001  (the table reports it)
            out[name] = f"error: {type(e).__name__}: {e}"
    return out


def check_family(family: str, methods: bool = True, atol: float = 1e-5) -> Conformance:
    """Build the family's tiny model and measure pruning exactness, ``k'``, merging and the methods (refused
    families: the reason, without building anything)."""
    from eep.genome import Genome
    from eep.materialize import Materializer

    aliases = sorted(t for t, a in MOE_MODEL_TYPES.items() if a == family)
    if family in REFUSED:
        return Conformance(family, aliases, "refused", reason=REFUSED[family])
    start = time.perf_counter()
    row = Conformance(family, aliases, "error", adapter=ADAPTERS[family].__name__)
    try:
        model = build_tiny(family)
        adapter = adapter_for(model)
        mat = Materializer(model, adapter)
        batch = sample_batch()
        kept, top_k = kept_subsets(adapter, 4), adapter.top_k
        row.max_diff = exported_diff(model, mat, Genome.pruning(kept, adapter.num_experts, top_k), batch)
        if adapter.supports_top_k_change:
            row.top_k_diff = exported_diff(model, mat, Genome.pruning(kept, adapter.num_experts, 1), batch)
        row.merging, row.gate_rows_diff = _check_merging(model, mat, batch)
        if methods:
            row.methods = check_methods(model, mat, batch, 4, top_k)
        worst = max(d for d in (row.max_diff, row.top_k_diff, row.gate_rows_diff) if d is not None)
        row.status = "exact" if worst <= atol else "inexact"
    except Exception as e:  # noqa: BLE001  (the table reports it)
        row.reason = f"{type(e).__name__}: {e}"
    row.seconds = time.perf_counter() - start
    return row


def _check_merging(model, materializer, batch: dict) -> tuple[str, float | None]:
    """A random merging genome 8 -> 4: whether it runs (``runs``, ``non-finite logits`` or ``refused``), and the
    max |logit difference| between its gate-rows form in place and that export reloaded."""
    from eep.genome import Genome

    adapter = materializer.adapter
    if not adapter.supports_merging:
        return "refused", None
    gen = torch.Generator().manual_seed(0)
    n = len(adapter.layers)
    genome = Genome.merging(torch.rand(n, 4, adapter.num_experts, generator=gen),
                            torch.rand(n, 4, adapter.num_experts, generator=gen), adapter.top_k)
    with materializer.applied(genome):
        out = logits_of(model, batch)
    if not bool(torch.isfinite(out).all()):
        return "non-finite logits", None
    return "runs", exported_diff(model, materializer, genome.with_gate_rows(True), batch)


def check_all(methods: bool = True, only: list[str] | None = None) -> list[Conformance]:
    """:func:`check_family` for every family of :data:`MOE_MODEL_TYPES` (or ``only`` those)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return [check_family(f, methods=methods) for f in (only or families())]


BEGIN, END = "<!-- begin generated by eep-zoo archs -->", "<!-- end generated -->"


def render(rows: list[Conformance]) -> str:
    """The generated part of docs/architectures.md: the command, the versions, one row per family, and the
    methods' refusals below the table."""
    import transformers

    exact = sum(r.status == "exact" for r in rows)
    refused = sum(r.status == "refused" for r in rows)
    lines = [BEGIN, "", f"Made by `eep-zoo archs` with transformers {transformers.__version__} and torch "
             f"{torch.__version__.split('+')[0]}: {len(rows)} MoE families, {exact} exact, {refused} refused, "
             f"{len(rows) - exact - refused} failing.", "",
             "Pruning 8 -> 4 experts (2 -> 1 active for k') on a tiny random float32 model: max |logit difference| "
             "between the candidate in place and its export reloaded by plain `AutoModelForCausalLM.from_pretrained` "
             "(exact: <= 1e-5). Merging: a random merging genome 8 -> 4 runs; its gate-rows form "
             "(`search.merge_router=gate_rows`) against its reloaded export, the same measure.", "",
             "| family | aliases | adapter | status | pruning | k'=1 | merging | methods | reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = [m for m, v in r.methods.items() if v == "ok"]
        methods = "" if not r.methods else ("all" if len(ok) == len(r.methods) else f"{len(ok)}/{len(r.methods)}")
        merging = r.merging + ("" if r.gate_rows_diff is None else f", gate rows {_num(r.gate_rows_diff)}")
        cells = [f"`{r.family}`", ", ".join(f"`{a}`" for a in r.aliases), r.adapter.removesuffix("Adapter"),
                 r.status, _num(r.max_diff), "fixed" if r.status == "exact" and r.top_k_diff is None
                 else _num(r.top_k_diff), merging, methods, r.reason.replace("|", "/").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in rows:
        by_reason: dict[str, list[str]] = {}
        for method, outcome in r.methods.items():
            if outcome != "ok":
                by_reason.setdefault(outcome.replace("\n", " "), []).append(method)
        notes += [f"- `{r.family}`: {', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    if notes:
        lines += ["", "One-shot methods that refuse (or fail) on a family, with the reason:", ""] + notes
    return "\n".join(lines + ["", END]) + "\n"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}" if value else "0"


def write_table(rows: list[Conformance], path) -> None:
    """Write :func:`render` into ``path`` between the generated markers, keeping the hand-written rest."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else "# Supported architectures\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + render(rows) + rest.split(END, 1)[1].lstrip("\n"))
