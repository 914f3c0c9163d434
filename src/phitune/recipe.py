"""One fine-tuning run, top to bottom: check, data, training set-up, train, finalise.

`run(cfg)` is what `python train.py` calls; tests call it directly with a composed
config. It returns the objective the sweep optimises: the final full_valid_loss.

    run
    ├── check_run            backend, output folder, tracking store (phitune.preflight)
    ├── _setup_data          tokenizer, validation, split, encoding       -> Data
    ├── _setup_training      batch plan, lr, epochs, model, optimiser, resume -> Job
    ├── _tracked_fit         the MLflow run: params, fit(), _finalise (metrics, artifacts, model, eval)
    └── _closing_block       run id, status, objective, where to see it, next commands
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from phitune.chat import IGNORE_INDEX, EncodeOnce, chat_tokens
from phitune.errors import PhituneError
from phitune.preflight import check_run, config_hash, default_output_dir
from phitune.redact import redact_text
from phitune.tasks import TASK_TAG, is_classification, of_config
from phitune.train import distributed


def _trial_callback(reporter, data, job, dist, key: str = "loss"):
    """Tokens and validation-loss reports against training progress (phitune.sweep.trial_callback)."""
    from phitune.sweep.trial_callback import TrialCallback

    return TrialCallback(reporter, job.model, data.valid, dist.device, data.train, job.spec, key)


def _trial_reporter(cfg):
    if not cfg.trial.storage:
        return None
    from phitune.sweep.trial_hook import TrialReporter

    return TrialReporter.from_config(cfg.trial)


@dataclass
class Data:
    tokenizer: object
    splits: object  # phitune.data.dataset.Splits
    train: list  # phitune.chat.Encoded (task=classification: phitune.classify.encode.ClassEncoded)
    valid: list
    labels: list | None = None  # task=classification: the label set, class id = position


@dataclass
class Job:
    """Everything the loop needs, built and (on resume) restored."""

    model: object
    optimizer: object
    scheduler: object
    spec: object  # phitune.train.loop.LoopSpec
    state: object  # phitune.train.loop.TrainState
    run_id: str | None  # the MLflow run to continue
    derived: dict  # derived.* params: what the portal's settings resolved to


def _quiet_libraries() -> None:
    """Keep the console for phitune's own progress: no per-shard bars or known-noise warnings."""
    import logging
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" bars
    warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # MLflow's PostgreSQL store inserts a batch, catches the duplicate-key error of a value logged
    # before and writes row by row; psycopg then warns "error ignored terminating <Pipeline>" on
    # every trial. Its real errors still raise.
    logging.getLogger("psycopg").setLevel(logging.ERROR)


def run(cfg, overrides: list[str] | None = None):
    # The backend table, then the output folder and the tracking store: bad ones fail now, not after an epoch.
    backend = check_run(cfg)
    _quiet_libraries()
    if backend.name != "local":
        from phitune.azure.submit import submit

        return submit(cfg, list(overrides or []))

    from phitune.train.loop import fit

    dist = distributed.setup(cfg.backend.get("device", "auto"))
    try:
        data = _setup_data(cfg)
        job = _setup_training(cfg, data, dist)
        if not dist.is_main:
            fit(job.model, job.optimizer, job.scheduler, data.train, data.valid, job.spec, dist, [], job.state)
            return None
        return _tracked_fit(cfg, data, job, dist)
    finally:
        distributed.teardown(dist)


# -- set up: data ----------------------------------------------------------------------

def _setup_data(cfg) -> Data:
    """Validation first: bad data stops the run before any model is built."""
    if is_classification(cfg):
        from phitune.classify.run import setup_data

        return setup_data(cfg, Data)
    from phitune.data.dataset import prepare_splits
    from phitune.modeling.loader import load_tokenizer

    max_len = int(cfg.data.max_seq_len or cfg.model.context_length)
    tokenizer = load_tokenizer(cfg.model)
    encoder = EncodeOnce(tokenizer, max_len)  # validation's token counts and training's ids: one tokenisation
    splits = prepare_splits(cfg.data, token_counter=encoder.count, context_length=max_len,
                            control_tokens=chat_tokens(tokenizer).control_strings)
    _safety_screen(cfg, splits)
    data = Data(tokenizer, splits, _encode(splits.train, encoder, "training"), _encode(splits.valid, encoder, "validation"))
    encoder.forget()
    if not data.train:
        raise PhituneError(f"{cfg.data.train_file}: no example has a trainable assistant token")
    return data


def _safety_screen(cfg, splits) -> None:
    if not cfg.data.get("safety_check"):
        return
    from phitune.safety.screen import screen_examples

    screen_examples(cfg, splits)


