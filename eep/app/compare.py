"""What ``eep-compare`` does: score a list of methods at the same expert counts on one task's test split, and write
``compare.md``, ``compare.csv`` and ``compare.png`` into the run folder.

Files in the run folder: ``compare_config.yaml`` (the run's config) and ``compare_run.json`` (its hash), written when
it starts; ``compare.jsonl`` (one row per finished method and count, the full model first, rewritten atomically as
each finishes); ``eep_E<n>/`` (the search runs); at the end ``compare.md``, ``compare.png`` and, last,
``compare.csv``, whose presence marks the comparison finished. ``resume=<folder>`` keeps the finished rows, resumes
each unfinished ``eep_E<n>/`` search as the eep-search run it is and computes the rest.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eep import settings
from eep.app import report as reports
from eep.app import runfolder
from eep.app import search as search_app
from eep.app.session import Session, make_evaluator, task_names
from eep.errors import UserError
from eep.files import write_atomic
from eep.search.run import STATE

log = logging.getLogger("eep.compare")

SEARCH = "eep"   # the EEP search itself, listed after the registered methods
CSV, MD, PNG, ROWS = "compare.csv", "compare.md", "compare.png", "compare.jsonl"
CONFIG, RUN = "compare_config.yaml", "compare_run.json"
COLUMNS = ["method", "num_experts", "top_k", "test_score", "test_std", "runs", "seconds", "bytes", "bytes_from",
           "speed_vs_full", "notes"]
SPEED_DOCS = 16   # calibration documents whose prefill is timed for ``speed_vs_full``


@dataclass
class Row:
    """One method at one expert count: ``test_score`` is the task's metric as lm-eval reports it (the mean over
    seeds for ``random``, with ``test_std``), ``seconds`` the method's own time (the search's, for ``eep``).

    ``bytes``: the model's parameter bytes, from its saved checkpoint's weight files where one was written
    (``bytes_from="checkpoint"``: ``compare.export=true``, and the search's export), else counted from the shapes
    (``"count"``); ``speed_vs_full``: prefill tokens per second on ``SPEED_DOCS`` calibration documents over the full
    model's (the candidate in place; the search's exported model), one run on this machine."""

    method: str
    num_experts: int
    top_k: int
    test_score: float
    test_std: float | None = None
    runs: int = 1
    seconds: float = 0.0
    notes: str = ""
    scores: list[float] = field(default_factory=list)
    bytes: int | None = None
    bytes_from: str | None = None
    speed_vs_full: float | None = None


def all_methods() -> list[str]:
    """Every method ``eep-compare`` runs by default: the registry's (``eep.methods.method_names``), then ``eep``."""
    from eep.methods import method_names

    return [*method_names(), SEARCH]


def methods_of(cfg: DictConfig) -> list[str]:
    """``compare.methods`` (null: every method); the names were checked against the registry by
    ``eep.settings.check``, which :func:`validate` runs first."""
    return list(cfg.compare.methods) if cfg.compare.methods else all_methods()


def counts_of(cfg: DictConfig) -> list[int]:
    """``compare.num_experts`` (a list of E'; null: ``[search.num_experts]``)."""
    counts = cfg.compare.num_experts
    if counts is None:
        return [int(cfg.search.num_experts)]
    return [int(n) for n in (counts if OmegaConf.is_list(counts) else [counts])]


