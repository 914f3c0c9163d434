"""The MLflow model a run logs: a pyfunc chat model = base reference + adapter.

Artifacts: `base.json` (how to get the base: Hub id, local path or phitune's
builtin tiny model) and `adapter/` (peft adapter, safetensors; or a full model
folder for train.method=full). `mlflow.pyfunc.load_model` and
`mlflow models serve --env-manager local` both load it through load_context.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
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

        base = json.loads(Path(context.artifacts["base"]).read_text())
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


def log_chat_model(base_ref: dict, adapter_dir: str | Path, name: str = "model"):
    """Log the pyfunc chat model into the active run; returns mlflow's ModelInfo."""
    import logging
    import tempfile
    import warnings

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow warns that ChatModel is deprecated (for agents) and that a pickled
        # python_model runs code on load; both are known and accepted here.
        warnings.simplefilter("ignore", FutureWarning)
        pyfunc_log.setLevel(logging.ERROR)
        base_file = Path(tmp) / "base.json"
        base_file.write_text(json.dumps(base_ref, indent=2))
        try:
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=PhituneChatModel(),
                artifacts={"base": str(base_file), "adapter": str(adapter_dir)},
                # MLflow answers this example once to validate the model: keep it short.
                input_example={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                               "temperature": 0.0},
                # Explicit requirements: inferring them imports and times the whole env (slow).
                pip_requirements=_requirements(),
            )
        finally:
            pyfunc_log.setLevel(level)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "transformers", "peft", "safetensors", "tokenizers", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs
