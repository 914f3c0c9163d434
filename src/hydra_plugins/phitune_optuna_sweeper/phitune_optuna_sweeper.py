"""The Sweeper Hydra instantiates for `python train.py -m` (or any app's -m); the loop is phitune.sweep.driver."""
from __future__ import annotations

import sys
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from .config import PhituneOptunaSweeperConf  # noqa: F401  (registers the config with Hydra)


class PhituneOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        super().__init__()
        # Hydra passes hydra.sweeper's fields (minus _target_) as keyword arguments.
        self.settings: DictConfig = OmegaConf.create({k: v for k, v in settings.items()})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        from phitune.sweep.trial_hook import TrialTask

        self.config = config
        self.hydra_context = hydra_context
        # Each job runs the app's function inside TrialTask (ends an MLflow run the job left active).
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=TrialTask(task_function), config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from phitune.errors import PhituneError
        from phitune.sweep.driver import SweepContext, SweepInterrupted, run_sweep

        assert self.config is not None and self.launcher is not None
        ctx = SweepContext(settings=self.settings, config=self.config, launcher=self.launcher,
                           validate=self.validate_batch_is_legal)
        try:
            return run_sweep(ctx, list(arguments))
        except PhituneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except (SweepInterrupted, KeyboardInterrupt):
            print("interrupted: the running trial(s) were recorded FAILED and queued again; "
                  "re-run the same command to continue the study", file=sys.stderr)
            sys.exit(130)
