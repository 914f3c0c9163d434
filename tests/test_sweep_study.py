"""The study side in one process: pruner specs, samplers, retries of stale trials, counting,
and the TrialReporter a job uses (report, prune, tokens)."""
from __future__ import annotations

import time

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from phitune.errors import PhituneError
from phitune.sweep import study as st
from phitune.sweep.settings import PrunerConf, SamplerConf
from phitune.sweep.trial_hook import TrialReporter


def conf(cls, **kw):
    return OmegaConf.merge(OmegaConf.structured(cls), kw)


@pytest.mark.parametrize("name", ["median", "successive_halving", "hyperband"])
def test_pruner_spec_rebuilds_the_same_pruner(name):
    # Optuna's pruner inside: tests/test_sweep_pruning.py
    spec = st.pruner_spec(conf(PrunerConf, name=name))
    assert st.build_pruner(spec).name == name
    assert st.pruner_spec(conf(PrunerConf, name=name)) == spec  # plain JSON, stable
    assert isinstance(st.build_pruner(st.pruner_spec(conf(PrunerConf, name="none"))), optuna.pruners.NopPruner)


def test_unknown_sampler_or_pruner_is_a_clear_error():
    with pytest.raises(PhituneError, match="sampler.name='bayes'.*tpe, random, grid, cmaes, qmc"):
        st.make_sampler(conf(SamplerConf, name="bayes"), {})
    with pytest.raises(PhituneError, match="pruner.name='early'"):
        st.pruner_spec(conf(PrunerConf, name="early"))


def test_samplers():
    space = {"a": optuna.distributions.IntDistribution(1, 3)}
    assert isinstance(st.make_sampler(conf(SamplerConf, name="random", seed=1), space, 4), optuna.samplers.RandomSampler)
    assert isinstance(st.make_sampler(conf(SamplerConf, name="grid"), space), optuna.samplers.GridSampler)
    assert isinstance(st.make_sampler(conf(SamplerConf, name="qmc", seed=0), space), optuna.samplers.QMCSampler)
    assert st.grid_size({**space, "b": optuna.distributions.CategoricalDistribution(["x", "y"])}) == 6


def test_sqlite_storage_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert st.absolute_storage_url("sqlite:///mlruns/optuna.db") == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert (tmp_path / "mlruns").is_dir()
    assert st.absolute_storage_url("postgresql://u:pw@h/db") == "postgresql://u:pw@h/db"
    assert "pw" not in st.display_url("postgresql://u:pw@h/db")


def _study(tmp_path, pruner_spec=None, **storage_kw):
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = st.open_storage(url, **storage_kw)
    study = optuna.create_study(storage=storage, study_name="s")
    study.set_user_attr(st.PRUNER_ATTR, pruner_spec or {"name": "none"})
    return url, storage, study


def test_stale_trial_is_failed_and_retried_a_bounded_number_of_times(tmp_path):
    url, storage, study = _study(tmp_path, heartbeat_interval=1, grace_period=1,
                                 stale_callback=st.retry_callback(max_retries=1))
    dist = optuna.distributions.FloatDistribution(0, 1)
    trial = study.ask({"x": dist})
    tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), trial.number)
    storage.record_heartbeat(tid)  # ... then the worker dies
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["retry_history"] == [0]
    counts = st.count_trials(trials)
    assert (counts.failed, counts.waiting, counts.allocated) == (0, 1, 1)  # the retry takes the slot

    retry = study.ask()  # a worker pops the WAITING retry first
    assert retry.number == 1 and retry.params == trials[0].params
    tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), 1)
    storage.record_heartbeat(tid)
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]  # max_retries=1: no third try
    assert st.count_trials(trials).failed == 1


def test_a_stale_trial_says_why_it_failed(tmp_path):
    url, storage, study = _study(tmp_path, heartbeat_interval=1, grace_period=1,
                                 stale_callback=st.retry_callback(max_retries=1))
    for _ in range(2):  # the trial, then its retry: both die without a heartbeat
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.number))
        time.sleep(2.5)
        assert st.fail_stale_trials(study, max_retries=1) == [trial.number]
    first, second = study.get_trials()
    assert (first.state, second.state) == (TrialState.FAIL, TrialState.FAIL)
    assert first.user_attrs[st.ERROR_ATTR] == "no heartbeat for 1 s (its worker died); re-queued as a new trial"
    assert second.user_attrs[st.ERROR_ATTR] == "no heartbeat for 1 s (its worker died); not retried (max_retries=1)"
    assert st.fail_stale_trials(study, max_retries=1) == []  # nothing stale is left


def test_an_orphaned_trial_run_gets_its_trial_error(tmp_path):
    from mlflow.tracking import MlflowClient

    from phitune.sweep.parent import STATE_TAG, TRIAL_TAG, ParentRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweeps")
    parent = client.create_run(exp).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, TRIAL_TAG: "0"}).info.run_id  # left RUNNING
    pr = ParentRun(OmegaConf.create({"uri": uri}), parent, exp, resumed=True)
    assert pr.close_orphans({0}, errors={0: "no heartbeat for 60 s (its worker died); re-queued as a new trial"}) == 1
    run = client.get_run(child)
    assert run.info.status == "KILLED" and run.data.tags[STATE_TAG] == "killed"
    assert run.data.tags["phitune.error"] == "no heartbeat for 60 s (its worker died); re-queued as a new trial"


