"""Evaluate a model URI on a chat JSONL file and log the results to MLflow.

    python eval.py model_uri=models:/NAME@champion data.test_file=FILE     (conf/eval.yaml)
    phitune eval models:/NAME@champion --data FILE                          (the same function)

`evaluate_model_uri(cfg)` logs a new MLflow run tagged `phitune.eval_of=<source run>`
(`phitune.role=eval`; `phitune compare` leaves such runs out of leaderboards).
`evaluate_run(cfg, run_id)` is what a training run calls at its end
(train.evaluate_at_end): it scores the run's own model on its validation data (or
`data.test_file` when the config has one) and logs into that run.

Metrics are logged as eval_loss, eval_perplexity, eval_mean_token_accuracy,
eval_exact_match, eval_token_f1, eval_rouge_l, eval_bleu (+ eval_examples,
eval_generated), the sample generations as the table `eval/generations.json`
(prompt, reference, prediction, ...; MLflow's Evaluation/Artifacts tab shows it) and
everything together as `eval/metrics.json`.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from phitune.errors import PhituneError
from phitune.models.uri import resolve
from phitune.redact import redact_text

METRIC_PREFIX = "eval_"
TABLE_FILE = "eval/generations.json"
SUMMARY_FILE = "eval/metrics.json"


def quiet_libraries() -> None:
    """Keep the console for the results: no transformers/evaluate progress bars or info logs."""
    import logging
    import warnings

    import transformers


    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import evaluate

        evaluate.logging.set_verbosity_error()
        evaluate.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def settings_from(node):
    """EvalSettings with the defaults of phitune.evaluation.config, overridden by `node`."""
    from phitune.evaluation.config import EvalSettings

    base = OmegaConf.structured(EvalSettings)
    return OmegaConf.merge(base, node) if node else base


def load_conversations(path: str, limit: Optional[int] = None, allow_warnings: bool = True) -> tuple[list, str]:
    """Validate a chat JSONL file as training data is validated (problems printed as
    FILE:LINE: message, DataError when unusable); return (messages lists, digest)."""
    from phitune.data.dataset import examples_digest, prepare_splits

    data = OmegaConf.create({"train_file": str(path), "validation": "none", "allow_warnings": bool(allow_warnings)})
    examples = prepare_splits(data).train
    if limit is not None:
        examples = examples[: max(0, int(limit))]
    if not examples:
        raise PhituneError(f"{path}: no conversation to evaluate")
    return [ex.messages for ex in examples], examples_digest(examples)


def _device(name: str):
    from phitune.train.distributed import pick_device

    return pick_device(str(name or "auto"))


def score(source, conversations: list, settings, max_seq_len: Optional[int] = None, progress: bool = True,
          spec=None):
    """Load the model of a ModelSource and run the suite; returns an EvalResult. `spec`: the
    training's LoopSpec (memory settings of the teacher-forced pass)."""
    from phitune.modeling.loader import load_for_inference

    device = _device(settings.device)
    model, tokenizer = load_for_inference(source.base_ref, source.adapter_dir, device=str(device))
    return _suite(model, tokenizer, source, conversations, settings, max_seq_len, progress, device, spec)


def _suite(model, tokenizer, source, conversations, settings, max_seq_len, progress, device, spec=None):
    from phitune.evaluation.suite import run_suite

    return run_suite(model, tokenizer, conversations, source.context_length or 4096, max_seq_len=max_seq_len,
                     batch_size=int(settings.batch_size), generation_limit=settings.generation_limit,
                     max_new_tokens=int(settings.max_new_tokens), device=device, progress=progress, spec=spec)


@contextlib.contextmanager
def _for_inference(model):
    """The training's model as load_for_inference returns one (eval mode, KV cache on), then back."""
    from phitune.train.checkpoint import _unwrap

    model = _unwrap(model)  # DDP: the evaluation runs on the main process only
    was_training, cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    try:
        yield model
    finally:
        model.config.use_cache = cache
        model.train(was_training)


def score_in_memory(run_id: str, model, tokenizer, base_ref: dict, conversations: list, settings,
                    max_seq_len: Optional[int] = None, spec=None):
    """The suite on the model a run has just trained and logged as runs:/RUN_ID/model, as it is in
    memory: the same weights as that logged model, without downloading and loading them again."""
    from phitune.models.uri import ModelSource

    uri = f"runs:/{run_id}/model"
    source = ModelSource(uri, uri, "run-model", dict(base_ref), None, run_id=run_id)
    device = next(model.parameters()).device
    with _for_inference(model) as m:
        return source, _suite(m, tokenizer, source, conversations, settings, max_seq_len, False, device, spec)


