"""Dynamic skipping's saving in one MoE block, apart from the rest of the model: ``python bench/skipping_block.py``.

One random Mixtral-shaped sparse MoE block (hidden 1024, intermediate 2816, 8 experts, top-2, float32, 1 thread), a
prefill batch of 16 x 256 tokens. The skipping beta is the quantile of the block's own ``w_2 / w_1`` ratios that
skips ``--share`` of the (token, expert) pairs. Timed in interleaved rounds, medians over ``--repeats``: the block
unpatched (``full``), with eep's skipping patch (``skipping``: skipped pairs removed before the experts run,
``eep/materialize.py`` ``_compacting_forward``) and, for the eager kernel, the patch without the compaction (``native``:
the sentinel slot passed to transformers' eager loop, which skips it itself). The target (issue 16): time saved >= 0.9
x the share of pairs skipped. Raw output: ``bench/results/skipping_block.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from record import code, load, machine  # noqa: E402


def build(implementation: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=1024, intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2,
                        num_hidden_layers=1, vocab_size=64, num_attention_heads=8, num_key_value_heads=8)
    model = MixtralForCausalLM(cfg).eval()
    model.set_experts_implementation(implementation)
    return model


def beta_for(block, x: torch.Tensor, share: float) -> float:
    """The beta at which ``share`` of all (token, expert) pairs (top-2: half the second slots' share) are skipped."""
    logits = block.gate(x.reshape(-1, x.shape[-1]))
    logits = logits[0] if isinstance(logits, tuple) else logits
    top = logits.float().softmax(-1).topk(2).values
    return (top[:, 1] / top[:, 0]).quantile(2 * share).item()


def measure(implementation: str, share: float, repeats: int) -> dict:
    from eep.genome import Genome
    from eep.materialize import Materializer
    from eep.methods.skipping import skipping_patch

    torch.manual_seed(0)
    model = build(implementation)
    block, mat = model.model.layers[0].mlp, Materializer(model)
    x = torch.randn(16, 256, 1024)
    variants = ["full", "skipping"] + (["native"] if implementation == "eager" else [])
    times = {v: [] for v in variants}
    with torch.no_grad():
        beta = beta_for(block, x, share)
        for _ in range(repeats):
            for v in variants:
                mat.restore()
                if v != "full":
                    mat.apply(Genome.identity(1, 8, 2))
                    mat.patch_routing(skipping_patch([[beta]], 8))
                    if v == "native":
                        block.experts.__dict__.pop("forward", None)
                block(x[:1])
                start = time.perf_counter()
                block(x)
                times[v].append(time.perf_counter() - start)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"experts_implementation": implementation, "beta": beta, "skipped_pair_share": share,
            "seconds": med, "vs_full": {v: med[v] / med["full"] for v in variants},
            "target_met": 1 - med["skipping"] / med["full"] >= 0.9 * share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.264, help="share of pairs skipped (the bench's calibrated "
                        "betas skip 0.264 on the random Mixtral)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="skipping_block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_load = load()
    rows = [measure(impl, args.share, args.repeats) for impl in ("eager", "grouped_mm")]
    out = {"command": "python bench/skipping_block.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "code": code(), "load_at_start": start_load, "load_at_end": load(), "results": rows}
    (HERE / "results" / f"{args.out}.json").write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(r["experts_implementation"], {v: round(t, 3) for v, t in r["vs_full"].items()},
              "target met" if r["target_met"] else "target not met")


if __name__ == "__main__":
    main()
