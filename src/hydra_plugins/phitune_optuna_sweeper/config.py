"""Registers `hydra/sweeper: phitune_optuna` and the `hydra/sweeper/sampler` group
(tpe, random, grid, cmaes, qmc, nsgaii, nsgaiii, gp); fields: phitune.sweep.settings."""
from hydra.core.config_store import ConfigStore

from phitune.sweep.settings import SAMPLER_GROUP, PhituneOptunaSweeperConf

_cs = ConfigStore.instance()
_cs.store(group="hydra/sweeper", name="phitune_optuna", node=PhituneOptunaSweeperConf, provider="phitune")
for _name, _node in SAMPLER_GROUP.items():
    _cs.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="phitune")