def log_results(client, run_id: str, result, *, source=None, data_file: str = "", digest: str = "",
                settings=None) -> None:
    """Metrics (eval_*), tags, the table of sample generations and a JSON summary into `run_id`."""
    import math

    import pandas as pd

    for key, value in result.metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            client.log_metric(run_id, METRIC_PREFIX + key, float(value))
    tags = {"phitune.eval_digest": digest, "phitune.eval_data_file": data_file}
    if source is not None:
        tags["phitune.eval_model_uri"] = source.uri
    for key, value in tags.items():
        if value:
            client.set_tag(run_id, key, redact_text(str(value))[:5000])
    if result.samples:
        client.log_table(run_id, data=pd.DataFrame(result.samples), artifact_file=TABLE_FILE)
    summary = {"model_uri": source.uri if source else None, "source_run_id": source.run_id if source else None,
               "registered_model": source.model_name if source else None,
               "registered_version": source.model_version if source else None,
               "checkpoint": source.checkpoint if source else None, "data_file": data_file, "data_digest": digest,
               "settings": OmegaConf.to_container(settings) if settings is not None else None,
               "metrics": result.metrics}
    client.log_text(run_id, json.dumps(summary, indent=2, default=str), SUMMARY_FILE)


def format_metrics(metrics: dict) -> str:
    def f(key, fmt="{:.4f}"):
        value = metrics.get(key)
        return "n/a" if value is None else fmt.format(value)

    lines = [f"  teacher-forced: loss {f('loss')}  perplexity {f('perplexity', '{:.2f}')}  "
             f"mean_token_accuracy {f('mean_token_accuracy')}  ({metrics.get('examples', 0)} conversations, "
             f"{metrics.get('tokens', 0):,} assistant tokens)"]
    if metrics.get("generated"):
        lines.append(f"  generation:     exact_match {f('exact_match')}  token_f1 {f('token_f1')}  "
                     f"rouge_l {f('rouge_l')}  bleu {f('bleu')}  ({metrics['generated']} greedy replies)")
    else:
        lines.append("  generation:     no reply generated (generation_limit=0 or no assistant turn to predict)")
    return "\n".join(lines)


def _eval_experiment(client, source, tracking_cfg) -> str:
    from mlflow.exceptions import MlflowException

    if source.run_id:
        try:
            return client.get_run(source.run_id).info.experiment_id  # beside the run it evaluates
        except MlflowException:
            pass
    from phitune.tracking.run import setup_tracking

    return setup_tracking(tracking_cfg)


def evaluate_model_uri(cfg) -> dict:
    """`python eval.py` / `phitune eval`: score cfg.model_uri on cfg.data.test_file; log a new run.

    Returns {"metrics", "run_id" (the eval run, None when eval.log=false), "source_run_id", "samples"}.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from omegaconf.errors import MissingMandatoryValue

    try:
        model_uri, test_file = str(cfg.model_uri), str(cfg.data.test_file)
    except MissingMandatoryValue:
        raise PhituneError("say what to evaluate on what: model_uri=MODEL_URI data.test_file=FILE "
                           "(MODEL_URI: models:/NAME@ALIAS, runs:/RUN_ID/model, a checkpoint folder...)") from None
    settings = settings_from(cfg.get("eval"))
    mlflow.set_tracking_uri(cfg.tracking.uri)
    from phitune.classify.data import looks_like_classification

    if looks_like_classification(test_file):  # labelled lines: score a classifier (phitune.classify.evaluate)
        from phitune.classify.evaluate import evaluate_classifier

        return evaluate_classifier(cfg, model_uri, test_file, settings)
    # The data first: a bad file stops before any model is downloaded or loaded.
    conversations, digest = load_conversations(test_file, settings.limit, cfg.data.get("allow_warnings", True))
    with tempfile.TemporaryDirectory(prefix="phitune-eval-") as tmp:
        source = resolve(model_uri, cfg.tracking.uri, Path(tmp), cfg.get("model"))
        print(f"evaluating {source.describe()} on {test_file} ({len(conversations)} conversations)", file=sys.stderr)
        result = score(source, conversations, settings, cfg.data.get("max_seq_len"))

    run_id = None
    if settings.log:
        client = MlflowClient()
        exp_id = _eval_experiment(client, source, cfg.tracking)
        tags = {"phitune.role": "eval", "phitune.model": str(source.base_ref.get("name") or "")}
        if source.run_id:
            tags["phitune.eval_of"] = source.run_id
        if source.model_name:
            tags.update({"phitune.registered_model": source.model_name,
                         "phitune.registered_version": str(source.model_version)})
        if source.checkpoint:
            tags["phitune.checkpoint"] = source.checkpoint
        name = f"eval-{source.model_name}-v{source.model_version}" if source.model_name else \
            f"eval-{(source.run_id or Path(source.uri).name)[:12]}"
        with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as run:
            run_id = run.info.run_id
            mlflow.log_params({"model_uri": source.uri, "data.test_file": test_file,
                               **{f"eval.{k}": v for k, v in OmegaConf.to_container(settings).items()}})
            _log_dataset(test_file, conversations, digest)
            log_results(client, run_id, result, source=source, data_file=test_file, digest=digest, settings=settings)
    print(f"{source.describe()} on {test_file} (digest {digest[:12]}):")
    print(format_metrics(result.metrics))
    if run_id:
        print(f"logged to MLflow run {run_id} ({TABLE_FILE} holds the sample generations); "
              f"browse: mlflow ui --backend-store-uri {redact_text(cfg.tracking.uri)}")
    return {"metrics": result.metrics, "run_id": run_id, "source_run_id": source.run_id, "samples": result.samples}


def _log_dataset(path: str, conversations: list, digest: str) -> None:
    import mlflow
    import pandas as pd

    df = pd.DataFrame({"messages": [json.dumps(m, ensure_ascii=False) for m in conversations]})
    ds = mlflow.data.from_pandas(df, source=str(Path(path).resolve()), name=Path(path).stem, digest=digest[:32] or None)
    mlflow.log_input(ds, context="evaluation")


def _run_model_source(client, run_id: str, workdir: Path):
    """The run's MLflow model, else its last logged epoch checkpoint."""
    import mlflow

    try:
        return resolve(f"runs:/{run_id}/model", mlflow.get_tracking_uri(), workdir / "m")
    except PhituneError:
        pass
    epochs = sorted(a.path for a in client.list_artifacts(run_id, "checkpoints") if a.is_dir)
    if not epochs:
        return None
    return resolve(f"runs:/{run_id}/{epochs[-1]}", mlflow.get_tracking_uri(), workdir / "c")


