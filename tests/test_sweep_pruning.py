"""Pruning on the training-progress axis: trials compared at the same training tokens,
warm-up relative to a trial's length, pruned compute in the budget and on the parent run."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from phitune.errors import PhituneError
from phitune.sweep import study as st
from phitune.sweep.axis import PLANNED_ATTR, REPORT_TOKENS_ATTR, ReportPoints, report_interval
from phitune.sweep.pruning import ProgressPruner, build_pruner, pruner_spec
from phitune.sweep.settings import PrunerConf
from sweep_app.harness import load_study, make_stores, run, runs, toy_cmd

REPO = Path(__file__).resolve().parents[1]


def conf(**kw):
    return OmegaConf.merge(OmegaConf.structured(PrunerConf), kw)


def _study(tmp_path, spec):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s", pruner=build_pruner(spec))
    study.set_user_attr(st.PRUNER_ATTR, spec)
    return url, study


# -- the axis --------------------------------------------------------------------------------

def test_report_points_are_multiples_of_the_interval_and_big_steps_skip_some():
    assert report_interval(92_160, 0.1) == 9216
    points = ReportPoints(100)
    # A trial of small steps reports at each point; a step that jumps two points reports the higher.
    assert [points.crossed(t) for t in (60, 120, 150, 330, 340, 400)] == [None, 100, None, 300, None, 400]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _subset(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n", encoding="utf-8")
    return dst


@pytest.mark.slow
def test_batch_8_and_batch_32_trials_report_at_the_same_training_tokens(tmp_path, tiny_model_dir):
    from phitune.recipe import run as train

    train_file = _subset(REPO / "data/support_train.jsonl", tmp_path / "train.jsonl", 48)
    valid_file = _subset(REPO / "data/support_valid.jsonl", tmp_path / "valid.jsonl", 8)
    spec = pruner_spec(conf(name="median", n_startup_trials=100, report_every=0.25))  # reports, never prunes
    url, study = _study(tmp_path, spec)
    trials = {}
    for multiplier in (1, 4):  # 8 and 32 examples per optimizer step
        trial = study.ask()
        value = train(_compose([
            f"data.train_file={train_file}", f"data.validation_file={valid_file}", "train.epochs=1",
            f"train.batch_size_multiplier={multiplier}", "train.progress=false", "train.evaluate_at_end=false",
            "tracking.log_model=false", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
            f"train.output_dir={tmp_path}/ckpt-{multiplier}", f"trial.storage={url}", "trial.study_name=s",
            f"trial.number={trial.number}"]))
        study.tell(trial, value)
        trials[multiplier] = study.get_trials()[trial.number]
    small, big = trials[1], trials[4]
    every = small.user_attrs[REPORT_TOKENS_ATTR]
    assert big.user_attrs[REPORT_TOKENS_ATTR] == every == round(0.25 * small.user_attrs[PLANNED_ATTR])
    for t in (small, big):
        assert t.user_attrs[st.TOKENS_ATTR] == t.user_attrs[PLANNED_ATTR]  # the plan is what the loop trained
        assert t.intermediate_values and all(step % every == 0 for step in t.intermediate_values)
    # Steps are tokens, not optimizer-step indices (6 steps of 8 examples, 2 of 32)...
    assert min(small.intermediate_values) >= every > 6
    # ...so every point the batch-32 trial reported, the batch-8 trial reported too: the pruner
    # compares them at the same amount of training.
    assert set(big.intermediate_values) <= set(small.intermediate_values)
    assert len(big.intermediate_values) < len(small.intermediate_values)


# -- settings and pruners --------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("median", optuna.pruners.MedianPruner),
                                       ("percentile", optuna.pruners.PercentilePruner),
                                       ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
                                       ("hyperband", optuna.pruners.HyperbandPruner),
                                       ("wilcoxon", optuna.pruners.WilcoxonPruner),
                                       ("threshold", optuna.pruners.ThresholdPruner)])
def test_each_pruner_is_optunas_on_the_progress_axis(tmp_path, name, cls):
    spec = pruner_spec(conf(name=name, upper=10.0))
    assert spec == pruner_spec(conf(name=name, upper=10.0)) and spec["report_every"] == 0.1  # plain JSON, stable
    url, study = _study(tmp_path, spec)
    pruner = build_pruner(spec)
    assert isinstance(pruner, ProgressPruner)
    t = study.ask()
    t.set_user_attr(PLANNED_ATTR, 1000)
    t.set_user_attr(REPORT_TOKENS_ATTR, 100)
    t.report(1.0, 100)
    pruner.prune(study, study.get_trials()[0])
    assert isinstance(pruner._inner, cls)
    assert isinstance(build_pruner(pruner_spec(conf(name="none"))), optuna.pruners.NopPruner)


@pytest.mark.parametrize("setting, message", [
    ({"name": "percentile", "percentile": 100}, "pruner.percentile=100.0: expected a number between 0 and 100"),
    ({"report_every": 0}, "pruner.report_every=0.0: expected a fraction > 0"),
    ({"warmup": 1.5}, "pruner.warmup=1.5: expected a fraction >= 0 and <= 1"),
    ({"finish_from": 0}, "pruner.finish_from=0.0: expected a fraction > 0 and <= 1"),
    ({"name": "hyperband", "min_resource": "soon"}, "pruner.min_resource='soon': expected auto or a number"),
    ({"name": "successive_halving", "reduction_factor": 1}, "pruner.reduction_factor=1: expected a whole number >= 2"),
    ({"name": "wilcoxon", "p_threshold": 2}, "pruner.p_threshold=2.0: expected a p-value"),
])
def test_bad_pruner_settings_name_the_setting(setting, message):
    with pytest.raises(PhituneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pruner_spec(conf(**setting))


def test_warmup_is_a_fraction_of_each_trials_own_length(tmp_path):
    spec = pruner_spec(conf(name="median", n_startup_trials=1, warmup=0.5))
    url, study = _study(tmp_path, spec)
    done = study.ask()
    for step in (100, 200, 300, 400):
        done.report(1.0, step)
    study.tell(done, 1.0)
    pruner = build_pruner(spec)

    def worse_at(step: int, planned: int) -> bool:
        t = study.ask()
        t.set_user_attr(PLANNED_ATTR, planned)
        t.report(5.0, step)  # far worse than the completed trial at the same tokens
        decision = pruner.prune(study, study.get_trials()[t.number])
        study.tell(t, state=TrialState.FAIL)
        return decision

    assert worse_at(200, planned=1000) is False  # 20% of its training: still warming up
    assert worse_at(200, planned=400) is True  # 50% of a shorter trial: judged
    assert worse_at(300, planned=400) is True


@pytest.mark.parametrize("name", ["threshold", "successive_halving"])
def test_no_pruning_once_a_trial_has_trained_finish_from_of_its_own_length(tmp_path, name):
    # threshold upper=0 prunes any report; successive halving prunes a trial worse than the one
    # that reached its rung first (fewer than reduction_factor competitors: only the best goes on).
    spec = pruner_spec(conf(name=name, upper=0.0, finish_from=0.5))
    assert spec["finish_from"] == 0.5
    url, study = _study(tmp_path, spec)
    pruner = build_pruner(spec)
    first = study.ask()
    first.set_user_attr(REPORT_TOKENS_ATTR, 100)
    first.report(1.0, 100)
    pruner.prune(study, study.get_trials()[first.number])
    study.tell(first, 1.0)

    def worse_at(step: int, planned: int) -> bool:
        t = study.ask()
        t.set_user_attr(PLANNED_ATTR, planned)
        t.set_user_attr(REPORT_TOKENS_ATTR, 100)
        t.report(5.0, step)
        decision = pruner.prune(study, study.get_trials()[t.number])
        study.tell(t, state=TrialState.FAIL)
        return decision

    assert worse_at(100, planned=1000) is True  # 10% of its training: judged (the control)
    assert worse_at(600, planned=1000) is False  # 60%: it finishes
    assert worse_at(600, planned=2000) is True  # the same tokens are 30% of a longer trial


@pytest.mark.parametrize("same_length", [False, True])
def test_same_length_compares_a_trial_only_with_trials_planned_as_long(tmp_path, same_length):
    spec = pruner_spec(conf(name="successive_halving", same_length=same_length))
    url, study = _study(tmp_path, spec)
    pruner = build_pruner(spec)

    def rung_decision(planned: int, value: float) -> bool:
        t = study.ask()
        t.set_user_attr(PLANNED_ATTR, planned)
        t.set_user_attr(REPORT_TOKENS_ATTR, 100)
        t.report(value, 100)  # the first rung: 100 tokens for every trial
        decision = pruner.prune(study, study.get_trials()[t.number])
        study.tell(t, state=TrialState.PRUNED) if decision else study.tell(t, value)
        return decision

    assert rung_decision(2000, 1.0) is False  # a 2-epoch trial, ahead at equal tokens
    # A 3-epoch trial behind it: cut against every trial; the first of its length with same_length.
    assert rung_decision(3000, 2.0) is (not same_length)
    assert rung_decision(3000, 3.0) is True  # behind the other 3-epoch trial: cut either way


def test_same_length_is_a_setting_of_the_pruners_that_read_the_trials_only():
    # Hyperband reads its brackets from storage, past the filter: the setting does not reach it.
    assert "same_length" not in pruner_spec(conf(name="hyperband", same_length=True))
    assert pruner_spec(conf(name="percentile", same_length=True))["same_length"] is True


def test_successive_halving_and_hyperband_resources_follow_the_trial_length(tmp_path):
    url, study = _study(tmp_path, pruner_spec(conf(name="hyperband")))
    for planned in (3000, 9000):
        t = study.ask()
        t.set_user_attr(PLANNED_ATTR, planned)
        t.set_user_attr(REPORT_TOKENS_ATTR, 300)
    t.report(1.0, 300)
    hb = build_pruner(pruner_spec(conf(name="hyperband")))
    hb.prune(study, study.get_trials()[t.number])
    assert (hb._inner._min_resource, hb._inner._max_resource) == (300, 9000)  # first report point, longest trial
    sh = build_pruner(pruner_spec(conf(name="successive_halving", reduction_factor=2)))
    sh.prune(study, study.get_trials()[t.number])
    assert (sh._inner._min_resource, sh._inner._reduction_factor) == (300, 2)


# -- compute: budgets, resume, the parent's figures ------------------------------------------

@pytest.mark.slow
def test_pruned_compute_counts_in_the_budget_and_on_the_parent_and_pruned_trials_are_not_rerun(tmp_path):
    s = make_stores(tmp_path)
    # A threshold of 0 prunes every trial at its first report: 100 of its 400 planned tokens.
    prune_all = ["hydra.sweeper.pruner.name=threshold", "hydra.sweeper.pruner.upper=0.0", "hydra.sweeper.plots=false"]
    res = run(toy_cmd(*s.overrides(), *prune_all, "hydra.sweeper.n_trials=10", "hydra.sweeper.max_total_tokens=250"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "token budget spent (300 of 250 training tokens); no new trial starts" in res.stdout
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    (parent,), _ = runs(s)
    m = parent.data.metrics
    assert (m["train_tokens_total"], m["train_tokens_unpruned"], m["train_tokens_saved"]) == (300, 1200, 900)
    assert m["pruning_tokens_ratio"] == pytest.approx(0.25)
    assert parent.data.tags["phitune.compute"] == ("300 training tokens: 0.25 of the 1,200 an unpruned sweep "
                                                   "would have trained (3 trials pruned)")

    # Re-running continues the study: the pruned trials stay pruned and are not run again.
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=4", "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3 + [TrialState.COMPLETE]
    started = [line.split()[1] for line in s.trace_lines() if line.startswith("start")]
    assert started == ["0", "1", "2", "3"]
    (parent,), _ = runs(s)
    assert parent.data.metrics["train_tokens_total"] == 700  # 3 pruned x 100 + 1 complete x 400
    assert parent.data.metrics["train_tokens_unpruned"] == 1600
    assert math.isclose(parent.data.metrics["pruning_tokens_ratio"], 700 / 1600)
