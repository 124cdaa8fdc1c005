"""``eep-search``: the Hydra app that runs (or resumes) an EEP search. See conf/eep_search.yaml."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import eep
from eep.cli.common import fail, user_errors
from eep.logs import quiet_third_party, verbose_requested
from eep.parallel import WorkerLost
from eep.search import run as R
from eep.settings import UserError, check_overrides

PROG = "eep-search"


def _redirect_resume(argv: list[str]) -> list[str]:
    """Unknown keys and config-group options refused first (before Hydra composes: one line, exit 2);
    ``resume=<folder>``: make Hydra's run folder that folder, so the run goes on where it was."""
    try:
        check_overrides(argv)
    except UserError as err:
        sys.exit(fail(PROG, err))
    for arg in argv:
        if arg.startswith("resume=") and arg.split("=", 1)[1] not in ("", "null"):
            folder = Path(arg.split("=", 1)[1]).resolve()
            if not (folder / R.CONFIG).is_file():
                sys.exit(fail(PROG, UserError(f"resume={folder} is not an eep-search run folder (no {R.CONFIG}); "
                                              f"give the folder a run printed when it started")))
            return [*argv, f"hydra.run.dir={folder}"]
    return argv


def _effective_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """On resume, the run's own saved config with any other overrides applied (checked against the checkpoint)."""
    if not cfg.resume:
        return cfg
    from hydra.core.hydra_config import HydraConfig

    return R.resumed_config(cfg, OmegaConf.load(run_dir / R.CONFIG), list(HydraConfig.get().overrides.task))


@hydra.main(version_base="1.3", config_path=str(eep.conf_dir()), config_name="eep_search")
def app(cfg: DictConfig) -> None:
    quiet_third_party(verbose_requested(cfg))  # third-party noise off unless verbose=true
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors(PROG):
            from eep.search.app import run

            run(_effective_config(cfg, run_dir), run_dir)
    except WorkerLost as err:  # a candidate that keeps killing its Ray worker: the run stays resumable
        print(f"{PROG}: error: {err}; resume with resume={run_dir}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    sys.argv = [sys.argv[0], *_redirect_resume(sys.argv[1:])]
    app()


if __name__ == "__main__":
    main()
