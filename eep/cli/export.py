"""``eep-export <run folder> [--genome HASH] [--out DIR]``: write a run's best (or any evaluated) genome as a
vanilla checkpoint."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eep.cli.common import call


def find_genome(run_dir: Path, genome_hash: str | None):
    """The genome of ``best.json``, or of the evaluations.jsonl row with ``genome_hash``."""
    from eep.genome import Genome

    if genome_hash is None:
        best = run_dir / "best.json"
        if not best.is_file():
            raise FileNotFoundError(f"{run_dir} has no best.json yet: the search has not finished; give --genome")
        return Genome.from_dict(json.loads(best.read_text())["genome"])
    for line in (run_dir / "evaluations.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["genome_hash"] == genome_hash and "genome" in row:
            return Genome.from_dict(row["genome"])
    raise ValueError(f"genome {genome_hash} is not among the evaluations of {run_dir}")


def export_run(run_dir: Path, genome_hash: str | None, out: Path | None) -> Path:
    from omegaconf import OmegaConf

    from eep.evaluate.evaluator import Evaluator
    from eep.export import export
    from eep.materialize import Materializer
    from eep.models import ModelConfig, load_model
    from eep.search.app import task_names
    from eep.search.final import calibration_tokens
    from eep.search.run import CONFIG

    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not an eep-search run folder (no {CONFIG})")
    cfg = OmegaConf.load(run_dir / CONFIG)
    genome = find_genome(run_dir, genome_hash)
    out = out or run_dir / f"export-{genome.content_hash()}"
    model, tok = load_model(ModelConfig(**OmegaConf.to_container(cfg.model)))
    mat = Materializer(model)
    calibration = None
    if not genome.is_pruning:
        names, paths = task_names(cfg)
        ev = Evaluator(model, tok, names, role="validation", limit=64, include_paths=paths)
        calibration = calibration_tokens(ev, tok)
    result = export(model, genome, out, tok, materializer=mat, calibration=calibration,
                    provenance={"base_model": model.config._name_or_path, "method": "eep", "run": str(run_dir)})
    print(f"exported genome {result.genome_hash} ({'exact' if result.exact else 'gates refit'}) to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eep-export", description=__doc__)
    parser.add_argument("run", type=Path, help="an eep-search run folder")
    parser.add_argument("--genome", help="a genome hash from evaluations.jsonl (default: best.json's)")
    parser.add_argument("--out", type=Path, help="where to write (default: <run>/export-<hash>)")
    args = parser.parse_args(argv)
    return call("eep-export", export_run, args.run, args.genome, args.out)


if __name__ == "__main__":
    sys.exit(main())
