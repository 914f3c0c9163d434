"""`phitune eval MODEL_URI --data FILE` for a classifier: FILE holds labelled lines
({"messages"|"text", "label"}); the scores come from phitune's `classification` evaluate
module (loaded by path): accuracy, macro-F1, per-class precision / recall / F1 and the
confusion matrix, printed and logged as an eval run (eval_accuracy, eval_macro_f1,
eval_precision_<label>..., eval/confusion_matrix.png, eval/metrics.json).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from phitune.errors import DataError, PhituneError

PREFIX = "eval_"


def _check(path: str, known=None, source: str = ""):
    """Validate with the classification rules; DataError (problems printed) when unusable."""
    from phitune.classify.data import ClassificationData, validate_classification_file

    report = validate_classification_file(path, known, source, training=False)
    for problem in report.errors:
        print(problem, file=sys.stderr)
    if not report.readable or report.n_errors or not report.n_examples:
        raise DataError(f"{path}: {report.n_errors} errors" if report.n_errors else f"{path}: no labelled example")
    return ClassificationData().load(path)


def format_scores(result: dict, labels: list[str]) -> str:
    lines = [f"  accuracy {result['accuracy']:.4f}  macro_f1 {result['macro_f1']:.4f}",
             "  " + "label".ljust(20) + "precision  recall  f1      support"]
    for name in labels:
        c = result["per_class"][name]
        lines.append(f"  {name[:20].ljust(20)}{c['precision']:<11.4f}{c['recall']:<8.4f}{c['f1']:<8.4f}{c['support']}")
    width = max(len(x) for x in labels)
    lines.append("  confusion matrix (rows: true, columns: predicted, in the order above):")
    lines += ["  " + name.ljust(width) + "  " + " ".join(f"{v:4d}" for v in row)
              for name, row in zip(labels, result["confusion_matrix"])]
    return "\n".join(lines)


def evaluate_classifier(cfg, model_uri: str, test_file: str, settings) -> dict:
    """Score the classifier at model_uri on test_file; log an eval run unless eval.log=false."""
    from phitune.classify.predict import Classifier
    from phitune.data.dataset import examples_digest
    from phitune.evaluation.run import _device
    from phitune.evaluation.suite import load_metric
    from phitune.models.uri import resolve

    examples = _check(test_file)  # the file's format before any model is loaded
    if settings.limit is not None:
        examples = examples[: max(0, int(settings.limit))]
    with tempfile.TemporaryDirectory(prefix="phitune-eval-") as tmp:
        source = resolve(model_uri, cfg.tracking.uri, Path(tmp), cfg.get("model"))
        if not source.adapter_dir or not (Path(source.adapter_dir) / "labels.json").is_file():
            raise PhituneError(f"{source.uri} is not a classifier (no labels.json with its weights); "
                               f"{test_file} holds labelled examples")
        clf = Classifier.load(source.base_ref, source.adapter_dir, str(_device(settings.device)))
        _check(test_file, clf.labels, f"the labels of {source.uri}")  # every label known to the model
        print(f"evaluating {source.describe()} on {test_file} ({len(examples)} examples)", file=sys.stderr)
        data, _ = clf.classify([e.messages for e in examples])
    ids = {name: i for i, name in enumerate(clf.labels)}
    result = load_metric("classification").compute(predictions=[ids[d["label"]] for d in data],
                                                   references=[ids[e.label] for e in examples], labels=clf.labels)
    digest = examples_digest(examples)
    run_id = _log(cfg, source, result, clf.labels, test_file, digest) if settings.log else None
    print(f"{source.describe()} on {test_file} (digest {digest[:12]}):")
    print(format_scores(result, clf.labels))
    metrics = {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"], "examples": len(examples)}
    return {"metrics": metrics, "run_id": run_id, "source_run_id": source.run_id, "report": result}


def _log(cfg, source, result: dict, labels: list[str], test_file: str, digest: str) -> str:
    import mlflow
    from mlflow.tracking import MlflowClient

    from phitune.classify.metrics import per_class_metrics, plot_confusion
    from phitune.evaluation.run import _eval_experiment

    client = MlflowClient()
    tags = {"phitune.role": "eval", "phitune.task": "classification", "phitune.eval_model_uri": source.uri,
            "phitune.eval_digest": digest, "phitune.eval_data_file": test_file}
    if source.run_id:
        tags["phitune.eval_of"] = source.run_id
    name = f"eval-{source.model_name}-v{source.model_version}" if source.model_name else \
        f"eval-{(source.run_id or Path(source.uri).name)[:12]}"
    with mlflow.start_run(experiment_id=_eval_experiment(client, source, cfg.tracking), run_name=name, tags=tags) as run:
        mlflow.log_metrics({f"{PREFIX}accuracy": result["accuracy"], f"{PREFIX}macro_f1": result["macro_f1"],
                            **per_class_metrics(result, PREFIX)})
        mlflow.log_text(json.dumps(dict(result, labels=labels, model_uri=source.uri, data_file=test_file,
                                        data_digest=digest), indent=1), "eval/metrics.json")
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_confusion(result["confusion_matrix"], labels, Path(tmp) / "confusion_matrix.png",
                                 f"{Path(test_file).name}: confusion matrix")
            mlflow.log_artifact(str(png), "eval")
        return run.info.run_id
