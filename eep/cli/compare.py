"""``eep-compare``: the Hydra app that scores a list of methods at the same expert counts. See conf/eep_compare.yaml."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import eep
from eep.cli.common import user_errors


@hydra.main(version_base="1.3", config_path=str(eep.conf_dir()), config_name="eep_compare")
def app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with user_errors("eep-compare"):
        from eep.compare import run

        run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
