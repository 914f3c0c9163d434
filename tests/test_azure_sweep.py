"""`python train.py -m backend=azureml`: the Optuna search space and settings as an Azure ML sweep job."""
from __future__ import annotations

import math
import shlex

import azure_transport  # noqa: F401  first: imports azure-ai-ml with its marshmallow warnings silenced
import pytest
from azure.ai.ml import load_job
from azure.ai.ml.sweep import (
    BanditPolicy, BayesianSamplingAlgorithm, Choice, GridSamplingAlgorithm, LogUniform, MedianStoppingPolicy,
    QLogUniform, QUniform, RandomSamplingAlgorithm, TruncationSelectionPolicy, Uniform,
)
from hydra import compose, initialize_config_dir

from azure_transport import ARM, REPO, RG, SUB, WS, FakeCredential, RecordingTransport, code_version, echo_job, \
    fast_token_counter
from phitune.azure.sweep_job import (
    PRIMARY_METRIC, build_sweep_job, early_termination, goal, sampling_algorithm, submit_sweep, translate_param,
)
from phitune.azure.settings import backend_settings
from phitune.errors import PhituneError

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:.*:Warning:marshmallow"),
              pytest.mark.filterwarnings("ignore:.*:Warning:azure")]

WS_OVERRIDES = [f"backend.subscription_id={SUB}", f"backend.resource_group={RG}", f"backend.workspace={WS}"]
PARAMS = {
    "train.learning_rate_multiplier": "interval(0.5, 2.0)",
    "train.batch_size_multiplier": "choice(1, 2, 4)",
    "train.epochs": "int(interval(1, 3))",
}
SWEEPER = {"n_trials": 12, "sampler": "tpe", "direction": "minimize", "pruner": {"name": "none"}, "timeout": 7200,
           "n_jobs": 3}


def compose_cfg(overrides):
    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _project(monkeypatch, tmp_path):
    monkeypatch.setenv("PHITUNE_ROOT", str(REPO))
    monkeypatch.chdir(tmp_path)
    fast_token_counter(monkeypatch)


def small_project(tmp_path):
    root = tmp_path / "proj"
    (root / "conf").mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text("print('train')\n")
    return str(root)


# -- the translation table, case by case --------------------------------------------------------------

@pytest.mark.parametrize("expr, kind, cls, fields, cast_int", [
    ("interval(0, 0.1)", "uniform", Uniform, {"min_value": 0.0, "max_value": 0.1}, False),
    ("interval(1, 5)", "uniform", Uniform, {"min_value": 1.0, "max_value": 5.0}, False),
    ("tag(log, interval(0.1, 10))", "loguniform", LogUniform,
     {"min_value": math.log(0.1), "max_value": math.log(10)}, False),
    ("int(interval(1, 5))", "quniform", QUniform, {"min_value": 1, "max_value": 5, "q": 1}, True),
    ("tag(log, int(interval(8, 64)))", "qloguniform", QLogUniform,
     {"min_value": math.log(8), "max_value": math.log(64), "q": 1}, True),
    ("choice(1, 2, 4)", "choice", Choice, {"values": [1, 2, 4]}, False),
    ("choice(auto, 3)", "choice", Choice, {"values": ["auto", 3]}, False),
    ("range(1, 4)", "choice", Choice, {"values": [1, 2, 3]}, False),
    ("range(4, 17, 4)", "choice", Choice, {"values": [4, 8, 12, 16]}, False),
])
def test_translation_table(expr, kind, cls, fields, cast_int):
    p = translate_param("train.x", expr)
    assert (p.kind, type(p.distribution), p.cast_int) == (kind, cls, cast_int)
    for name, want in fields.items():
        got = getattr(p.distribution, name)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want
    assert p.name == "train_x" and p.path == "train.x"


def test_plain_value_is_a_fixed_override():
    assert translate_param("seed", "7") == "seed=7"


