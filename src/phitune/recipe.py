"""One fine-tuning run, top to bottom: validate, encode, build, train, track, return.

`run(cfg)` is what `python train.py` calls; tests call it directly with a composed
config. It returns the objective the sweep optimises: the final full_valid_loss.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from phitune.errors import PhituneError
from phitune.preflight import check_run, config_hash, default_output_dir
from phitune.train import distributed
from phitune.train.loop import Callback, LoopSpec, TrainState, fit


class _TrialCallback(Callback):
    """Reports valid_loss to the Optuna trial (which may prune) and counts tokens."""

    def __init__(self, reporter):
        self.reporter = reporter
        self._tokens = 0

    def on_step(self, step: int, metrics: dict) -> None:
        self.reporter.add_tokens(int(metrics["train_tokens"]) - self._tokens)
        self._tokens = int(metrics["train_tokens"])

    def on_evaluate(self, step: int, metrics: dict) -> None:
        self.reporter.report(float(metrics["valid_loss"]), step)


def _trial_reporter(cfg):
    if not cfg.trial.storage:
        return None
    from phitune.sweep.trial_hook import TrialReporter

    return TrialReporter.from_config(cfg.trial)


def _encode(examples, tokenizer, max_len: int, what: str):
    from phitune.chat import encode_example

    out, dropped = [], 0
    for ex in examples:
        enc = encode_example(tokenizer, ex.messages, max_len)
        if any(label != -100 for label in enc.labels[1:]):
            out.append(enc)
        else:
            dropped += 1  # every assistant token was cut by truncation or weight 0
    if dropped:
        print(f"note: {dropped} {what} example(s) have no trainable token after truncation to {max_len} tokens; skipped",
              file=sys.stderr)
    return out


def _prepare_output_dir(cfg, out: Path, resume: bool):
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


def _quiet_libraries() -> None:
    """Keep the console for phitune's own progress: no per-shard bars or known-noise warnings."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run(cfg, overrides: list[str] | None = None):
    # The backend table, then the output folder and the tracking store: bad ones fail now, not after an epoch.
    backend = check_run(cfg)
    _quiet_libraries()
    if backend.name != "local":
        from phitune.azure.submit import submit

        return submit(cfg, list(overrides or []))

    import transformers

    from phitune.data.dataset import prepare_splits
    from phitune.chat import chat_tokens, count_tokens
    from phitune.modeling.loader import apply_training_method, base_reference, load_model, load_tokenizer
    from phitune.optim import build_optimizer, build_scheduler
    from phitune.train.checkpoint import load_checkpoint, recorded_run_id
    from phitune.train.schedule import learning_rate, plan_batch, resolve_epochs

    dist = distributed.setup(cfg.backend.get("device", "auto"))
    try:
        max_len = int(cfg.data.max_seq_len or cfg.model.context_length)
        tokenizer = load_tokenizer(cfg.model)
        # Validation first: bad data stops the run before any model is built.
        splits = prepare_splits(cfg.data, token_counter=lambda m: count_tokens(tokenizer, m), context_length=max_len,
                                control_tokens=chat_tokens(tokenizer).control_strings)
        _safety_screen(cfg, splits)
        train_enc = _encode(splits.train, tokenizer, max_len, "training")
        valid_enc = _encode(splits.valid, tokenizer, max_len, "validation")
        if not train_enc:
            raise PhituneError(f"{cfg.data.train_file}: no example has a trainable assistant token")
        epochs = resolve_epochs(cfg.train.epochs, len(train_enc))
        plan = plan_batch(cfg.model.base_batch_size, cfg.train.batch_size_multiplier, cfg.train.max_device_batch,
                          dist.world_size)
        lr = learning_rate(cfg.model.base_learning_rate, cfg.train.learning_rate_multiplier)
        out = Path(cfg.train.output_dir) if cfg.train.output_dir else default_output_dir(cfg)
        latest = _prepare_output_dir(cfg, out, cfg.resume) if dist.is_main else None
        latest = dist.broadcast_object(str(latest) if latest else None)

        transformers.set_seed(cfg.seed)
        model = apply_training_method(load_model(cfg.model, device=dist.device), cfg.train, cfg.model)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr)
        from phitune.train.loop import steps_per_epoch

        total = steps_per_epoch(len(train_enc), plan) * epochs
        if cfg.train.max_steps:
            total = min(total, int(cfg.train.max_steps))
        scheduler = build_scheduler(cfg.optimizer, optimizer, total)

        # The run this folder belongs to (run.json, written as it started): resume continues it,
        # even when it was killed before its first checkpoint.
        state, run_id = TrainState(), (recorded_run_id(out) if cfg.resume and dist.is_main else None)
        if latest:
            st = load_checkpoint(latest, model, optimizer, scheduler, rank=dist.rank, device=dist.device)
            state = TrainState(epoch=st["epoch"], step=st["step"], train_tokens=st["train_tokens"],
                               history=st["history"], epoch_metrics=st["epoch_metrics"])
            run_id = run_id or st.get("run_id")
            if dist.is_main:
                print(f"resuming from {latest} (epoch {state.epoch}, step {state.step})", file=sys.stderr)

        spec = LoopSpec(epochs=epochs, plan=plan, seed=cfg.seed, eval_steps=cfg.train.eval_steps,
                        max_steps=cfg.train.max_steps, max_grad_norm=cfg.train.max_grad_norm,
                        full_eval_each_epoch=cfg.train.full_eval_each_epoch, keep_checkpoints=cfg.train.keep_checkpoints,
                        output_dir=str(out), progress=cfg.train.progress)
        derived = {"derived.learning_rate": lr, "derived.epochs": epochs, "derived.effective_batch": plan.effective_batch,
                   "derived.device_batch": plan.device_batch, "derived.grad_accum": plan.grad_accum,
                   "derived.world_size": plan.world_size, "derived.total_steps": total,
                   "derived.n_train_examples": len(train_enc), "derived.n_valid_examples": len(valid_enc),
                   "derived.validation_mode": splits.mode, "derived.auto_fraction": splits.auto_fraction,
                   "derived.train_valid_overlap": splits.overlap, "derived.output_dir": str(out)}
        if dist.is_main:
            print(f"train: {len(train_enc)} examples, valid: {len(valid_enc)} ({splits.mode}"
                  + (f", auto fraction {splits.auto_fraction}" if splits.mode == "auto" else "")
                  + f"), overlap {splits.overlap}; {epochs} epoch(s), {total} optimizer steps; "
                  f"batch {plan.effective_batch} = {plan.device_batch} x {plan.grad_accum} accum x {plan.world_size} device(s); "
                  f"lr {lr:g}", file=sys.stderr)
        if not dist.is_main:
            fit(model, optimizer, scheduler, train_enc, valid_enc, spec, dist, [], state)
            return None
        return _tracked_fit(cfg, model, tokenizer, optimizer, scheduler, train_enc, valid_enc, spec, dist, state, run_id,
                            splits, derived, base_reference(cfg.model))
    finally:
        distributed.teardown(dist)


