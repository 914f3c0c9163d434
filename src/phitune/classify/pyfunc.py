"""The MLflow model a classification run logs: a pyfunc classifier = base reference + adapter.

Logged, and laid out, as the chat model is (phitune.tracking.pyfunc_model, docs/logged-model.md):
a portable `base.json` (the base folder shipped in `base_model/` when it has no Hub id),
`adapter/` (peft adapter with the head in it, or a whole model, and labels.json), phitune's
wheel, PyPI-pinned requirements.txt and a model card. predict() takes a
DataFrame with an `input` column (texts, or messages lists), or a list of them, and
returns one row per input: `label` and `scores` ({label: probability}).
"""
from __future__ import annotations

import json

import mlflow


class PhituneClassifierModel(mlflow.pyfunc.PythonModel):
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "classifier"}  # rebuilt by load_context

    def load_context(self, context):
        from phitune.classify.predict import Classifier
        from phitune.tracking.pyfunc_model import read_base

        self.classifier = Classifier.load(read_base(context), context.artifacts["adapter"])

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


def log_classifier_model(base_ref: dict, adapter_dir, name: str = "model", metrics: dict | None = None,
                         step: int | None = None, model_id: str | None = None):
    """Log the pyfunc classifier into the active run (or into the epoch LoggedModel `model_id`)
    as the chat model is logged (phitune.tracking.pyfunc_model.log_pyfunc_model): portable
    base, phitune's wheel, pinned requirements, model card, metrics. Returns mlflow's ModelInfo."""
    import pandas as pd

    from phitune.tracking.pyfunc_model import log_pyfunc_model

    return log_pyfunc_model(PhituneClassifierModel(), pd.DataFrame({"input": ["I was charged twice this month"]}),
                            dict(base_ref, task="classification"), adapter_dir, name=name, metrics=metrics, step=step,
                            model_id=model_id, task="classification")
