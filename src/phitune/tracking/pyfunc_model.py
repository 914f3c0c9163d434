"""The MLflow model a run logs: a pyfunc chat model = base reference + adapter, standing on its own.
task=classification's classifier (phitune.classify.pyfunc) is logged by the same log_pyfunc_model.

Artifacts (under `artifacts/` of the model folder):

    base.json      how to get the base model, portable: a Hub id and revision, phitune's
                   builtin tiny model by name and version (rebuilt offline), or a folder
                   shipped next to it (`base_model/`, when it has no Hub id and is small);
                   `local_path` only says where it was at training time (used where it exists)
    adapter/       peft adapter, safetensors (or a whole model folder for train.method=full)
    phitune-*.whl  phitune itself (not on PyPI), named by requirements.txt
    README.md      the model card: base, data digests, hyperparameters, metrics, how to serve

requirements.txt pins what loading imports at the installed versions, as PyPI names
them (a local build's `2.13.0+cpu` becomes `2.13.0`), so `mlflow models serve` with its
default environment manager, or `mlflow models build-docker`, can rebuild the
environment. `mlflow.pyfunc.load_model` and `mlflow models serve --env-manager local`
load it in this environment through load_context.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, ChatParams, TokenUsageStats


class PhituneChatModel(ChatModel):
    _RUNTIME = ("generator", "_lock", "name")

    def __getstate__(self):
        # MLflow pickles the instance after it validated it on an example: keep the
        # loaded model (and the lock) out of python_model.pkl; load_context rebuilds them.
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def load_context(self, context):
        from phitune.modeling.generate import ChatGenerator
        from phitune.modeling.loader import load_for_inference

        base = read_base(context)
        adapter = context.artifacts.get("adapter")
        model, tokenizer = load_for_inference(base, adapter)
        self.name = base.get("served_name") or base.get("name") or "phitune"
        self.generator = ChatGenerator(model, tokenizer, int(base.get("context_length") or 4096))
        # `mlflow models serve` answers requests on several threads; one generation at a time.
        self._lock = threading.Lock()

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        msgs = [{"role": m.role, "content": m.content or ""} for m in messages]
        with self._lock:
            out = self._generate(msgs, params)
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=self.name,
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=out["text"]),
                                finish_reason=out["finish_reason"])],
            usage=TokenUsageStats(prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                                  total_tokens=out["prompt_tokens"] + out["completion_tokens"]),
        )

    def _generate(self, msgs, params: ChatParams) -> dict:
        return self.generator.generate(
            msgs,
            max_tokens=params.max_tokens or 256,
            temperature=1.0 if params.temperature is None else params.temperature,
            top_p=1.0 if params.top_p is None else params.top_p,
            stop=params.stop,
            seed=getattr(params, "seed", None),
        )


# A base folder without a Hub id travels inside the model up to this size (tiny and test
# models, a few MB); a bigger one stays where it is, recorded as local_path, with a note.
SHIP_BASE_MAX_BYTES = 1 << 30
# What load_context imports, pinned at the installed versions (phitune's wheel adds its own ranges).
_PINNED = ("torch", "transformers", "tokenizers", "safetensors", "peft", "accelerate", "omegaconf", "hydra-core",
           "mlflow")


def portable_base(ref: dict) -> tuple[dict, Path | None]:
    """base.json as it travels with the model, and the folder to ship with it (or None)."""
    ref = dict(ref)
    path = ref.pop("path", None)
    if not path:
        if ref.get("builtin"):
            from phitune.modeling.tiny import TINY_VERSION

            ref["builtin_version"] = TINY_VERSION  # same phitune, same bytes: rebuilt offline where it loads
        return ref, None
    ref["local_path"] = path
    if ref.get("hub_id") or ref.get("method") == "full":  # the Hub has it / the adapter folder is the model
        return ref, None
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    if size <= SHIP_BASE_MAX_BYTES:
        ref["shipped"] = "base_model"
        return ref, Path(path)
    print(f"note: the logged model needs its base folder {path} ({size / 2**30:.1f} GiB, no hub id) on the machine "
          "that loads it; set model.hub_id to make it portable", file=sys.stderr)
    return ref, None


def read_base(context) -> dict:
    """In load_context: the model's base.json, localized (the shipped folder where there is one)."""
    return localize_base(json.loads(Path(context.artifacts["base"]).read_text()), context.artifacts.get("base_model"))