@pytest.mark.parametrize("expr, match", [
    ("tag(log, interval(0, 1))", "a log scale needs a lower bound above 0"),
    ("interval(2, 1)", "the lower bound must be below the upper bound"),
    ("choice(", "cannot parse"),
    ("choice(1, 1)", "a value appears twice"),  # the local sweeper's rules, on Azure too
])
def test_bad_expressions(expr, match):
    with pytest.raises(PhituneError, match=match):
        translate_param("train.x", expr)


@pytest.mark.parametrize("sampler, cls, rule", [
    ("tpe", BayesianSamplingAlgorithm, None),  # no pruner, no log scale: Azure's model-based sampler
    ("random", RandomSamplingAlgorithm, None),
    ({"_target_": "optuna.samplers.RandomSampler", "seed": 3}, RandomSamplingAlgorithm, None),
    ("grid", GridSamplingAlgorithm, None),
    ({"name": "qmc", "qmc_type": "sobol", "seed": 1}, RandomSamplingAlgorithm, "sobol"),
])
def test_sampler_mapping(sampler, cls, rule):
    sampling = sampling_algorithm(sampler)
    assert isinstance(sampling.algorithm, cls)
    if rule:
        assert sampling.algorithm.rule == rule


LOG_LR = translate_param("train.learning_rate_multiplier", "tag(log, interval(0.2, 5.0))")
EPOCHS = translate_param("train.epochs", "range(1, 4)")


@pytest.mark.parametrize("sampler, params, pruner, cls, note", [
    # The default sweep: TPE, a log-uniform learning rate, median pruning. Before, refused.
    ({"name": "tpe", "seed": 42}, [LOG_LR, EPOCHS], "median", RandomSamplingAlgorithm,
     "Azure ML has no TPE sampler; sampling=random keeps the log-uniform train.learning_rate_multiplier and the "
     "median stopping policy (Azure's bayesian sampling allows neither log-uniform nor early termination)"),
    ("tpe", [EPOCHS], "median", RandomSamplingAlgorithm,
     "sampling=random keeps the median stopping policy (Azure's bayesian sampling allows no early termination)"),
    ("tpe", [LOG_LR], "none", RandomSamplingAlgorithm, "allows no log-uniform)"),
    ("tpe", [EPOCHS], "none", BayesianSamplingAlgorithm, "sampling=bayesian, Azure's model-based sampler"),
    ({"_target_": "optuna.samplers.CmaEsSampler"}, [LOG_LR], "none", RandomSamplingAlgorithm,
     "Azure ML has no CMA-ES sampler; sampling=random"),
    ("gp", [EPOCHS], "hyperband", RandomSamplingAlgorithm, "keeps the bandit policy"),
    ({"name": "qmc", "qmc_type": "halton"}, [LOG_LR], "none", RandomSamplingAlgorithm,
     "Azure ML has no halton sequence; sampling=random with rule=sobol"),
    ("bruteforce", [EPOCHS], "none", GridSamplingAlgorithm, "Azure ML has no brute-force sampler; sampling=grid"),
])
def test_samplers_azure_lacks_are_translated_with_a_note(sampler, params, pruner, cls, note):
    policy, _ = early_termination(pruner)
    sampling = sampling_algorithm(sampler, params, policy)
    assert type(sampling.algorithm) is cls
    assert note in sampling.note
    if cls is RandomSamplingAlgorithm and isinstance(sampler, dict) and "seed" in sampler:
        assert sampling.algorithm.seed == sampler["seed"]  # trial N samples the same values as locally


def test_samplers_with_an_equivalent_need_no_note():
    assert sampling_algorithm("random", [LOG_LR], MedianStoppingPolicy()).note is None
    assert sampling_algorithm("grid", [EPOCHS]).note is None


@pytest.mark.parametrize("sampler, match", [
    ("nsgaii", "nsgaii: a multi-objective sampler"),
    ({"_target_": "optuna.samplers.NSGAIIISampler"}, "nsgaiii: a multi-objective sampler"),
    ("bogus", "no bogus sampling"),
])
def test_samplers_that_cannot_be_translated_are_refused(sampler, match):
    with pytest.raises(PhituneError, match=match):
        sampling_algorithm(sampler)