def evaluate_run(cfg, run_id: str, trained=None, spec=None, splits=None) -> Optional[dict]:
    """Score a finished training run's model and log into that run (end of `python train.py`).

    Data: `data.test_file` when the config has one, else the run's validation split.
    trained: (model, tokenizer, base reference) of the model the run has just logged as
    runs:/RUN_ID/model, scored in memory; None: the run's model (or last checkpoint) is
    downloaded and loaded. spec: the training's LoopSpec, whose memory settings (loss in
    chunks of train.loss_chunk_tokens, not [tokens, vocab] logits) the teacher-forced pass uses.
    splits: the run's own phitune.data.dataset.Splits (not read and validated a second time).
    A failure here never fails the training run: it is printed and tagged `phitune.eval_error`.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        settings = settings_from(cfg.get("eval"))
        test_file = cfg.data.get("test_file")
        if test_file:
            conversations, digest = load_conversations(str(test_file), settings.limit)
            data_file = str(test_file)
        else:
            from phitune.data.dataset import prepare_splits

            splits = splits if splits is not None else prepare_splits(cfg.data)
            if not splits.valid:
                print("note: evaluate_at_end: no validation data (data.validation=none); skipped", file=sys.stderr)
                return None
            examples = splits.valid if settings.limit is None else splits.valid[: int(settings.limit)]
            conversations = [ex.messages for ex in examples]
            from phitune.data.dataset import examples_digest

            digest = examples_digest(examples)
            data_file = str(cfg.data.validation_file or cfg.data.train_file)
        if settings.get("device", "auto") == "auto" and cfg.get("backend") is not None:
            settings.device = cfg.backend.get("device", "auto") or "auto"
        if trained is not None:
            model, tokenizer, base_ref = trained
            source, result = score_in_memory(run_id, model, tokenizer, base_ref, conversations, settings,
                                             cfg.data.get("max_seq_len"), spec)
        else:
            with tempfile.TemporaryDirectory(prefix="phitune-eval-") as tmp:
                source = _run_model_source(client, run_id, Path(tmp))
                if source is None:
                    print("note: evaluate_at_end: the run logged neither a model nor a checkpoint; skipped",
                          file=sys.stderr)
                    return None
                result = score(source, conversations, settings, cfg.data.get("max_seq_len"), progress=False,
                               spec=spec)
        log_results(client, run_id, result, source=source, data_file=data_file, digest=digest, settings=settings)
        print(f"evaluation ({len(conversations)} conversations of {data_file}):\n{format_metrics(result.metrics)}",
              file=sys.stderr)
        return result.metrics
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the model is trained and logged: report, don't fail the run
        message = redact_text(f"{type(exc).__name__}: {' '.join(str(exc).split())}")[:2000]
        print(f"warning: evaluation at the end of the run failed: {message}", file=sys.stderr)
        try:
            client.set_tag(run_id, "phitune.eval_error", message)
        except Exception:
            pass
        return None
