"""The recipe's classification steps (phitune.recipe calls them where chat does its own):
data, model, the loop's task, the end-of-run report and the logged model."""
from __future__ import annotations

import sys

from phitune.errors import PhituneError


def setup_data(cfg, data_cls):
    """Validated, split, encoded examples and the label set; `data_cls`: phitune.recipe.Data."""
    from phitune.chat import chat_tokens
    from phitune.classify.data import ClassificationData
    from phitune.classify.encode import count_input_tokens, encode_examples
    from phitune.classify.labels import label_set
    from phitune.data.dataset import prepare_splits
    from phitune.modeling.loader import load_tokenizer

    max_len = int(cfg.data.max_seq_len or cfg.model.context_length)
    tokenizer = load_tokenizer(cfg.model)
    fixed = list(cfg.task.labels) if cfg.task.get("labels") else None
    splits = prepare_splits(cfg.data, token_counter=lambda m: (count_input_tokens(tokenizer, m), 0),
                            context_length=max_len, control_tokens=chat_tokens(tokenizer).control_strings,
                            task=ClassificationData(fixed))
    labels = label_set([e.label for e in splits.train], fixed)
    if len(labels) < 2:
        raise PhituneError(f"{cfg.data.train_file}: task=classification needs at least 2 labels, found {labels}")
    return data_cls(tokenizer, splits, encode_examples(tokenizer, splits.train, labels, max_len),
                    encode_examples(tokenizer, splits.valid, labels, max_len), labels=labels)


def loop_task(cfg, data):
    """The loop's ClassifyOps, with task.class_weights resolved from the training labels."""
    from phitune.classify.ops import ClassifyOps, balanced_weights

    setting = cfg.task.get("class_weights")
    if setting not in (None, "none", "balanced"):
        raise PhituneError(f"task.class_weights={setting}: expected null or balanced")
    weights = balanced_weights([e.label for e in data.train], len(data.labels)) if setting == "balanced" else None
    return ClassifyOps(len(data.labels), weights)


def build_model(cfg, data, device):
    from phitune.classify.model import build_classifier

    return build_classifier(cfg.model, cfg.train, data.labels, data.tokenizer.pad_token_id, device)


def predict(model, examples: list, batch_size: int, device) -> list[list[float]]:
    """Class probabilities of each encoded example, packed `batch_size` at a time."""
    import torch

    from phitune.classify.encode import pack
    from phitune.train.checkpoint import _unwrap

    model = _unwrap(model)
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = pack(examples[i:i + batch_size])
            logits = model(input_ids=b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                           last=b["last"].to(device))
            out.extend(torch.softmax(logits.float(), -1).cpu().tolist())
    model.train(was)
    return out


def report(model, examples: list, labels: list[str], batch_size: int, device) -> dict:
    """phitune.classify.metrics.scores of the model on encoded, labelled examples."""
    from phitune.classify.metrics import confusion, scores

    probs = predict(model, examples, batch_size, device)
    preds = [max(range(len(p)), key=p.__getitem__) for p in probs]
    return scores(confusion([e.label for e in examples], preds, len(labels)), labels)


def log_report(tracker, result: dict, labels: list[str], prefix: str, title: str) -> None:
    """Per-class precision / recall / F1 as metrics, the scores as JSON, the confusion matrix as PNG."""
    import json

    import mlflow

    from phitune.classify.metrics import per_class_metrics, plot_confusion

    mlflow.log_metrics(per_class_metrics(result, prefix))
    mlflow.log_text(json.dumps(dict(result, labels=labels), indent=1), f"{prefix}classification_report.json")
    tracker.log_files(lambda p: plot_confusion(result["confusion_matrix"], labels, p, title),
                      f"{prefix}confusion_matrix.png")


def finalise(cfg, tracker, data, model, device) -> None:
    """At the end of a run: the per-class figures and confusion matrix on the validation set."""
    if not data.valid:
        print("note: no validation data: no per-class report or confusion matrix", file=sys.stderr)
        return
    result = report(model, data.valid, data.labels, int(cfg.train.max_device_batch), device)
    log_report(tracker, result, data.labels, "full_valid_", f"{cfg.model.name}: validation confusion matrix")


def log_model(cfg, tokenizer, model) -> None:
    """The adapter (or whole model) with labels.json under `adapter/`, and the MLflow classifier model."""
    from phitune.classify.pyfunc import log_classifier_model
    from phitune.modeling.loader import base_reference
    from phitune.tracking.pyfunc_model import logged_adapter

    with logged_adapter(model, tokenizer) as adapter:
        ref = dict(base_reference(cfg.model), context_length=int(cfg.model.context_length), method=cfg.train.method,
                   task="classification")
        log_classifier_model(ref, adapter)