@pytest.mark.parametrize("pruner, cls, fields", [
    (None, type(None), {}),
    ("none", type(None), {}),
    ({"name": "median"}, MedianStoppingPolicy, {"evaluation_interval": 1, "delay_evaluation": 1}),
    ({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "evaluation_interval": 2,
      "delay_evaluation": 1}, MedianStoppingPolicy, {"evaluation_interval": 2, "delay_evaluation": 1}),
    ({"name": "successive_halving", "reduction_factor": 3}, BanditPolicy,
     {"slack_factor": 0.1, "evaluation_interval": 1, "delay_evaluation": 1}),
    ({"name": "hyperband", "slack_factor": 0.2, "delay_evaluation": 2}, BanditPolicy,
     {"slack_factor": 0.2, "delay_evaluation": 2}),
    ({"name": "hyperband", "slack_amount": 0.05}, BanditPolicy, {"slack_amount": 0.05}),
    ({"name": "percentile", "percentile": 25.0}, TruncationSelectionPolicy, {"truncation_percentage": 75}),
])
def test_pruner_mapping(pruner, cls, fields):
    policy, _ = early_termination(pruner)
    assert type(policy) is cls
    for name, want in fields.items():
        assert getattr(policy, name) == want


@pytest.mark.parametrize("pruner", ["threshold", {"_target_": "optuna.pruners.PatientPruner"}, "wilcoxon"])
def test_pruners_azure_lacks_are_refused(pruner):
    with pytest.raises(PhituneError, match="no equivalent early-termination policy"):
        early_termination(pruner)


def test_direction():
    assert goal("maximize") == "maximize"
    assert goal(["minimize"]) == "minimize"
    with pytest.raises(PhituneError, match="multi-objective"):
        goal(["minimize", "maximize"])


# -- refused before anything is sent ----------------------------------------------------------------

@pytest.mark.parametrize("params, sweeper, match", [
    ({"train.epochs": "choice(1, 2)"}, {"sampler": "random", "metric": "bleu"}, "metric=bleu"),
    ({"train.learning_rate_multiplier": "interval(0.1, 10)"}, {"sampler": "grid"},
     "grid sampling accepts only choice"),
    ({"train.epochs": "int(interval(1, 3))"}, {"sampler": "grid"}, "grid sampling accepts only choice"),
    ({"train.epochs": "choice(1, 2)"}, {"sampler": "nsgaii"}, "multi-objective sampler"),
    ({"train.epochs": "choice(1, 2)"}, {"sampler": "random", "direction": ["minimize", "maximize"]},
     "multi-objective"),
])
def test_unsupported_combinations_are_refused_before_sending(params, sweeper, match, tmp_path):
    overrides = ["backend=azureml", *WS_OVERRIDES, f"backend.code_dir={small_project(tmp_path)}"]
    cfg = compose_cfg(overrides)
    t = RecordingTransport()
    with pytest.raises(PhituneError, match=match):
        submit_sweep(cfg, params, {"n_trials": 4, **sweeper}, overrides=overrides, credential=FakeCredential(),
                     transport=t)
    assert t.requests == []  # refused before MLClient sent anything


# -- built, dumped, reloaded -------------------------------------------------------------------------------

