"""phitune's Hydra sweeper on current Optuna: `hydra/sweeper=phitune_optuna` (conf/config.yaml selects it).

Hydra imports every module of the `hydra_plugins` namespace at start-up, so these
modules import nothing heavy; the work is in phitune.sweep.
"""
