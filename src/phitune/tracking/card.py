"""The model card (README.md) that travels with a logged model: what it is and how to serve it.

Filled from the run that logs it (params, tags, metrics) and the portable base
reference, in the sections a Hugging Face model card has: base model, training data,
hyperparameters, results, usage.
"""
from __future__ import annotations

_HYPER = ("train.method", "train.learning_rate_multiplier", "train.batch_size_multiplier", "train.epochs",
          "derived.learning_rate", "derived.effective_batch", "derived.epochs", "train.lora.rank",
          "train.lora.alpha", "seed")
_RESULTS = ("full_valid_loss", "full_valid_mean_token_accuracy", "perplexity", "train_loss", "valid_loss",
            "eval_loss", "eval_token_f1", "eval_rouge_l")
# task -> (what the model is, the results it lists, what `phitune serve` answers)
_TASKS = {
    "chat": ("A chat model", _RESULTS, "OpenAI-compatible /v1/chat/completions"),
    "classification": ("A classifier", ("full_valid_macro_f1", "full_valid_accuracy", "full_valid_loss",
                                        "valid_macro_f1", "train_loss", "train_accuracy"),
                       "POST /v1/classifications: label and probabilities"),
}


def describe_base(base: dict) -> str:
    if base.get("hub_id"):
        return f"`{base['hub_id']}`" + (f" at revision `{base['revision']}`" if base.get("revision") else "") + \
            " (Hugging Face Hub)"
    if base.get("builtin"):
        return (f"phitune's builtin `{base['builtin']}` ({base.get('builtin_version', '?')}), rebuilt offline "
                "by phitune where the model loads")
    if base.get("shipped"):
        return f"the folder shipped in `artifacts/{base['shipped']}/` (trained from `{base.get('local_path')}`)"
    return f"the local folder `{base.get('local_path') or base.get('path')}` (not shipped: it must exist where it loads)"


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def model_card(base: dict, run, metrics: dict | None = None, task: str = "chat") -> str:
    """Markdown; `metrics` (an epoch checkpoint's) replace the run's final ones."""
    what, results, serves = _TASKS[task]
    params, tags = run.data.params, run.data.tags
    values = dict(run.data.metrics) if metrics is None else dict(metrics)
    name = base.get("name") or tags.get("phitune.model") or "base"
    lines = [f"# {name}, fine-tuned with phitune", "",
             f"{what}: {describe_base(base)} with a {params.get('train.method', 'lora')} fine-tune from "
             f"MLflow run `{run.info.run_id}` (`{run.info.run_name}`).", "",
             "## Training data", "",
             f"- training file: `{params.get('data.train_file', '?')}` (digest `{tags.get('phitune.train_digest', '?')}`)",
             f"- validation: {tags.get('phitune.validation_mode', '?')}, digest `{tags.get('phitune.valid_digest') or '-'}`",
             "", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | {params[key]} |" for key in _HYPER if key in params]
    lines += ["", "## Results" + (" (this checkpoint)" if metrics is not None else ""), "", "| metric | value |",
              "|---|---|"]
    lines += [f"| `{key}` | {_fmt(values[key])} |" for key in results if key in values]
    lines += ["", "## Use it", "",
              "```",
              f"phitune serve runs:/{run.info.run_id}/model          # {serves}",
              f"phitune promote --run {run.info.run_id} --name NAME  # then: phitune serve models:/NAME@champion",
              f"mlflow models serve -m runs:/{run.info.run_id}/model  # rebuilds the environment from requirements.txt",
              "```", "",
              "`requirements.txt` pins PyPI versions and installs phitune from the wheel in `artifacts/`.", ""]
    return "\n".join(lines)