def _encode(examples, encoder: EncodeOnce, what: str):
    out, dropped, max_len = [], 0, encoder.max_len
    for ex in examples:
        enc = encoder.encode(ex.messages)
        if any(label != IGNORE_INDEX for label in enc.labels[1:]):
            out.append(enc)
        else:
            dropped += 1  # every assistant token was cut by truncation or weight 0
    if dropped:
        print(f"note: {dropped} {what} example(s) have no trainable token after truncation to {max_len} tokens; skipped",
              file=sys.stderr)
    return out


# -- set up: training --------------------------------------------------------------------

def _setup_training(cfg, data: Data, dist) -> Job:
    import transformers

    from phitune.modeling.loader import apply_training_method, compile_layers, load_model
    from phitune.optim import build_optimizer, build_scheduler
    from phitune.train.loop import LoopSpec, TrainState, steps_per_epoch
    from phitune.train import memory
    from phitune.train.schedule import learning_rate, plan_batch, resolve_epochs

    epochs = resolve_epochs(cfg.train.epochs, len(data.train))
    plan = plan_batch(cfg.model.base_batch_size, cfg.train.batch_size_multiplier, cfg.train.max_device_batch,
                      dist.world_size)
    memory.check_settings(cfg.train, max(len(e.input_ids) for e in data.train + data.valid),
                          int(cfg.data.max_seq_len or cfg.model.context_length))
    lr = learning_rate(cfg.model.base_learning_rate, cfg.train.learning_rate_multiplier)
    total = steps_per_epoch(len(data.train), plan) * epochs
    if cfg.train.max_steps:
        total = min(total, int(cfg.train.max_steps))
    out = Path(cfg.train.output_dir) if cfg.train.output_dir else default_output_dir(cfg)
    latest = _prepare_output_dir(out, cfg.resume) if dist.is_main else None
    latest = dist.broadcast_object(str(latest) if latest else None)

    transformers.set_seed(cfg.seed)
    if data.labels is not None:
        from phitune.classify.run import build_model

        model = build_model(cfg, data, dist.device)
    else:
        model = apply_training_method(load_model(cfg.model, device=dist.device), cfg.train, cfg.model)
    if cfg.train.get("gradient_checkpointing"):
        memory.enable_gradient_checkpointing(model)
    if cfg.train.get("compile"):
        compile_layers(model, dist.device)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr)
    scheduler = build_scheduler(cfg.optimizer, optimizer, total)
    spec = LoopSpec.from_config(cfg.train, epochs=epochs, plan=plan, seed=cfg.seed, output_dir=str(out))
    if data.labels is not None:
        from phitune.classify.run import loop_task

        spec.task = loop_task(cfg, data)
    job = Job(model, optimizer, scheduler, spec, TrainState(), None, {})
    _restore(cfg, job, out, latest, dist)
    job.derived = _derived(data, job, lr, total, out)
    if dist.is_main:
        _print_plan(data, job)
    return job


def _prepare_output_dir(out: Path, resume: bool):
    from phitune.train.checkpoint import latest_checkpoint, recorded_run_id, remove_partial

    if resume:
        remove_partial(out)  # what a run killed while saving left; its previous checkpoint is complete
    latest = latest_checkpoint(out) if resume else None
    if resume and latest is None:
        run_id = recorded_run_id(out)
        print(f"resume=true: no complete checkpoint in {out}; starting from the beginning"
              + (f" in the same MLflow run {run_id}" if run_id else ""), file=sys.stderr)
    if not resume and out.exists() and any(out.iterdir()):
        # A fresh run with the same settings: keep the previous attempt one level aside.
        prev = out.with_name(out.name + ".prev")
        shutil.rmtree(prev, ignore_errors=True)
        out.rename(prev)
    return latest


def _restore(cfg, job: Job, out: Path, latest: str | None, dist) -> None:
    """resume=true: the MLflow run this folder belongs to (run.json, written as it started, so even
    a run killed before its first checkpoint is continued) and the last complete checkpoint."""
    from phitune.train.checkpoint import load_checkpoint, recorded_run_id
    from phitune.train.loop import TrainState

    job.run_id = recorded_run_id(out) if cfg.resume and dist.is_main else None
    if not latest:
        return
    st = load_checkpoint(latest, job.model, job.optimizer, job.scheduler, rank=dist.rank, device=dist.device)
    job.state = TrainState(epoch=st["epoch"], step=st["step"], train_tokens=st["train_tokens"],
                           history=st["history"], epoch_metrics=st["epoch_metrics"])
    job.run_id = job.run_id or st.get("run_id")
    if dist.is_main:
        print(f"resuming from {latest} (epoch {job.state.epoch}, step {job.state.step})", file=sys.stderr)


