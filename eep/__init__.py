"""eep: evolutionary expert pruning and merging for Mixture-of-Experts language models."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("eep")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"


def conf_dir() -> Path:
    """The Hydra config folder: ``eep/conf`` inside an installed wheel, the top-level ``conf/`` in a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"eep's config folder is missing (looked in {here / 'conf'} and {here.parent / 'conf'}); "
                            f"reinstall eep")


def run_search(cfg, run_dir=None):
    """Run (or, with ``cfg.resume``, resume) an EEP search of a composed ``eep_search`` config in ``run_dir``; the
    report as a dict (None if the run was already finished). The same code ``eep-search`` runs."""
    from eep.search.app import run

    return run(cfg, Path(run_dir) if run_dir is not None else Path("runs") / "python")
