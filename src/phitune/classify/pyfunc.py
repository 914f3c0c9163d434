"""The MLflow model a classification run logs: a pyfunc classifier = base reference + adapter.

Artifacts as for chat (phitune.tracking.pyfunc_model): `base.json` and `adapter/` (peft
adapter with the head in it, or a whole model, and labels.json). predict() takes a
DataFrame with an `input` column (texts, or messages lists), or a list of them, and
returns one row per input: `label` and `scores` ({label: probability}).
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow


class PhituneClassifierModel(mlflow.pyfunc.PythonModel):
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "classifier"}  # rebuilt by load_context

    def load_context(self, context):
        from phitune.classify.predict import Classifier

        base = json.loads(Path(context.artifacts["base"]).read_text())
        self.classifier = Classifier.load(base, context.artifacts["adapter"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            inputs = list(model_input["input"])
        elif isinstance(model_input, dict):
            inputs = model_input["input"] if isinstance(model_input["input"], list) else [model_input["input"]]
        else:
            inputs = list(model_input)
        inputs = [_parsed(x) for x in inputs]
        data, _ = self.classifier.classify(inputs)
        return pd.DataFrame({"label": [d["label"] for d in data], "scores": [json.dumps(d["scores"]) for d in data]})


def _parsed(item):
    """A messages list may arrive as its JSON text (a DataFrame cell through MLflow's serving)."""
    if isinstance(item, str) and item.lstrip().startswith("["):
        try:
            return json.loads(item)
        except json.JSONDecodeError:
            pass
    return [dict(m) for m in item] if not isinstance(item, str) and hasattr(item, "__iter__") else item


def log_classifier_model(base_ref: dict, adapter_dir, name: str = "model"):
    """Log the pyfunc classifier into the active run; returns mlflow's ModelInfo."""
    import logging
    import tempfile
    import warnings

    import pandas as pd

    from phitune.tracking import pyfunc_model

    # the chat model's pins (named `requirements` in the newer pyfunc_model, `_requirements` before)
    pins = getattr(pyfunc_model, "requirements", None) or getattr(pyfunc_model, "_requirements")
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pyfunc_log.setLevel(logging.ERROR)
        base_file = Path(tmp) / "base.json"
        base_file.write_text(json.dumps(base_ref, indent=2))
        try:
            return mlflow.pyfunc.log_model(
                name=name, python_model=PhituneClassifierModel(),
                artifacts={"base": str(base_file), "adapter": str(adapter_dir)},
                input_example=pd.DataFrame({"input": ["I was charged twice this month"]}),
                pip_requirements=pins(),
            )
        finally:
            pyfunc_log.setLevel(level)