def _derived(data: Data, job: Job, lr: float, total: int, out: Path) -> dict:
    plan, splits = job.spec.plan, data.splits
    return {"derived.learning_rate": lr, "derived.epochs": job.spec.epochs, "derived.effective_batch": plan.effective_batch,
            "derived.device_batch": plan.device_batch, "derived.grad_accum": plan.grad_accum,
            "derived.world_size": plan.world_size, "derived.total_steps": total,
            "derived.n_train_examples": len(data.train), "derived.n_valid_examples": len(data.valid),
            "derived.validation_mode": splits.mode, "derived.auto_fraction": splits.auto_fraction,
            "derived.train_valid_overlap": splits.overlap, "derived.output_dir": str(out)}


def _print_plan(data: Data, job: Job) -> None:
    s, plan, d = data.splits, job.spec.plan, job.derived
    print(f"train: {len(data.train)} examples, valid: {len(data.valid)} ({s.mode}"
          + (f", auto fraction {s.auto_fraction}" if s.mode == "auto" else "")
          + f"), overlap {s.overlap}; {job.spec.epochs} epoch(s), {d['derived.total_steps']} optimizer steps; "
          f"batch {plan.effective_batch} = {plan.device_batch} x {plan.grad_accum} accum x {plan.world_size} device(s); "
          f"lr {d['derived.learning_rate']:g}", file=sys.stderr)


# -- train, tracked ----------------------------------------------------------------------

def _run_tags(cfg, splits, reporter) -> dict:
    from phitune.tracking.run import flatten

    tags = {"phitune.config_hash": config_hash(cfg), "phitune.model": cfg.model.name,
            "phitune.data_digest": splits.digest, "phitune.train_digest": splits.train_digest,
            "phitune.valid_digest": splits.valid_digest or "", "phitune.validation_mode": splits.mode,
            TASK_TAG: of_config(cfg).name,
            # Flattened, so that a nested tag's secret-named key (`a.hf_token`) is masked like a param's.
            **flatten(OmegaConf.to_container(cfg.tracking.tags, resolve=True) if cfg.tracking.get("tags") else {})}
    if reporter is not None:
        tags["phitune.trial_number"] = str(cfg.trial.number)
        tags["phitune.study"] = str(cfg.trial.study_name)
    return tags


