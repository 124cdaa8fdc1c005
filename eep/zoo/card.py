"""Measure a shipped model and write its model card: ``python -m eep.zoo.card skills-mixtral``."""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from eep.evaluate.reference import simple_scores
from eep.models import ModelConfig, load_model
from eep.tasks.generate import read_split
from eep.tasks.skills import MC_SKILLS, SKILLS

import eep.zoo

REPRODUCIBILITY = (  # what the loss curve in training_log.json reproduces exactly, and where
    '- reproducibility: the command gives this exact loss curve (every logged value, bit for bit) with '
    "torch's AVX2 CPU kernels and 1 thread; reproduced on an AVX-512 AMD EPYC with the kernels held to "
    'AVX2 (`ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`). Other '
    'kernels (AVX-512, other processors, other thread counts) round float reductions differently and the '
    'difference grows with every step: with AVX-512 kernels the step-50 mean moved by at most 7e-7 and '
    'the step-100 mean by at most 0.3% (relative; `bench/zoo_training_repro.py`), so `tests/test_zoo.py` '
    'checks the first 100 steps to 1e-4 and 1e-2. The training data and the initial weights are the same '
    'on every machine'
)


def parameter_counts(model) -> dict[str, int]:
    """Total, routed-expert and active-per-token parameters: active = other + experts * top_k / E."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.config
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    return {"total": total, "expert": expert, "active": total - expert + expert * cfg.num_experts_per_tok // n_experts}


@torch.no_grad()
def expert_usage(model, tokenizer, skill: str, split: str = "test", limit: int = 200) -> torch.Tensor:
    """``float[L, E]``: share of top-k selections per expert per layer over prompt+answer tokens of ``skill``."""
    docs = read_split(skill, split)[:limit]
    enc = tokenizer([d["prompt"] + d["answer"] for d in docs], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    out = model(**enc, output_router_logits=True)
    keep = enc["attention_mask"].reshape(-1).bool()
    k = model.config.num_experts_per_tok
    rows = []
    for logits in out.router_logits:  # one [B*T, E] tensor per MoE layer
        chosen = logits[keep].topk(k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=logits.shape[-1]).float()
        rows.append(counts / counts.sum())
    return torch.stack(rows)


def usage_section(usage: dict[str, torch.Tensor]) -> list[str]:
    """Markdown: per layer, a skills x experts table of selection shares (%), and a specialisation summary.

    Specialisation of a layer = mean over skills of the total-variation distance between the skill's usage and the
    mean usage over skills (0: every skill routes alike; 1: disjoint experts per skill).
    """
    stacked = torch.stack([usage[s] for s in SKILLS])  # [S, L, E]
    mean = stacked.mean(0)
    lines = []
    for layer in range(stacked.shape[1]):
        tv = 0.5 * (stacked[:, layer] - mean[layer]).abs().sum(-1).mean().item()
        n = stacked.shape[2]
        lines += [f"\nLayer {layer} (specialisation {tv:.2f}):\n",
                  "| skill | " + " | ".join(f"e{e}" for e in range(n)) + " |",
                  "|---|" + "---|" * n]
        for s, row in zip(SKILLS, stacked[:, layer]):
            lines.append(f"| {s} | " + " | ".join(f"{100 * v:.0f}" for v in row.tolist()) + " |")
    return lines


def write_card(name: str, batch_size: int = 64) -> Path:
    """Score ``name`` on every skill's test split through lm-eval and write ``README.md`` and ``metrics.json``."""
    folder = eep.zoo.path(name)
    model, tok = load_model(ModelConfig(path=str(folder)))
    train_log = json.loads((folder / "training_log.json").read_text())
    tasks = [f"skills_{s}" for s in SKILLS] + [f"skills_{s}_mc" for s in MC_SKILLS]
    scores = simple_scores(model, tok, tasks, batch_size=batch_size)
    counts = parameter_counts(model)
    usage = {s: expert_usage(model, tok, s) for s in SKILLS}
    metrics = {"test": scores, "parameters": counts, "measured_on": platform.platform()}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (folder / "README.md").write_text("\n".join(card_lines(name, model, scores, counts, usage, train_log)) + "\n")
    return folder


def card_lines(name, model, scores, counts, usage, train_log) -> list[str]:
    cfg = model.config
    r = train_log["recipe"]
    curve = train_log["loss_curve"]
    lines = [
        f"# {name}", "",
        f"A small trained `{type(model).__name__}` shipped with eep: {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, {r['experts']} experts of intermediate size {cfg.intermediate_size} per layer, top-"
        f"{cfg.num_experts_per_tok} routing, character vocabulary of {cfg.vocab_size} tokens (one tag token per skill), "
        f"float32. Trained on the six synthetic skills of `eep.tasks.skills`; loads offline with "
        f"`AutoModelForCausalLM.from_pretrained(eep.zoo.path({name!r}))`.", "",
        "## Test accuracy (lm-eval, whole test split, 500 documents per task)", "",
        "| task | metric | score |", "|---|---|---|",
    ]
    for task, res in scores.items():
        for metric, value in res.items():
            lines.append(f"| {task} | {metric} | {value:.3f} |")
    lines += ["", "Reproduce one row (any working directory):", "", "```bash",
              "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --device cpu --batch_size 64 \\",
              f"  --model_args pretrained=$(python -c \"import eep.zoo; print(eep.zoo.path('{name}'))\") \\",
              "  --include_path $(python -c \"import eep.tasks; print(eep.tasks.include_path())\") --tasks skills_add",
              "```", "",
              "## Parameters", "",
              f"- total: {counts['total']:,}", f"- routed experts: {counts['expert']:,}",
              f"- active per token: {counts['active']:,}", "",
              "## Training", "",
              f"- command: `{train_log['command']}`",
              f"- seed {r['seed']}, {r['steps']} steps of batch {r['batch']}, AdamW lr {r['lr']} "
              f"(warm-up {r['warmup']}, cosine to 5%), loss on answer tokens + {r['aux_loss']} x router load-balancing loss",
              f"- skill sampling weights: {r['weights']}",
              f"- rope theta {r.get('rope_theta', 10000.0):g}; initial expert down-projections x"
              f"{r.get('down_init_scale', 1.0):g}, attention output projections x{r.get('o_init_scale', 1.0):g}",
              f"- wall time {train_log['wall_seconds'] / 60:.1f} min ({train_log['seconds_per_step']} s/step) with "
              f"{train_log['threads']} torch thread(s) on {train_log['machine']}, "
              + train_log.get("note", "a 2-core machine that ran the shipped models' training runs side by side "
                                      "(one thread each)"),
              f"- loss (mean over {curve[0][0]} steps): {curve[0][1]:.3f} at step {curve[0][0]}, {curve[-1][1]:.4f} "
              f"at step {curve[-1][0]}; full curve and validation checks in `training_log.json`",
              REPRODUCIBILITY, "",
              "## Expert usage per skill", "",
              "Share (%) of top-k selections that go to each expert, over the prompt and answer tokens of 200 test "
              "documents per skill.",
              *usage_section(usage)]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=eep.zoo.names())
    args = parser.parse_args(argv)
    folder = write_card(args.name)
    print((folder / "README.md").read_text())


if __name__ == "__main__":
    main()