def test_sweep_job_dump_and_load(tmp_path, capsys):
    overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure",
                 "backend.compute=gpu-cluster", "backend.timeout_minutes=90", "train.max_steps=50",
                 "backend.price_per_node_hour=4.0", "backend.estimated_hours=0.5"]
    cfg = compose_cfg(overrides)
    params = {**PARAMS, "train.learning_rate_multiplier": "tag(log, interval(0.1, 10))", "seed": "7"}
    sweeper = {**SWEEPER, "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 11},
               "pruner": {"name": "hyperband", "slack_factor": 0.15}}
    submit_sweep(cfg, params, sweeper, overrides=overrides + ["train.epochs=1,2"])
    out = capsys.readouterr().out
    # 4.0 per node-hour x 1 node x 0.5 h x 12 trials
    assert "estimated cost: 24.00" in out and "x 12 trials" in out

    job = load_job(tmp_path / "azure" / "sweep_job.yaml")
    assert job.type == "sweep"
    assert (job.objective.primary_metric, job.objective.goal) == (PRIMARY_METRIC, "minimize")
    assert job.sampling_algorithm.type == "random" and job.sampling_algorithm.seed == 11
    assert isinstance(job.early_termination, BanditPolicy) and job.early_termination.slack_factor == 0.15
    assert (job.limits.max_total_trials, job.limits.max_concurrent_trials, job.limits.timeout) == (12, 3, 7200)
    assert job.limits.trial_timeout == 90 * 60
    assert set(job.search_space) == {"train_learning_rate_multiplier", "train_batch_size_multiplier", "train_epochs"}
    assert job.search_space["train_learning_rate_multiplier"].type == "loguniform"
    assert job.search_space["train_epochs"].type == "quniform"
    assert job.compute == "gpu-cluster"
    args = shlex.split(job.trial.command)
    assert args[:2] == ["python", "train.py"]
    assert "train.max_steps=50" in args and "seed=7" in args and "backend=local" in args
    assert "train.learning_rate_multiplier=${{search_space.train_learning_rate_multiplier}}" in args
    assert "train.batch_size_multiplier=${{search_space.train_batch_size_multiplier}}" in args
    assert "train.epochs=int(${{search_space.train_epochs}})" in args  # quniform may arrive as "2.0"
    assert not [a for a in args if a.startswith(("backend.", "train.epochs=1,2"))]


def test_sweep_create_or_update_request_body(tmp_path, capsys):
    overrides = ["backend=azureml", *WS_OVERRIDES, f"backend.code_dir={small_project(tmp_path)}",
                 "backend.environment=azureml:phitune-env:3", "backend.follow=false",
                 "data.train_file=azureml:support_train:1", "data.validation_file=azureml:support_valid:1"]
    cfg = compose_cfg(overrides)
    t = RecordingTransport()
    t.on("GET", r"/codes/[^/]+/versions\?", {"value": [code_version()]})
    t.on("GET", r"/codes/phitune-code/versions/1\?", code_version())
    t.on("PUT", r"/jobs/[^/?]+\?", lambda rec: (201, echo_job(rec)))
    submit_sweep(cfg, PARAMS, SWEEPER, overrides=overrides, credential=FakeCredential(), transport=t)

    (put,) = t.sent("PUT", r"/jobs/")
    assert put.path.startswith(f"{ARM}/jobs/")
    props = put.body["properties"]
    assert props["jobType"] == "Sweep"
    assert props["objective"] == {"goal": "minimize", "primaryMetric": PRIMARY_METRIC}
    assert props["samplingAlgorithm"] == {"samplingAlgorithmType": "Bayesian"}
    assert props["limits"]["maxTotalTrials"] == 12 and props["limits"]["maxConcurrentTrials"] == 3
    assert props["searchSpace"]["train_batch_size_multiplier"] == ["choice", [[1, 2, 4]]]
    assert props["searchSpace"]["train_learning_rate_multiplier"] == ["uniform", [0.5, 2.0]]
    assert props["searchSpace"]["train_epochs"] == ["quniform", [1, 3, 1]]
    trial = props["trial"]
    assert trial["codeId"] == f"{ARM}/codes/phitune-code/versions/1"
    assert trial["environmentId"] == f"{ARM}/environments/phitune-env/versions/3"
    assert "train.epochs=int(${{search_space.train_epochs}})" in shlex.split(trial["command"])
    assert props["inputs"]["train_file"]["uri"] == f"{ARM}/data/support_train/versions/1"
    assert "submitted Azure ML sweep job" in capsys.readouterr().out


def test_search_space_name_collision_is_refused(tmp_path):
    cfg = compose_cfg(["backend=azureml"])
    with pytest.raises(PhituneError, match="same Azure search-space name"):
        build_sweep_job(cfg, {"train.a_b": "choice(1,2)", "train.a.b": "choice(1,2)"}, {"sampler": "random"},
                        backend_settings(cfg.backend), overrides=[])


# -- the shipped default sweep, unchanged ------------------------------------------------------------------