def _safety_screen(cfg, splits) -> None:
    if not cfg.data.get("safety_check"):
        return
    from phitune.safety.screen import screen_examples

    screen_examples(cfg, splits)


def _tracked_fit(cfg, model, tokenizer, optimizer, scheduler, train_enc, valid_enc, spec, dist, state, run_id, splits,
                 derived, base_ref):
    from phitune.tracking import artifacts
    from phitune.tracking.run import TrackedRun, flatten
    from phitune.train.checkpoint import _unwrap, record_run

    reporter = _trial_reporter(cfg)
    tags = {"phitune.config_hash": config_hash(cfg), "phitune.model": cfg.model.name,
            "phitune.data_digest": splits.digest, "phitune.train_digest": splits.train_digest,
            "phitune.valid_digest": splits.valid_digest or "", "phitune.validation_mode": splits.mode,
            # Flattened, so that a nested tag's secret-named key (`a.hf_token`) is masked like a param's.
            **flatten(OmegaConf.to_container(cfg.tracking.tags, resolve=True) if cfg.tracking.get("tags") else {})}
    if reporter is not None:
        tags["phitune.trial_number"] = str(cfg.trial.number)
        tags["phitune.study"] = str(cfg.trial.study_name)
    callbacks = []
    # Named here: MLflow's random names come from `random`, which set_seed made identical for every run.
    name = cfg.tracking.get("run_name") or (f"trial-{cfg.trial.number}" if reporter is not None
                                            else f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    with TrackedRun(cfg.tracking, run_name=name, resume_run_id=run_id, tags=tags) as tracker:
        record_run(spec.output_dir, tracker.run_id)  # before any step: a SIGKILL from here on is resumable
        tracker.log_params({**flatten(OmegaConf.to_container(cfg, resolve=True)), **derived})
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        _log_datasets(cfg, splits)
        callbacks = [tracker] + ([_TrialCallback(reporter)] if reporter else [])
        t0 = time.time()
        state = fit(model, optimizer, scheduler, train_enc, valid_enc, spec, dist, callbacks, state, tracker.run_id)
        final = state.epoch_metrics[-1] if state.epoch_metrics else {}
        objective = final.get("full_valid_loss")
        if objective is None and state.history:
            objective = state.history[-1]["train_loss"]  # no validation data: the last training loss
        import mlflow

        mlflow.log_metrics({"train_runtime_s": time.time() - t0, "train_tokens_total": state.train_tokens})
        if objective is not None:
            mlflow.log_metric("objective", float(objective))
        tracker.log_files(lambda p: artifacts.write_results_csv(state.history, p), "results.csv")
        tracker.log_files(lambda p: artifacts.plot_loss_curve(state.history, p, f"{cfg.model.name} loss"), "loss_curve.png")
        if cfg.tracking.log_model:
            with tempfile.TemporaryDirectory() as tmp:
                adapter = Path(tmp) / "adapter"
                _unwrap(model).save_pretrained(str(adapter), safe_serialization=True)
                tokenizer.save_pretrained(str(adapter))
                mlflow.log_artifacts(str(adapter), "adapter")
                from phitune.tracking.pyfunc_model import log_chat_model

                ref = dict(base_ref, context_length=int(cfg.model.context_length), method=cfg.train.method)
                log_chat_model(ref, adapter)
        if reporter is not None:
            reporter.finish()
        if cfg.train.get("evaluate_at_end") and reporter is None:
            _evaluate_at_end(cfg, tracker)
    return None if objective is None else float(objective)


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


def _evaluate_at_end(cfg, tracker) -> None:
    from phitune.evaluation.run import evaluate_run

    evaluate_run(cfg, tracker.run_id)
