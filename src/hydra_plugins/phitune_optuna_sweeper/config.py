"""Registers the sweeper's settings as `hydra/sweeper: phitune_optuna` (fields: phitune.sweep.settings)."""
from hydra.core.config_store import ConfigStore

from phitune.sweep.settings import PhituneOptunaSweeperConf

ConfigStore.instance().store(group="hydra/sweeper", name="phitune_optuna", node=PhituneOptunaSweeperConf,
                             provider="phitune")