def _default_sweep():
    from omegaconf import OmegaConf

    sweep = OmegaConf.load(REPO / "sweeps" / "default.yaml")
    return {str(k): str(v) for k, v in sweep.params.items()}, sweep


def test_default_sweep_is_translated_with_one_note_and_a_tag(tmp_path, capsys):
    params, sweeper = _default_sweep()
    overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure"]
    submit_sweep(compose_cfg(overrides), params, sweeper, overrides=overrides)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    want = ("Azure ML has no TPE sampler; sampling=random keeps the log-uniform train.learning_rate_multiplier and "
            "the bandit policy (Azure's bayesian sampling allows neither log-uniform nor early termination)")
    assert notes == [f"note: {want}"]

    job = load_job(tmp_path / "azure" / "sweep_job.yaml")
    assert job.tags["phitune.translation"] == want
    assert job.sampling_algorithm.type == "random" and job.sampling_algorithm.seed == 42
    assert isinstance(job.early_termination, BanditPolicy)  # successive halving's closest Azure policy
    lr = job.search_space["train_learning_rate_multiplier"]
    assert lr.type == "loguniform" and (lr.min_value, lr.max_value) == pytest.approx((math.log(0.2), math.log(5.0)))


@pytest.mark.timeout(400)  # a subprocess that imports torch and tokenizes the sample data: 20-100 s on 2 shared cores
def test_train_py_multirun_dry_run_writes_the_default_sweep(tmp_path):
    """`python train.py -m backend=azureml backend.dry_run=true` with sweeps/default.yaml as shipped."""
    from sweep_app.harness import run

    out = tmp_path / "azure"
    cmd = [str(REPO / ".venv/bin/python"), str(REPO / "train.py"), "-m", "backend=azureml", "backend.dry_run=true",
           f"backend.output_dir={out}", f"hydra.sweep.dir={tmp_path}/multirun",
           f"data.train_file={REPO}/data/support_train.jsonl", f"data.validation_file={REPO}/data/support_valid.jsonl"]
    res = run(cmd, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if line.startswith("note:")] == [
        "note: Azure ML has no TPE sampler; sampling=random keeps the log-uniform train.learning_rate_multiplier and "
        "the bandit policy (Azure's bayesian sampling allows neither log-uniform nor early termination)"]
    job = load_job(out / "sweep_job.yaml")
    assert job.type == "sweep" and job.sampling_algorithm.type == "random"
    assert job.tags["phitune.translation"].startswith("Azure ML has no TPE sampler")
    assert isinstance(job.early_termination, BanditPolicy) and job.limits.max_total_trials == 20
    assert set(job.search_space) == {"train_learning_rate_multiplier", "train_batch_size_multiplier", "train_epochs"}


# -- backend.tier=low_priority: preemptible trials that resume -----------------------------------------------

def test_low_priority_sweep_trials_checkpoint_to_an_output_and_resume(tmp_path):
    overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure",
                 "backend.tier=low_priority"]
    submit_sweep(compose_cfg(overrides), PARAMS, {**SWEEPER, "sampler": "random"},
                 overrides=overrides + ["train.output_dir=/local/ckpt", "resume=false"])
    job = load_job(tmp_path / "azure" / "sweep_job.yaml")
    assert job.queue_settings.job_tier == "spot"  # serverless: Azure's low-priority VMs
    out = job.outputs["checkpoints"]
    assert (out["type"], out["mode"]) == ("uri_folder", "rw_mount")
    args = shlex.split(job.trial.command)
    assert args[-2:] == ["train.output_dir=${{outputs.checkpoints}}", "resume=true"]
    assert "train.output_dir=/local/ckpt" not in args and "resume=false" not in args  # the user's are replaced


def test_dedicated_sweep_has_no_queue_settings_or_outputs(tmp_path):
    overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure"]
    submit_sweep(compose_cfg(overrides), PARAMS, {**SWEEPER, "sampler": "random"}, overrides=overrides)
    job = load_job(tmp_path / "azure" / "sweep_job.yaml")
    assert job.queue_settings is None and not job.outputs
    assert "resume=true" not in shlex.split(job.trial.command)