def at_count(cfg: DictConfig, num_experts: int) -> DictConfig:
    """``cfg`` with ``search.num_experts`` set and without compare's resume keys (a search sub-run resumes from its
    own folder: ``Comparison.search``)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    out.search.num_experts = num_experts
    out.resume, out.resume_force = None, False
    return out


def validate(cfg: DictConfig) -> tuple[list[str], list[tuple[int, int]]]:
    """Methods, and ``(E', k')`` per expert count, all checked before the model loads (``eep.settings``: every key,
    then each count against the model's config.json)."""
    settings.check(cfg, "eep-compare")
    shapes = [settings.check_shape(cfg, n) for n in counts_of(cfg)]
    return methods_of(cfg), [(s.num_experts, s.top_k) for s in shapes]


def resume_folder(value) -> Path:
    """The run folder ``resume=<value>`` names, or a UserError naming it and the fix."""
    folder = Path(str(value))
    if (folder / CONFIG).is_file():
        return folder
    other = (f"; it is an eep-search run: resume it with eep-search resume={value}"
             if (folder / runfolder.CONFIG).is_file() else "")
    raise UserError(f"resume={value} is not an eep-compare run folder (no {CONFIG}){other}; give the folder the "
                    f"comparison printed when it started (runs/compare/<date>/<time>)")


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """On resume, the run's saved config with ``overrides`` applied, as eep-search does
    (:func:`eep.app.runfolder.resumed_config`); ``run`` then checks the result against the run's hash."""
    if not cfg.resume:
        return cfg
    return runfolder.resumed_config(cfg, OmegaConf.load(resume_folder(cfg.resume) / CONFIG), overrides)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> list[Row] | None:
    """Compare the configured methods in ``run_dir`` (``cfg.resume``: go on with that run, with a command line's
    ``overrides`` applied to its saved config: :func:`resumed_config`); returns the rows in the canonical order (the
    full model first, then every method at each count), or None if the run was finished before or a search sub-run
    stopped at its time limit (resumable)."""
    if overrides is not None:
        cfg = resumed_config(cfg, overrides)
    if cfg.resume:
        run_dir = resume_folder(cfg.resume)
        if (run_dir / CSV).exists():
            print(f"comparison {run_dir} is finished; nothing to do (table: {run_dir / MD})")
            return None
        saved = json.loads((run_dir / RUN).read_text())["config_hash"] if (run_dir / RUN).exists() else None
        runfolder.refuse_changed(saved, cfg, run_dir, cfg.resume_force)
    elif (run_dir / CONFIG).exists():
        raise UserError(f"{run_dir} already holds a comparison; resume it with resume={run_dir}")
    methods, shapes = validate(cfg)
    if not cfg.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / RUN, json.dumps({"config_hash": runfolder.config_hash(cfg),
                                                "versions": runfolder.package_versions()}, indent=1) + "\n")
        write_atomic(run_dir / CONFIG, OmegaConf.to_yaml(cfg))  # last: it marks the folder a comparison's
    log.info("comparison in %s (after a stop: eep-compare resume=%s)", run_dir, run_dir)
    if cfg.evaluator.threads:  # as eep-search sets it, so that every row is computed with the same threads
        import torch

        torch.set_num_threads(cfg.evaluator.threads)
    done = {_key(r): r for r in load_rows(run_dir / ROWS)}
    if done:
        log.info("resuming: %d finished rows kept", len(done))
    session = Comparison(cfg, run_dir)
    rows = []
    for key in [("full", None, None), *[(m, kept, top_k) for kept, top_k in shapes for m in methods]]:
        row = done.get(key)
        if row is None:
            row = session.full_row() if key[0] == "full" else session.row(*key)
            if row is None:  # a search sub-run stopped at search.time_limit
                print(f"the comparison stopped with its search at E'={key[1]} unfinished; resume with "
                      f"resume={run_dir}")
                return None
            done[key] = row
            _write_rows(run_dir / ROWS, done.values())
        rows.append(row)
    write_outputs(cfg, run_dir, rows)
    return rows


def _key(row: Row) -> tuple:
    """What identifies a row of a run: the method and its shape (one full-model row)."""
    return ("full", None, None) if row.method == "full" else (row.method, row.num_experts, row.top_k)


