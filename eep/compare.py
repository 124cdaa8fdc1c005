"""What ``eep-compare`` does: score a list of methods at the same expert counts on one task's test split, and write
``compare.md``, ``compare.csv`` and ``compare.png`` into the run folder."""
from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eep.search import app
from eep.search import final as F
from eep.search import run as R

log = logging.getLogger("eep.compare")

ALL_METHODS = ("random", "frequency", "soft_activation", "reap", "enumeration", "enumeration_progressive",
               "skipping", "m_smoe", "hc_smoe", "svd_compress", "eep")
CSV, MD, PNG, ROWS = "compare.csv", "compare.md", "compare.png", "compare.jsonl"


@dataclass
class Row:
    """One method at one expert count: ``test_score`` is the task's metric as lm-eval reports it (the mean over
    seeds for ``random``, with ``test_std``), ``seconds`` the method's own time (the search's, for ``eep``)."""

    method: str
    num_experts: int
    top_k: int
    test_score: float
    test_std: float | None = None
    runs: int = 1
    seconds: float = 0.0
    notes: str = ""
    scores: list[float] = field(default_factory=list)


def methods_of(cfg: DictConfig) -> list[str]:
    """``compare.methods`` (null: every method), each checked against the registry."""
    from eep.methods import METHODS

    names = list(cfg.compare.methods) if cfg.compare.methods else list(ALL_METHODS)
    valid = sorted({*METHODS, "eep"})
    for name in names:
        if name not in valid:
            raise R.UserError(f"compare.methods: unknown method {name!r}; valid: {', '.join(valid)}")
    return names


def counts_of(cfg: DictConfig) -> list[int]:
    """``compare.num_experts`` (a list of E'; null: ``[search.num_experts]``)."""
    counts = cfg.compare.num_experts
    if counts is None:
        return [int(cfg.search.num_experts)]
    return [int(n) for n in (counts if OmegaConf.is_list(counts) else [counts])]


def at_count(cfg: DictConfig, num_experts: int) -> DictConfig:
    """``cfg`` with ``search.num_experts`` set (and without compare's resume keys)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    out.search.num_experts = num_experts
    return out


def validate(cfg: DictConfig) -> tuple[list[str], list[tuple[int, int]]]:
    """Methods, and ``(E', k')`` per expert count, all checked before the model loads."""
    methods = methods_of(cfg)
    if cfg.compare.calibration not in ("task", "skills_all"):
        raise R.UserError(f"compare.calibration={cfg.compare.calibration}: use task (the task's search split) or "
                          "skills_all (the mixed-skills corpus)")
    shapes = []
    for n in counts_of(cfg):
        _, kept, top_k, _ = app.validate(at_count(cfg, n))
        shapes.append((kept, top_k))
    return methods, shapes


def run(cfg: DictConfig, run_dir: Path) -> list[Row]:
    """Compare the configured methods in ``run_dir``; returns the rows (the full model first)."""
    methods, shapes = validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "compare_config.yaml")
    session = _Session(cfg, run_dir)
    rows = [session.full_row()]
    for kept, top_k in shapes:
        for method in methods:
            rows.append(session.row(method, kept, top_k))
            _append(run_dir / ROWS, rows[-1])
    write_outputs(cfg, run_dir, rows)
    return rows


class _Session:
    """The loaded model, its materialiser, the test evaluator and the calibration tokens, shared by every method."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        from eep.materialize import Materializer
        from eep.models import ModelConfig, load_model

        self.cfg, self.run_dir = cfg, run_dir
        self.model, self.tok = load_model(ModelConfig(**OmegaConf.to_container(cfg.model)))
        self.mat = Materializer(self.model)
        self.names, _ = app.task_names(cfg)
        self.tester = app.make_evaluator(cfg, self.model, self.tok, "test")
        self.calibration = _calibration(cfg, self.model, self.tok)

    def score(self) -> float:
        score = self.tester.evaluate()
        if score.error:
            log.warning("evaluation failed: %s", score.error)
        return F.reported_value(score, self.names)

    def full_row(self) -> Row:
        adapter = self.mat.adapter
        return Row("full", adapter.num_experts, adapter.top_k, self.score())

    def row(self, method: str, kept: int, top_k: int) -> Row:
        if method == "eep":
            return self._search(kept, top_k)
        seeds = range(self.cfg.compare.random_seeds) if method == "random" else [0]
        scores, seconds, notes = [], 0.0, ""
        for seed in seeds:
            result, took = self._compute(method, kept, top_k, self.cfg.seed + seed)
            scores.append(self._score_result(result))
            seconds += took
            notes = _notes(result.info)
        std = statistics.stdev(scores) if len(scores) > 1 else None
        row = Row(method, kept, top_k, statistics.fmean(scores), std, len(scores), round(seconds, 2), notes, scores)
        log.info("%s at E'=%d: test %.4f", method, kept, row.test_score)
        return row

    def _compute(self, method: str, kept: int, top_k: int, seed: int):
        from eep.methods import compute

        options = OmegaConf.to_container(self.cfg.compare.options.get(method, {})) \
            if self.cfg.compare.options else {}
        start = time.perf_counter()
        result = compute(method, self.model, self.mat, self.calibration, num_kept=kept, top_k=top_k, seed=seed,
                         **options)
        return result, time.perf_counter() - start

    def _score_result(self, result) -> float:
        from eep.methods import applied, export_result

        with applied(self.mat, result):
            value = self.score()
        if self.cfg.compare.export:
            folder = self.run_dir / "models" / f"{result.method}_E{result.genome.num_kept}"
            export_result(self.mat, result, folder, self.tok, calibration=self.calibration)
        return value

    def _search(self, kept: int, top_k: int) -> Row:
        """The EEP search at this count, as its own ``eep-search`` run in ``eep_E<n>/`` (resumable there)."""
        folder = self.run_dir / f"eep_E{kept}"
        start = time.perf_counter()
        report = app.run(at_count(self.cfg, kept), folder)
        if report is None:  # finished before
            report = json.loads((folder / "report.json").read_text())
        return Row("eep", kept, top_k, float(report["test"]["best_in_place"]), None, 1,
                   round(time.perf_counter() - start, 2), f"search run: {folder.name}/, "
                   f"{report['evaluations']} evaluations")