def test_counts_leave_out_discarded_trials_and_slots_follow_numbers(tmp_path):
    _, _, study = _study(tmp_path)
    for i in range(3):
        t = study.ask()
        if i == 1:
            t.set_user_attr(st.DISCARDED_ATTR, True)
            study.tell(t, state=TrialState.FAIL)
        else:
            study.tell(t, 1.0)
    trials = study.get_trials()
    c = st.count_trials(trials)
    assert (c.complete, c.failed, c.finished) == (2, 0, 2)
    assert st.slot_of(trials, 2) == 1


def test_reporter_outside_a_sweep_is_none():
    assert TrialReporter.from_config(OmegaConf.create({"storage": None, "study_name": None, "number": None})) is None


def test_reporter_reports_counts_tokens_and_prunes(tmp_path):
    spec = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "interval_steps": 1}
    url, storage, study = _study(tmp_path, spec)
    first = study.ask()
    for step in (1, 2):
        first.report(1.0, step)
    study.tell(first, 1.0)

    trial = study.ask()
    reporter = TrialReporter.from_config(OmegaConf.create({"storage": url, "study_name": "s", "number": trial.number}))
    assert reporter.study.pruner.name == "median"  # rebuilt from the study's attr (phitune.sweep.pruning)
    reporter.add_tokens(300)
    reporter.report(0.5, 1)  # better than the completed trial at step 1: goes on
    reporter.add_tokens(300)
    reporter.report(0.9, 2)
    frozen = study.get_trials()[trial.number]
    assert frozen.intermediate_values == {1: 0.5, 2: 0.9}
    assert frozen.user_attrs[st.TOKENS_ATTR] == 600
    study.tell(trial, 0.9)

    worse = study.ask()
    reporter = TrialReporter.from_config(OmegaConf.create({"storage": url, "study_name": "s", "number": worse.number}))
    reporter.add_tokens(300)
    with pytest.raises(optuna.TrialPruned):
        reporter.report(2.0, 1)  # worse than the median at its first report
    assert study.get_trials()[worse.number].user_attrs[st.TOKENS_ATTR] == 300  # written before pruning


def test_reporter_refuses_a_trial_that_is_not_running(tmp_path):
    url, storage, study = _study(tmp_path)
    t = study.ask()
    study.tell(t, 1.0)
    with pytest.raises(PhituneError, match="is COMPLETE, not RUNNING"):
        TrialReporter.from_config(OmegaConf.create({"storage": url, "study_name": "s", "number": 0}))
    with pytest.raises(PhituneError, match="no study 'nope'"):
        TrialReporter.from_config(OmegaConf.create({"storage": url, "study_name": "nope", "number": 0}))


def test_budget_token_and_timeout():
    from types import SimpleNamespace

    from phitune.sweep.driver import Sweep

    def spent(tokens, started, **settings):
        me = SimpleNamespace(s=OmegaConf.create({"max_total_tokens": None, "timeout": None, **settings}),
                             _target_reached=lambda: None)  # stop.target: tests/test_sweep_stop.py
        return Sweep._budget_spent(me, st.Counts(tokens=tokens), started)

    assert spent(10**9, time.monotonic()) is None  # no budget set
    assert spent(799, time.monotonic(), max_total_tokens=800) is None
    assert spent(800, time.monotonic(), max_total_tokens=800).startswith("token budget spent (800 of 800")
    assert spent(0, time.monotonic() - 5, timeout=5) == "timeout reached (5 s)"
    assert spent(0, time.monotonic(), timeout=60) is None


def test_a_storage_password_reaches_jobs_through_the_environment(monkeypatch):
    monkeypatch.delenv(st.STORAGE_ENV, raising=False)
    assert st.job_storage_ref("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    url = "postgresql://sweeper:s3cret-pw@db.example:5432/optuna"
    ref = st.job_storage_ref(url)
    assert "s3cret" not in ref and ref == f"env:{st.STORAGE_ENV}"  # what Hydra logs and MLflow records
    assert st.resolve_storage_ref(ref) == url
    monkeypatch.delenv(st.STORAGE_ENV)
    with pytest.raises(PhituneError, match=f"{st.STORAGE_ENV} is not set"):
        st.resolve_storage_ref(ref)


def test_batch_size_follows_the_launcher_unless_set():
    from phitune.sweep.driver import batch_size

    assert batch_size(None, None) == 1  # Hydra's basic launcher: one trial at a time
    assert batch_size(None, 3) == 3  # hydra/launcher=joblib hydra.launcher.n_jobs=3
    assert batch_size(2, 8) == 2
    assert batch_size(None, -1) >= 1
    with pytest.raises(PhituneError, match="n_jobs=0"):
        batch_size(0, None)
