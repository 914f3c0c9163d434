"""python train.py [overrides]      one fine-tune (conf/config.yaml)
python train.py -m [overrides]   an Optuna sweep (sweeps/, phitune's own sweeper)
"""
import gc
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

import phitune.config  # noqa: F401  (registers the structured configs)
from phitune.errors import PhituneError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> float | None:
    from phitune.preflight import check_run

    hc = HydraConfig.get()
    try:
        check_run(cfg)  # before `import phitune.recipe` (torch, ~3 s): bad folders and stores fail in a second
        from phitune.recipe import run

        return run(cfg, list(hc.overrides.task))
    except PhituneError as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as FAILED with this message
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:
        from phitune.train.memory import is_out_of_memory, out_of_memory_line

        if hc.mode == RunMode.MULTIRUN or not is_out_of_memory(exc):
            raise  # a sweep's trial: the sweeper records the same line
        print(f"error: {out_of_memory_line(exc)}", file=sys.stderr)  # not a traceback: the settings to change
        sys.exit(1)


def _check_hydra_dirs() -> None:
    """Hydra makes hydra.run.dir / hydra.sweep.dir before main(): a bad one is refused here."""
    from phitune.preflight import check_hydra_dirs

    try:
        check_hydra_dirs(sys.argv[1:])
    except PhituneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    _check_hydra_dirs()
    main()
    # The interpreter's last collections would walk every object torch, transformers and MLflow
    # made (8-11 s of a loaded 2-core box's exit, 1.0-1.2 s frozen: bench/README.md); nothing is
    # left to run, and atexit handlers and refcounted clean-up still do.
    gc.freeze()