def _tracked_fit(cfg, data: Data, job: Job, dist):
    from phitune.tracking.run import TrackedRun, flatten
    from phitune.train.checkpoint import record_run
    from phitune.train.loop import fit

    reporter = _trial_reporter(cfg)
    # Named here: MLflow's random names come from `random`, which set_seed made identical for every run.
    name = cfg.tracking.get("run_name") or (f"trial-{cfg.trial.number}" if reporter is not None
                                            else f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker = TrackedRun(cfg.tracking, run_name=name, resume_run_id=job.run_id, tags=_run_tags(cfg, data.splits, reporter))
    objective = None
    try:
        with tracker:
            record_run(job.spec.output_dir, tracker.run_id)  # before any step: a SIGKILL from here on is resumable
            if reporter is not None:
                reporter.link_run(tracker.run_id)
            tracker.log_params({**flatten(OmegaConf.to_container(cfg, resolve=True)), **job.derived})
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            _log_datasets(cfg, data.splits)
            # reports in the objective's direction: full_valid_loss -> loss, full_valid_macro_f1 -> macro_f1
            key = objective_name(cfg).removeprefix("full_valid_")
            callbacks = [tracker] + ([_trial_callback(reporter, data, job, dist, key)] if reporter else [])
            t0 = time.time()
            state = fit(job.model, job.optimizer, job.scheduler, data.train, data.valid, job.spec, dist, callbacks,
                        job.state, tracker.run_id)
            objective = _objective(state, objective_name(cfg))
            _finalise(cfg, tracker, data.tokenizer, job.model, state, objective, time.time() - t0)
            if data.labels is not None:
                from phitune.classify import run as classify

                classify.finalise(cfg, tracker, data, job.model, dist.device)
            if reporter is not None:
                reporter.finish()
            elif cfg.train.get("evaluate_at_end") and data.labels is None:  # classification: the report above
                _evaluate_at_end(cfg, tracker.run_id, data, job)
    finally:
        if reporter is None and tracker.status:  # a sweep prints its own line per trial
            _closing_block(cfg, tracker, objective)
    return objective


def objective_name(cfg) -> str:
    """The metric run() returns: the sweep's hydra.sweeper.metric when it names one of the
    final metrics (a sweep file may say so), else the task's (task.objective)."""
    from hydra.core.hydra_config import HydraConfig

    metric = None
    if HydraConfig.initialized():
        metric = OmegaConf.select(HydraConfig.get(), "sweeper.metric", default=None)
    if metric and str(metric).startswith("full_valid_"):
        return str(metric)
    return str(cfg.task.get("objective") or of_config(cfg).objective) if cfg.get("task") else "full_valid_loss"


def _objective(state, name: str = "full_valid_loss") -> float | None:
    """The final value of `name` (full_valid_loss, full_valid_macro_f1...); without validation
    data, the last training loss."""
    final = state.epoch_metrics[-1] if state.epoch_metrics else {}
    value = final.get(name)
    if value is None and state.history:
        value = state.history[-1]["train_loss"]
    return None if value is None else float(value)


def _finalise(cfg, tracker, tokenizer, model, state, objective, runtime_s: float) -> None:
    """What a finished run leaves besides its per-step metrics: totals, results.csv, the loss
    curve, and (tracking.log_model) the adapter and the MLflow chat model."""
    import mlflow

    from phitune.tracking import artifacts

    mlflow.log_metrics({"train_runtime_s": runtime_s, "train_tokens_total": state.train_tokens})
    if objective is not None:
        mlflow.log_metric("objective", objective)
    columns = artifacts.CLASSIFICATION_COLUMNS if is_classification(cfg) else artifacts.RESULTS_COLUMNS
    tracker.log_files(lambda p: artifacts.write_results_csv(state.history, p, columns), "results.csv")
    tracker.log_files(lambda p: artifacts.plot_loss_curve(state.history, p, f"{cfg.model.name} loss"), "loss_curve.png")
    if cfg.tracking.log_model and is_classification(cfg):
        from phitune.classify.run import log_model

        log_model(cfg, tokenizer, model)
    elif cfg.tracking.log_model:
        _log_model(cfg, tokenizer, model)


def _base_ref(cfg) -> dict:
    """The logged model's base.json before it is made portable (phitune.tracking.pyfunc_model)."""
    from phitune.modeling.loader import base_reference

    return dict(base_reference(cfg.model), context_length=int(cfg.model.context_length), method=cfg.train.method)


def _log_model(cfg, tokenizer, model) -> None:
    from phitune.tracking.pyfunc_model import log_chat_model, logged_adapter

    with logged_adapter(model, tokenizer) as adapter:
        log_chat_model(_base_ref(cfg), adapter)


def _evaluate_at_end(cfg, run_id: str, data: Data, job: Job) -> None:
    """train.evaluate_at_end: the run's logged model, scored as it is in memory (the same weights;
    no download and second load); without a logged model, its last checkpoint is loaded."""
    from phitune.evaluation.run import evaluate_run

    trained = (job.model, data.tokenizer, _base_ref(cfg)) if cfg.tracking.log_model else None
    evaluate_run(cfg, run_id, trained=trained, spec=job.spec, splits=data.splits)


def _log_datasets(cfg, splits) -> None:
    import mlflow
    import pandas as pd

    for context, examples, digest, source in (("training", splits.train, splits.train_digest, cfg.data.train_file),
                                               ("validation", splits.valid, splits.valid_digest,
                                                cfg.data.validation_file or cfg.data.train_file)):
        if not examples:
            continue
        df = pd.DataFrame({"messages": [json.dumps(e.messages, ensure_ascii=False) for e in examples]})
        ds = mlflow.data.from_pandas(df, source=str(Path(source).resolve()), name=f"{cfg.data.name}-{context}",
                                     digest=(digest or "")[:32] or None)
        mlflow.log_input(ds, context=context)


def _closing_block(cfg, tracker, objective) -> None:
    """Where the run went and what to do next, on stderr after the run has ended."""
    from phitune.models.uri import DEFAULT_TRACKING_URI
    from phitune.tracking.experiment import ui_url

    uri = redact_text(str(cfg.tracking.uri))
    store = "" if cfg.tracking.uri == DEFAULT_TRACKING_URI else f" --tracking-uri {uri}"
    lines = [f"run {tracker.run_id} {tracker.status}"
             + (f" · objective ({objective_name(cfg)}) {objective:.4f}" if objective is not None else "")]
    if tracker.experiment_id:
        lines.append(f"  see it:  mlflow ui --backend-store-uri {uri}"
                     f"  ->  {ui_url(tracker.experiment_id, tracker.run_id)}")
    if tracker.status == "FINISHED" and cfg.tracking.log_model:
        lines += [f"  model:   runs:/{tracker.run_id}/model",
                  f"  next:    phitune promote --run {tracker.run_id} --name MODEL_NAME{store}",
                  f"           phitune serve runs:/{tracker.run_id}/model{store}"]
    elif tracker.status == "KILLED":
        lines.append("  resume:  the same command with resume=true continues this run from its last epoch")
    print("\n".join(lines), file=sys.stderr)
