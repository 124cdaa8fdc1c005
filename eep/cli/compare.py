"""``eep-compare``: the Hydra app that scores a list of methods at the same expert counts (``resume=<folder>`` goes on
with a stopped one). See conf/eep_compare.yaml."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import eep
from eep.cli.common import fail, user_errors
from eep.logs import quiet_third_party, verbose_requested

PROG = "eep-compare"


def redirect_resume(argv: list[str]) -> list[str]:
    """Unknown keys and config-group options refused first (before Hydra composes: one line, exit 2);
    ``resume=<folder>``: make Hydra's run folder that folder (checked first: a bad one is one line, exit 2)."""
    from eep.errors import UserError
    from eep.settings import check_overrides

    try:
        check_overrides(argv, compare=True)
    except UserError as err:
        sys.exit(fail(PROG, err))
    values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not values or values[-1] in ("", "null"):
        return argv
    from eep.app.compare import resume_folder

    try:
        folder = resume_folder(values[-1]).resolve()
    except UserError as err:
        sys.exit(fail(PROG, err))
    return [*argv, f"hydra.run.dir={folder}"]


@hydra.main(version_base="1.3", config_path=str(eep.conf_dir()), config_name="eep_compare")
def app(cfg: DictConfig) -> None:
    quiet_third_party(verbose_requested(cfg))  # third-party noise off unless verbose=true
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        with user_errors(PROG):
            from eep.app.compare import run

            run(cfg, run_dir, list(hydra_cfg.overrides.task))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the finished rows are kept: resume with resume={run_dir}", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    sys.argv = [sys.argv[0], *redirect_resume(sys.argv[1:])]
    app()


if __name__ == "__main__":
    main()
