"""Hydra apps that know nothing of phitune (no `trial` or `tracking` node), written into a
test's tmp_path and run as `python APP.py -m ...`: the shapes of the Hydra Optuna sweeper's
own example apps and of lightning-hydra-template, with only the sweeper override changed.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

QUADRATIC = '''
"""x^2 + y^2: the smallest objective a sweep can minimise."""
import hydra


@hydra.main(config_path="conf", config_name="config", version_base=None)
def quadratic(cfg):
    if cfg.get("crash"):
        raise RuntimeError("asked to crash")
    return cfg.x ** 2 + cfg.y ** 2


if __name__ == "__main__":
    quadratic()
'''

QUADRATIC_CONF = '''
defaults:
  - override hydra/sweeper: phitune_optuna
  - override hydra/sweeper/sampler: tpe
hydra:
  sweeper:
    sampler:
      seed: 123
    direction: minimize
    study_name: quadratic
    storage: null
    n_trials: 20
    n_jobs: 1
    max_failure_rate: 0.0
    params:
      x: range(-5.5, 5.5, step=0.5)
      y: choice(-5, 0, 5)
x: 1
y: 1
z: 1
crash: false
'''

GRID_CONF = '''
defaults:
  - override hydra/sweeper: phitune_optuna
  - override hydra/sweeper/sampler: grid
hydra:
  sweeper:
    direction: minimize
    study_name: grid
    storage: null
    n_trials: 20
    n_jobs: 1
    params:
      x: choice(-1, 1)
      y: range(-1.0, 1.0, step=1)
      z: choice("foo", "bar")
x: 1
y: 1
z: foo
'''

# Binh and Korn's two-objective test function.
TWO_GOALS = '''
import hydra


@hydra.main(config_path="conf", config_name="config", version_base=None)
def two_goals(cfg):
    return 4 * cfg.x ** 2 + 4 * cfg.y ** 2, (cfg.x - 5) ** 2 + (cfg.y - 5) ** 2


if __name__ == "__main__":
    two_goals()
'''

TWO_GOALS_CONF = '''
defaults:
  - override hydra/sweeper: phitune_optuna
  - override hydra/sweeper/sampler: nsgaii
hydra:
  sweeper:
    sampler:
      seed: 123
    direction: [minimize, minimize]
    study_name: two-goals
    storage: null
    n_trials: 20
    n_jobs: 1
    params:
      x: range(0, 5, step=0.5)
      y: range(0, 3, step=0.5)
x: 1
y: 1
'''

CONSTRAINED = '''
"""Four squares, where z is sampled near x and w is a parameter the config does not have."""
import hydra


@hydra.main(config_path="conf", config_name="config", version_base=None)
def four_squares(cfg):
    return cfg.w ** 2 + cfg.x ** 2 + cfg.y ** 2 + cfg.z ** 2


def configure(cfg, trial):
    x = trial.params["x"]
    trial.suggest_float("z", x - cfg.max_gap, x + cfg.max_gap)
    trial.suggest_float("+w", 0.0, 1.0)  # `+`: w is new to the config


if __name__ == "__main__":
    four_squares()
'''

CONSTRAINED_CONF = '''
defaults:
  - override hydra/sweeper: phitune_optuna
hydra:
  sweeper:
    sampler:
      seed: 123
    direction: minimize
    study_name: constrained
    storage: null
    n_trials: 20
    n_jobs: 1
    params:
      x: range(-5.5, 5.5, 0.5)
      y: choice(-5, 0, 5)
    custom_search_space: constrained.configure
x: 1
y: 1
z: 100
max_gap: 0.5
'''

# A training loop's shape: the loss falls with the step, less far the farther x is from 0.3.
# `report` is the two-line opt-in to pruning; `trace` records every step that ran.
CURVE = '''
import time

import hydra

from phitune.sweep import report


@hydra.main(config_path="conf", config_name="config", version_base=None)
def curve(cfg):
    loss = None
    for step in range(1, cfg.steps + 1):
        time.sleep(cfg.sleep_s)
        loss = (cfg.x - 0.3) ** 2 + 1.0 / step
        if cfg.trace:
            with open(cfg.trace, "a") as f:
                f.write(f"{cfg.x} {step}\\n")
        if cfg.flag:
            if report(loss, step, raise_pruned=False):
                return loss
        else:
            report(loss, step)
    return loss


if __name__ == "__main__":
    curve()
'''

CURVE_CONF = '''
defaults:
  - override hydra/sweeper: phitune_optuna
hydra:
  sweeper:
    n_trials: 6
    storage: null
    sampler:
      name: random
      seed: 0
    pruner:
      name: threshold
      upper: 1.2         # (x - 0.3)^2 + 1 at step 1: prunes |x - 0.3| > 0.447
    params:
      x: interval(-1.0, 1.0)
x: 0.0
steps: 4
sleep_s: 0.0
flag: false
trace: null
'''

# An app that logs to MLflow itself, with its own run or (own_run=false) with the run that
# mlflow.log_metric starts and leaves active.
LOGGED = '''
import hydra
import mlflow


def log_curve(cfg):
    for step in range(3):
        mlflow.log_metric("loss", cfg.x * 10 + step, step=step)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def logged(cfg):
    if cfg.own_run:
        with mlflow.start_run():
            log_curve(cfg)
    else:
        log_curve(cfg)
    return cfg.x * 10


if __name__ == "__main__":
    logged()
'''

LOGGED_CONF = '''
defaults:
  - override hydra/sweeper: phitune_optuna
hydra:
  sweeper:
    n_trials: 4
    plots: false
    sampler:
      name: random
      seed: 0
    params:
      x: choice(0, 1, 2, 3, 4, 5, 6, 7)
x: 0
own_run: true
'''

# lightning-hydra-template's layout: configs/train.yaml with groups, an hparams_search group
# whose file has the template's mnist_optuna.yaml shape; train.py returns the optimized metric.
TEMPLATE_TRAIN = '''
import math

import hydra


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg):
    # A stand-in for fitting the network: "accuracy" peaks at lr 1e-2 and batch size 64.
    acc = 1.0 - abs(math.log10(cfg.model.optimizer.lr) + 2) / 4 - abs(cfg.data.batch_size - 64) / 1000
    metrics = {"val/acc_best": acc, "val/loss": 1 - acc}
    return metrics[cfg.optimized_metric] if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
'''

TEMPLATE_FILES = {
    "configs/train.yaml": '''
defaults:
  - _self_
  - data: tiny
  - model: tiny
  - hparams_search: null
task_name: train
optimized_metric: null
''',
    "configs/data/tiny.yaml": "batch_size: 64\n",
    "configs/model/tiny.yaml": '''
optimizer:
  lr: 0.001
net:
  lin1_size: 64
  lin2_size: 128
  lin3_size: 64
''',
    # The template's file with `override /hydra/sweeper: optuna` -> phitune_optuna; its
    # `_target_:` line (the published plugin's class) is dropped, as Hydra looks a sweeper's
    # class up among installed plugins before any plugin code runs.
    "configs/hparams_search/tiny_optuna.yaml": '''
# @package _global_
defaults:
  - override /hydra/sweeper: phitune_optuna

optimized_metric: "val/acc_best"

hydra:
  mode: "MULTIRUN"
  sweeper:
    storage: null
    study_name: null
    n_jobs: 1
    direction: maximize
    n_trials: 20
    sampler:
      _target_: optuna.samplers.TPESampler
      seed: 1234
      n_startup_trials: 10
    params:
      model.optimizer.lr: interval(0.0001, 0.1)
      data.batch_size: choice(32, 64, 128, 256)
      model.net.lin1_size: choice(64, 128, 256)
      model.net.lin2_size: choice(64, 128, 256)
      model.net.lin3_size: choice(32, 64, 128, 256)
''',
}


def write_app(root: Path, name: str, source: str, configs: dict[str, str]) -> Path:
    """root/<name>.py and its config files (paths relative to root); returns the script."""
    for rel, text in configs.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    script = root / f"{name}.py"
    script.write_text(textwrap.dedent(source).lstrip())
    return script
