"""``eep-search``: the Hydra app that runs (or resumes) an EEP search. See conf/eep_search.yaml."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import eep
from eep.cli.common import fail, user_errors
from eep.errors import UserError
from eep.logs import quiet_third_party, verbose_requested
from eep.parallel import WorkerLost
from eep.settings import check_overrides

PROG = "eep-search"


def redirect_resume(argv: list[str]) -> list[str]:
    """Unknown keys and config-group options refused first (before Hydra composes: one line, exit 2);
    ``resume=<folder>``: make Hydra's run folder that folder, so the run goes on where it was."""
    from eep.app.runfolder import search_folder

    try:
        check_overrides(argv)
        values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
        if not values or values[-1] in ("", "null"):
            return argv
        return [*argv, f"hydra.run.dir={search_folder(values[-1])}"]
    except UserError as err:
        sys.exit(fail(PROG, err))


@hydra.main(version_base="1.3", config_path=str(eep.conf_dir()), config_name="eep_search")
def app(cfg: DictConfig) -> None:
    quiet_third_party(verbose_requested(cfg))  # third-party noise off unless verbose=true
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors(PROG):
            from eep.app.search import run

            run(cfg, run_dir, list(HydraConfig.get().overrides.task))
    except WorkerLost as err:  # a candidate that keeps killing its Ray worker: the run stays resumable
        print(f"{PROG}: error: {err}; resume with resume={run_dir}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    sys.argv = [sys.argv[0], *redirect_resume(sys.argv[1:])]
    app()


if __name__ == "__main__":
    main()