def _calibration(cfg: DictConfig, model, tok) -> dict:
    """Calibration tokens: the task's search split (``compare.calibration=task``) or the mixed-skills corpus."""
    from eep.methods import calibration_batch

    source = "skills_all" if cfg.compare.calibration == "skills_all" else app.make_evaluator(cfg, model, tok, "search")
    return calibration_batch(model, tok, source, n=cfg.compare.calibration_docs)


def _notes(info: dict) -> str:
    """A short summary of a method's ``info`` for the table (the whole of it is in the method's export)."""
    notes = []
    if "search" in info:  # enumeration: how each layer's subset was found
        notes.append("subsets: " + ", ".join(f"{how} x{info['search'].count(how)}"
                                             for how in dict.fromkeys(info["search"])))
    if "pruned_by" in info:
        notes.append(f"pruned by {info['pruned_by']}")
    if "betas" in info:
        skipped = [x for layer in info.get("calibration_share_skipped_per_rank", []) for x in layer]
        share = f", {sum(skipped) / len(skipped):.0%} of later experts skipped on calibration" if skipped else ""
        notes.append(f"skipping in process only{share}")
    if "groups" in info:
        notes.append("merged groups routed by the sum of members' probabilities")
    if "ranks" in info:
        ranks = list(_flat(info["ranks"]))
        notes.append(f"SVD ranks {min(ranks)}-{max(ranks)}; a factored format would save "
                     f"{info['bytes_a_factored_format_would_save']:,} bytes (a vanilla export: none)")
    return "; ".join(notes)


def _flat(nested):
    """The numbers of a nested list, in order."""
    for item in nested:
        yield from (_flat(item) if isinstance(item, (list, tuple)) else [item])


def _append(path: Path, row: Row) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(asdict(row)) + "\n")


def write_outputs(cfg: DictConfig, run_dir: Path, rows: list[Row]) -> None:
    """``compare.csv`` (one row per method and expert count), ``compare.md`` and ``compare.png``; the table to
    stdout."""
    columns = ["method", "num_experts", "top_k", "test_score", "test_std", "runs", "seconds", "notes"]
    with (run_dir / CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    table = _markdown(rows)
    names, _ = app.task_names(cfg)
    head = (f"# eep-compare: {', '.join(names)} on {cfg.model.path or cfg.model.name}\n\n"
            f"Test split, {cfg.evaluator.test_limit or 'all'} documents; calibration: {cfg.compare.calibration}; "
            f"seed {cfg.seed}.\n\n")
    (run_dir / MD).write_text(head + table + "\n")
    plot(rows, run_dir / PNG)
    print(table)


def _markdown(rows: list[Row]) -> str:
    lines = ["| method | experts | top-k | test score | spread (std) | runs | seconds | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        std = "" if r.test_std is None else f"{r.test_std:.4f}"
        lines.append(f"| {r.method} | {r.num_experts} | {r.top_k} | {r.test_score:.4f} | {std} | {r.runs} | "
                     f"{r.seconds} | {r.notes} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Test score against experts kept, one line per method; the full model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>pP*Xh"
    for i, method in enumerate(dict.fromkeys(r.method for r in rows if r.method != "full")):
        pts = sorted((r.num_experts, r.test_score, r.test_std or 0.0) for r in rows if r.method == method)
        xs, ys, errs = zip(*pts)
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker=markers[i % len(markers)], capsize=3,
                    color="black" if method == "eep" else colours[(2 * i) % 20 + (i // 10) % 2],
                    linewidth=2.5 if method == "eep" else 1.2,
                    label=method)
    for r in rows:
        if r.method == "full":
            ax.axhline(r.test_score, color="grey", linestyle="--", label=f"full ({r.num_experts} experts)")
    ax.set_xlabel("experts kept per MoE layer")
    ax.set_ylabel("test score")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
