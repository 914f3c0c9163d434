"""Score a loaded chat model on held-out conversations.

Two families of numbers, both on the same conversations:

- teacher-forced: the conversation encoded as in training (phitune's encoder, labels
  on assistant turns only) and run through the training loop's `evaluate`: mean
  cross-entropy per labelled token (`loss`), `perplexity` = exp(loss) and
  `mean_token_accuracy` (argmax = next token). On a run's validation file these
  equal its final full_valid_loss / full_valid_mean_token_accuracy.
- generation: prompt = the messages before the last assistant turn, reference = that
  turn's content; the model answers greedily (temperature 0, at most
  `max_new_tokens`) and the answer is scored with phitune's own `evaluate` metric
  modules, loaded by path: exact_match, token_f1, rouge_l, bleu (corpus BLEU-4).
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from phitune.chat import IGNORE_INDEX, encode_example, split_conversation

METRICS_DIR = Path(__file__).resolve().parents[1] / "metrics"
# module name -> the key of its result that the suite reports
GENERATION_METRICS = {"exact_match": "exact_match", "token_f1": "token_f1", "rouge_l": "rouge_l", "bleu": "bleu"}
# per-row scores in the table of sample generations
ROW_METRICS = ("token_f1", "rouge_l")
# At most this many parameters on a CPU: evaluate with one intra-op thread. For a model
# this small every op is tiny and thread hand-offs cost more than they save: the tiny
# Phi-3 (1.6M) measured 1.1 s CPU / 1.6 s wall with 1 thread vs 8.4 s / 16 s with 2 for
# the teacher-forced pass over the 48 sample validation chats (2-core box under load).
SMALL_MODEL_PARAMS = 50_000_000


@dataclass
class EvalResult:
    metrics: dict  # loss, perplexity, mean_token_accuracy, exact_match, token_f1, rouge_l, bleu, counts
    samples: list = field(default_factory=list)  # one dict per generated reply (the MLflow table's rows)


def load_metric(name: str):
    """phitune's metric module `name` through `evaluate.load(<local path>)` (no Hub)."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"no metric module {path / (name + '.py')}")
    return evaluate.load(str(path), keep_in_memory=True)


@contextlib.contextmanager
def cpu_threads_for(model, device):
    """One torch thread while a small model runs on the CPU (restored afterwards)."""
    import torch

    small = sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMS
    if torch.device(device).type != "cpu" or not small or torch.get_num_threads() == 1:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def render_prompt(prompt: Sequence[dict]) -> str:
    """The prompt as readable text for the table: one `role: content` line per message."""
    return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in prompt)


def teacher_forced(model, tokenizer, conversations: Sequence[Sequence[dict]], max_len: int, batch_size: int,
                   device, spec=None) -> dict:
    """loss, perplexity, mean_token_accuracy, examples, tokens over the conversations; `spec` (a
    LoopSpec): the training's memory settings, e.g. the loss in chunks instead of full logits."""
    from phitune.train.distributed import Dist
    from phitune.train.loop import evaluate

    encoded = []
    for messages in conversations:
        enc = encode_example(tokenizer, messages, max_len)
        if any(label != IGNORE_INDEX for label in enc.labels[1:]):
            encoded.append(enc)  # else: no assistant token survives truncation or weight 0
    if not encoded:
        return {"loss": float("nan"), "perplexity": float("nan"), "mean_token_accuracy": float("nan"),
                "examples": 0, "tokens": 0}
    out = evaluate(model, encoded, max(1, int(batch_size)), Dist(device=device), spec=spec)
    return {"loss": out["loss"], "perplexity": math.exp(min(out["loss"], 50.0)),
            "mean_token_accuracy": out["mean_token_accuracy"], "examples": len(encoded), "tokens": out["tokens"]}


def generation_scores(predictions: list, references: list) -> dict:
    """{exact_match, token_f1, rouge_l, bleu} through the evaluate modules."""
    if not predictions:
        return {}
    out = {}
    for module, key in GENERATION_METRICS.items():
        out[key] = float(load_metric(module).compute(predictions=predictions, references=references)[key])
    return out


def generate_replies(generator, pairs: Sequence[tuple], max_new_tokens: int, progress: bool = False) -> list:
    """Greedy replies; a prompt longer than the context is skipped (None)."""
    from phitune.errors import PhituneError

    replies = []
    for i, (prompt, _) in enumerate(pairs):
        try:
            replies.append(generator.generate(prompt, max_tokens=int(max_new_tokens), temperature=0.0))
        except PhituneError as exc:
            print(f"note: conversation {i + 1}: not generated ({exc})", file=sys.stderr)
            replies.append(None)
        if progress and (i + 1) % 8 == 0:
            print(f"  generated {i + 1}/{len(pairs)}", file=sys.stderr)
    return replies


def run_suite(model, tokenizer, conversations: Sequence[Sequence[dict]], context_length: int, *,
              max_seq_len: Optional[int] = None, batch_size: int = 8, generation_limit: Optional[int] = 16,
              max_new_tokens: int = 64, device=None, progress: bool = False, spec=None) -> EvalResult:
    """Teacher-forced metrics on every conversation, generation metrics on the first
    `generation_limit` that have an assistant turn to predict."""
    import torch

    from phitune.modeling.generate import ChatGenerator

    device = device or next(model.parameters()).device
    max_len = int(max_seq_len or context_length)
    pairs = [p for p in (split_conversation(m) for m in conversations) if p is not None]
    if generation_limit is not None:
        pairs = pairs[: max(0, int(generation_limit))]
    generator = ChatGenerator(model, tokenizer, int(context_length))
    with cpu_threads_for(model, device):
        metrics = teacher_forced(model, tokenizer, conversations, max_len, batch_size, device, spec)
        with torch.inference_mode():
            replies = generate_replies(generator, pairs, max_new_tokens, progress)
    done = [(p, r) for p, r in zip(pairs, replies) if r is not None]
    predictions = [r["text"] for _, r in done]
    references = [p[1] for p, _ in done]
    metrics.update(generation_scores(predictions, references))
    metrics["generated"] = len(done)

    samples = []
    row_metrics = {name: load_metric(name) for name in ROW_METRICS} if done else {}
    for (prompt, reference), reply in done:
        row = {"prompt": render_prompt(prompt), "reference": reference, "prediction": reply["text"],
               "finish_reason": reply["finish_reason"], "completion_tokens": reply["completion_tokens"]}
        for name, metric in row_metrics.items():
            row[name] = float(metric.compute(predictions=[reply["text"]], references=[reference])[GENERATION_METRICS[name]])
        samples.append(row)
    return EvalResult(metrics=metrics, samples=samples)