class Comparison:
    """The rows of one comparison: the session (model, materialiser), the test evaluator and the calibration
    tokens are shared by every method, loaded on first use (a resumed run whose remaining rows are searches never
    loads the model here)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.names, _ = task_names(cfg)
        self.loaded = False

    def load(self) -> None:
        if self.loaded:
            return
        session = self.session = Session(self.cfg, search=False)
        self.model, self.tok, self.mat = session.model, session.tok, session.mat
        self.tester = session.evaluator("test")
        self.calibration = _calibration(self.cfg, self.model, self.tok)
        self.loaded = True

    def score(self) -> float:
        score = self.tester.evaluate()
        if score.error:
            log.warning("evaluation failed: %s", score.error)
        return reports.reported_value(score, self.names)

    def full_row(self) -> Row:
        from eep.evaluate.measure import checkpoint_bytes, parameter_bytes

        self.load()
        adapter = self.mat.adapter
        files = checkpoint_bytes(getattr(self.model, "name_or_path", None))
        return Row("full", adapter.num_experts, adapter.top_k, self.score(),
                   bytes=files or parameter_bytes(self.model), bytes_from="checkpoint" if files else "count",
                   speed_vs_full=1.0)

    def speed(self) -> float:
        """The model's prefill speed as it computes now over the full model's (timed once per comparison)."""
        from eep.evaluate.measure import prefill_speed

        batch = {k: v[:SPEED_DOCS] for k, v in self.calibration.items()}
        if "_full_speed" not in self.__dict__:
            with self.mat.preserved():
                self._full_speed = prefill_speed(self.model, batch)
        return prefill_speed(self.model, batch) / self._full_speed

    def row(self, method: str, kept: int, top_k: int) -> Row:
        if method == SEARCH:
            return self.search(kept, top_k)
        self.load()
        seeds = range(self.cfg.compare.random_seeds) if method == "random" else [0]
        scores, seconds, notes, measured = [], 0.0, "", {}
        for seed in seeds:
            result, took = self._compute(method, kept, top_k, self.cfg.seed + seed)
            score, measured = self._score_result(result)
            scores.append(score)
            seconds += took
            notes = _notes(result.info)
        std = statistics.stdev(scores) if len(scores) > 1 else None
        row = Row(method, kept, top_k, statistics.fmean(scores), std, len(scores), round(seconds, 2), notes, scores,
                  **measured)
        log.info("%s at E'=%d: test %.4f", method, kept, row.test_score)
        return row

    def _compute(self, method: str, kept: int, top_k: int, seed: int):
        from eep.methods import compute
        from eep.methods.selection import pruning_result

        options = OmegaConf.to_container(self.cfg.compare.options.get(method, {})) \
            if self.cfg.compare.options else {}
        start = time.perf_counter()
        saved = self._saved_scores()
        if method in saved and not options:  # statistics=<file>: that run's scores, no calibration pass
            result = pruning_result(method, self.mat, saved[method], kept, top_k, statistics=str(self.cfg.statistics))
        else:
            result = compute(method, self.model, self.mat, self.calibration, num_kept=kept, top_k=top_k, seed=seed,
                             **options)
        return result, time.perf_counter() - start

    def _saved_scores(self) -> dict:
        """``statistics=<file>`` (an eep-search run's ``statistics.safetensors``): its per-expert scores."""
        if not self.cfg.get("statistics"):
            return {}
        if "_scores" not in self.__dict__:
            from eep.methods.expert_scores import load_scores

            adapter = self.mat.adapter
            self._scores = load_scores(self.cfg.statistics, len(adapter.layers), adapter.num_experts)[0]
        return self._scores

    def _score_result(self, result) -> tuple[float, dict]:
        """The result's test score, and its ``bytes`` / ``bytes_from`` / ``speed_vs_full`` for the row."""
        from eep.evaluate.measure import checkpoint_bytes, parameter_counts
        from eep.methods import applied, export_result

        with applied(self.mat, result):
            value = self.score()
            speed = self.speed()
        element = next(self.model.parameters()).element_size()
        measured = {"bytes": element * parameter_counts(self.model, self.mat.adapter, result.genome.num_kept)["total"],
                    "bytes_from": "count", "speed_vs_full": speed}
        if self.cfg.compare.export:
            folder = self.run_dir / "models" / f"{result.method}_E{result.genome.num_kept}"
            export_result(self.mat, result, folder, self.tok, calibration=self.calibration)
            measured.update(bytes=checkpoint_bytes(folder), bytes_from="checkpoint")
        return value, measured

    def search(self, kept: int, top_k: int) -> Row | None:
        """The EEP search at this count, as its own ``eep-search`` run in ``eep_E<n>/``: resumed there if a stopped
        run left its checkpoint (``resume_force`` passed on); None if it stops at ``search.time_limit``."""
        folder = self.run_dir / f"eep_E{kept}"
        sub = at_count(self.cfg, kept)
        if (folder / STATE).exists() or (folder / f"{STATE}.prev").exists():
            sub.resume, sub.resume_force = str(folder), bool(self.cfg.resume_force)
            log.info("resuming the search run %s", folder)
        start = time.perf_counter()
        self.load()   # the search reuses this process's model instead of loading it a second time
        report = search_app.run(sub, folder, loaded=self.session)
        self.mat.restore()
        if report is None:  # finished before
            report = json.loads((folder / "report.json").read_text())
        if not report:  # stopped at its time limit, resumable
            return None
        saved = report.get("savings") or {}
        return Row(SEARCH, kept, top_k, float(report["test"]["best_in_place"]), None, 1,
                   round(time.perf_counter() - start, 2), f"search run: {folder.name}/, "
                   f"{report['evaluations']} evaluations", bytes=(saved.get("checkpoint_bytes") or {}).get("exported"),
                   bytes_from="checkpoint", speed_vs_full=(saved.get("speed_vs_full") or {}).get("prefill"))


def _calibration(cfg: DictConfig, model, tok) -> dict:
    """Calibration tokens: the task's search split (``compare.calibration=task``) or the mixed-skills corpus."""
    from eep.methods import calibration_batch

    source = "skills_all" if cfg.compare.calibration == "skills_all" else make_evaluator(cfg, model, tok, "search")
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


def _write_rows(path: Path, rows) -> None:
    """``compare.jsonl``: every finished row, one JSON object a line, rewritten atomically."""
    write_atomic(path, "".join(json.dumps(asdict(r)) + "\n" for r in rows))


def load_rows(path: Path) -> list[Row]:
    """The finished rows a run recorded (none if it recorded none)."""
    if not path.exists():
        return []
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def write_outputs(cfg: DictConfig, run_dir: Path, rows: list[Row]) -> None:
    """``compare.md``, ``compare.png`` and, last, ``compare.csv`` (one row per method and expert count), each
    written atomically; the table to stdout."""
    table = _markdown(rows)
    names, _ = task_names(cfg)
    head = (f"# eep-compare: {', '.join(names)} on {cfg.model.path or cfg.model.name}\n\n"
            f"Test split, {cfg.evaluator.test_limit or 'all'} documents; calibration: {cfg.compare.calibration}; "
            f"seed {cfg.seed}.\n\n")
    write_atomic(run_dir / MD, head + table + "\n")
    png = io.BytesIO()
    plot(rows, png)
    write_atomic(run_dir / PNG, png.getvalue())
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_atomic(run_dir / CSV, text.getvalue())
    print(table)


def _markdown(rows: list[Row]) -> str:
    lines = ["| method | experts | top-k | test score | spread (std) | runs | seconds | MiB | prefill speed | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        std = "" if r.test_std is None else f"{r.test_std:.4f}"
        mib = "" if r.bytes is None else f"{r.bytes / 2**20:.2f}{'' if r.bytes_from == 'checkpoint' else ' (count)'}"
        speed = "" if r.speed_vs_full is None else f"{r.speed_vs_full:.2f}x"
        lines.append(f"| {r.method} | {r.num_experts} | {r.top_k} | {r.test_score:.4f} | {std} | {r.runs} | "
                     f"{r.seconds} | {mib} | {speed} | {r.notes} |")
    return "\n".join(lines)


def plot(rows: list[Row], path) -> None:
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
                    color="black" if method == SEARCH else colours[(2 * i) % 20 + (i // 10) % 2],
                    linewidth=2.5 if method == SEARCH else 1.2,
                    label=method)
    for r in rows:
        if r.method == "full":
            ax.axhline(r.test_score, color="grey", linestyle="--", label=f"full ({r.num_experts} experts)")
    ax.set_xlabel("experts kept per MoE layer")
    ax.set_ylabel("test score")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
