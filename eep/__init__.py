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
    """Run (or, with ``cfg.resume``, resume) an EEP search of a composed ``eep_search`` config in ``run_dir``
    (default ``runs/python/<date>/<time>``); the report as a dict (None if the run was already finished, {} if it
    stopped at ``search.time_limit``). The same code ``eep-search`` runs (:func:`eep.app.search.run`)."""
    from eep.app.search import run

    return run(cfg, _run_dir(run_dir, "python"))


def run_compare(cfg, run_dir=None):
    """Run (or, with ``cfg.resume``, resume) a comparison of a composed ``eep_compare`` config in ``run_dir``
    (default ``runs/compare/python/<date>/<time>``); its rows (None if finished before or a search stopped at its
    time limit). The same code ``eep-compare`` runs (:func:`eep.app.compare.run`)."""
    from eep.app.compare import run

    return run(cfg, _run_dir(run_dir, "compare/python"))


def _run_dir(run_dir, under: str) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    import datetime

    return Path("runs") / under / datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
