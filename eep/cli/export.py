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
    """Export a genome of ``run_dir`` with the run's own config: the model loaded as the search loaded it, merged
    gates refit on the same calibration as eep-search's own export (``Session.gate_calibration``)."""
    from omegaconf import OmegaConf

    from eep.app.runfolder import CONFIG
    from eep.app.session import Session
    from eep.export import export

    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not an eep-search run folder (no {CONFIG})")
    genome = find_genome(run_dir, genome_hash)
    out = out or run_dir / f"export-{genome.content_hash()}"
    session = Session(OmegaConf.load(run_dir / CONFIG), search=False)
    calibration = None if genome.exports_exactly else session.gate_calibration()
    result = export(session.model, genome, out, session.tok, materializer=session.mat, calibration=calibration,
                    provenance={"base_model": session.model.config._name_or_path, "method": "eep",
                                "run": str(run_dir)})
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