def localize_base(ref: dict, shipped_dir: str | None = None) -> dict:
    """The base reference to load from here: the shipped folder, else the training machine's
    folder where it exists, else the Hub id or builtin. An older model's absolute `path` stays."""
    ref = dict(ref)
    if ref.get("path"):
        return ref
    if shipped_dir and Path(shipped_dir).is_dir():
        ref["path"] = str(shipped_dir)
    elif ref.get("local_path") and Path(ref["local_path"]).is_dir():
        ref["path"] = ref["local_path"]
    elif ref.get("local_path") and not ref.get("hub_id") and not ref.get("builtin"):
        from phitune.errors import PhituneError

        raise PhituneError(f"the base model of this model is the folder {ref['local_path']} of the machine it was "
                           "trained on, and it is not here (it was not shipped with the model)")
    return ref


def requirements(wheel: str | None = None) -> list[str]:
    """Pins PyPI can resolve: a local build label (`+cpu`, `+cu124`) is dropped, since PyPI
    publishes none; phitune itself as the wheel in the model folder (`pip install -r` runs there)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    reqs = []
    for pkg in _PINNED:
        try:
            reqs.append(f"{pkg}=={Version(version(pkg)).public}")
        except PackageNotFoundError:
            pass
    if wheel:
        reqs.append(f"./artifacts/{wheel}")
    return reqs


# MLflow answers this example once to validate the chat model: keep it short.
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0.0}


@contextmanager
def logged_adapter(model, tokenizer) -> Iterator[Path]:
    """The trained adapter (or whole model) and tokenizer saved as safetensors in a temporary folder and
    logged under the active run's `adapter/`; yields the folder (for log_chat_model or the classifier's
    log), removed on exit."""
    import tempfile

    from phitune.train.checkpoint import _unwrap

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        _unwrap(model).save_pretrained(str(adapter), safe_serialization=True)
        tokenizer.save_pretrained(str(adapter))
        mlflow.log_artifacts(str(adapter), "adapter")
        yield adapter


def log_chat_model(base_ref: dict, adapter_dir: str | Path, name: str = "model", metrics: dict | None = None,
                   step: int | None = None, model_id: str | None = None):
    """Log the pyfunc chat model into the active run (or into `model_id`); see log_pyfunc_model."""
    return log_pyfunc_model(PhituneChatModel(), CHAT_EXAMPLE, base_ref, adapter_dir, name=name, metrics=metrics,
                            step=step, model_id=model_id)


def log_pyfunc_model(python_model, input_example, base_ref: dict, adapter_dir: str | Path, name: str = "model",
                     metrics: dict | None = None, step: int | None = None, model_id: str | None = None,
                     task: str = "chat"):
    """Log a phitune pyfunc model (chat, or task=classification's classifier) into the active
    run with the artifacts above; returns mlflow's ModelInfo. `python_model` reads them in
    load_context (the base through localize_base, with `base_model` when shipped).

    The LoggedModel carries `metrics` (default: every metric of the run, at its latest step),
    so MLflow's Models tab can rank it; the run's own history is not touched. With
    `model_id` (an epoch's checkpoint LoggedModel, which has its metrics already) the files
    go into that model instead, and no run may be active: MLflow would link it to the run twice."""
    import logging
    import tempfile
    import warnings

    from phitune.tracking.card import model_card
    from phitune.tracking.wheel import build_wheel

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(client.get_logged_model(model_id).source_run_id if model_id
                         else mlflow.active_run().info.run_id)
    if step is None and metrics is None:  # the final model: at the run's last step
        step = max((int(m.step) for m in getattr(run.data, "_metric_objs", [])), default=0)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow warns that ChatModel is deprecated (for agents) and that a pickled
        # python_model runs code on load; both are known and accepted here.
        warnings.simplefilter("ignore", FutureWarning)
        pyfunc_log.setLevel(logging.ERROR)
        base, ship = portable_base(base_ref)
        base_file = Path(tmp) / "base.json"
        base_file.write_text(json.dumps(base, indent=2))
        card = Path(tmp) / "README.md"
        card.write_text(model_card(base, run, metrics, task))
        wheel = build_wheel(tmp)
        artifacts = {"base": str(base_file), "adapter": str(adapter_dir), "card": str(card), "wheel": str(wheel)}
        if ship is not None:  # MLflow names an artifact folder by its basename (and refuses a symlink)
            shutil.copytree(ship, Path(tmp) / "base_model", copy_function=_link_or_copy)
            artifacts["base_model"] = str(Path(tmp) / "base_model")
        try:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=python_model,
                artifacts=artifacts,
                input_example=input_example,
                # Explicit requirements: inferring them imports and times the whole env (slow).
                pip_requirements=requirements(wheel.name),
                step=int(step or 0),
                model_id=model_id,
            )
        finally:
            pyfunc_log.setLevel(level)
    if model_id is None:
        link_metrics(run, info.model_id, metrics, step)
    return info


CHECKPOINT_MODEL_TYPE = "phitune-checkpoint"  # an epoch's LoggedModel before promote gives it files


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint-epoch-{epoch:03d}"  # MLflow 3 model names cannot hold "/"


def log_checkpoint_model(run_id: str, experiment_id: str, epoch: int, step: int, metrics: dict) -> str | None:
    """A kept epoch as a LoggedModel with that epoch's metrics at its step (MLflow's Models tab
    ranks them). No files of its own: the adapter is the run's checkpoints/epoch-NNN (no second
    copy) and building the pyfunc model would load the base mid-training; `phitune promote
    --checkpoint N` logs the servable model into it. None if the run already has it (resume)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = mlflow.tracking.MlflowClient()
    name = checkpoint_name(epoch)
    if client.search_logged_models(experiment_ids=[experiment_id],
                                   filter_string=f"name = '{name}' AND source_run_id = '{run_id}'"):
        return None
    run = client.get_run(run_id)
    params = {k: v for k, v in run.data.params.items() if k.startswith("train.") or k == "model.name"}
    model = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, model_type=CHECKPOINT_MODEL_TYPE, params=params,
        tags={"phitune.checkpoint": f"epoch-{epoch:03d}", "phitune.files": f"runs:/{run_id}/checkpoints/epoch-{epoch:03d}"})
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    link_metrics(run, model.model_id, dict(metrics, epoch=epoch), step)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system: no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def link_metrics(run, model_id: str, metrics: dict | None = None, step: int | None = None) -> None:
    """Attach metrics to a LoggedModel. A run metric is re-sent with its own timestamp and step,
    which MLflow's store keeps once in the run's history and adds to the model's."""
    import time

    from mlflow.entities import Metric

    client = mlflow.tracking.MlflowClient()
    now, batch = int(time.time() * 1000), []
    wanted = dict(run.data.metrics) if metrics is None else {k: float(v) for k, v in metrics.items()
                                                             if isinstance(v, (int, float)) and k != "step"}
    for key, value in wanted.items():
        history = client.get_metric_history(run.info.run_id, key)
        if metrics is None and history:
            point = history[-1]
        else:  # an epoch's value: the run's point at that step if it has it
            point = next((p for p in history if p.step == int(step or 0) and p.value == value), None)
        batch.append(Metric(key, value, point.timestamp if point else now, point.step if point else int(step or 0),
                            model_id=model_id))
    for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
        client.log_batch(run.info.run_id, metrics=batch[i:i + 1000])
