"""python train.py [overrides]      one fine-tune (conf/config.yaml)
python train.py -m [overrides]   an Optuna sweep (sweeps/, phitune's own sweeper)
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

import phitune.config  # noqa: F401  (registers the structured configs)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> float | None:
    from phitune.errors import PhituneError
    from phitune.recipe import run

    hc = HydraConfig.get()
    try:
        return run(cfg, list(hc.overrides.task))
    except PhituneError as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as FAILED with this message
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
