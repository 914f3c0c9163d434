"""Cost before compute: validate the data, count billed tokens, estimate, refuse over budget.

Runs before any Azure ML or Foundry submission (dry runs included), so bad data
or a run over `backend.max_cost` stops here, before a VM starts or a token is
billed.

    billed tokens = sum over training examples of min(tokens, context) x epochs

the quantity serverless fine-tuning bills (OpenAI and Azure AI Foundry bill the
training file's tokens once per epoch). Tokens are counted with the model's own
tokenizer and chat template (phitune.chat.count_tokens) when it loads
offline; otherwise estimated at 4 characters per token, and said so.

    cost = billed tokens / 1000 x price_per_1k_tokens                    (serverless)
    cost = price_per_node_hour x instance_count x hours                  (Azure ML compute)
    hours = estimated_hours, or billed tokens / tokens_per_second / 3600

times the number of trials for a sweep (an upper bound: pruned trials stop early).
Amounts are in whatever currency the prices are given in.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from phitune.errors import PhituneError
from phitune.train.schedule import resolve_epochs

CHARS_PER_TOKEN = 4  # rough average for English text with a BPE tokenizer


@dataclass
class TokenEstimate:
    n_examples: int  # training examples (after an automatic split, the training part)
    tokens_per_epoch: int
    epochs: int
    counted_with: str  # "the tiny-phi3 tokenizer" or the heuristic
    exact: bool  # False when estimated from characters

    @property
    def billed_tokens(self) -> int:
        return self.tokens_per_epoch * self.epochs


@dataclass
class CostEstimate:
    amount: Optional[float]  # None when no price is configured
    basis: str  # how it was computed, for the user


def _token_counter(cfg):
    """(counter, description): the model's tokenizer when it loads offline, else a character heuristic."""
    try:
        from phitune.chat import count_tokens
        from phitune.modeling.loader import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
        return (lambda messages: count_tokens(tokenizer, messages)), f"the {cfg.model.name} tokenizer", True
    except (ImportError, PhituneError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        print(f"note: cannot load the {cfg.model.name} tokenizer here ({reason}); estimating tokens "
              f"at {CHARS_PER_TOKEN} characters per token", file=sys.stderr)

        def estimate(messages):
            total = sum(len(json.dumps(m.get("content", ""), ensure_ascii=False)) for m in messages) // CHARS_PER_TOKEN
            assistant = sum(len(str(m.get("content", ""))) for m in messages if m.get("role") == "assistant")
            return max(1, total), assistant // CHARS_PER_TOKEN

        return estimate, f"~{CHARS_PER_TOKEN} characters per token (no tokenizer)", False


def prepare_data(cfg):
    """Run the local validator on the run's data (DataError when unusable); (splits, counter info)."""
    from phitune.data.dataset import prepare_splits
    from phitune.tasks import is_classification

    counter, counted_with, exact = _token_counter(cfg)
    context = int(cfg.data.get("max_seq_len") or cfg.model.context_length)
    task = None
    if is_classification(cfg):  # labelled lines, the classification validator (phitune.classify.data)
        from phitune.classify.data import ClassificationData

        task = ClassificationData(list(cfg.task.labels) if cfg.task.get("labels") else None)
    splits = prepare_splits(cfg.data, token_counter=counter, context_length=context, task=task)
    return splits, counter, counted_with, exact, context


def token_estimate(cfg, epochs=None, prepared=None) -> TokenEstimate:
    """Billed training tokens of the run `cfg` describes.

    `epochs` overrides train.epochs; a list (a sweep's candidates) bills the largest.
    """
    splits, counter, counted_with, exact, context = prepared or prepare_data(cfg)
    per_epoch = 0
    for ex in splits.train:
        total, _ = counter(ex.messages)
        per_epoch += min(int(total), context)  # the trainer truncates at the context length
    n = len(splits.train)
    if epochs is None:
        epochs = cfg.train.epochs
    # A sweep over epochs: bill the largest a trial can run (an upper bound).
    candidates = list(epochs) if isinstance(epochs, (list, tuple)) else [epochs]
    resolved = max(resolve_epochs(e, n) for e in candidates)
    return TokenEstimate(n_examples=n, tokens_per_epoch=per_epoch, epochs=resolved, counted_with=counted_with,
                         exact=exact)


def estimate_cost(settings, tokens: Optional[TokenEstimate], trials: int = 1) -> CostEstimate:
    trials = max(1, int(trials))
    times = f" x {trials} trials" if trials > 1 else ""
    price_tok = getattr(settings, "price_per_1k_tokens", None)
    if price_tok is not None and tokens is not None:
        amount = tokens.billed_tokens / 1000.0 * float(price_tok) * trials
        return CostEstimate(amount, f"{tokens.billed_tokens:,} tokens / 1000 x {price_tok} per 1k tokens{times}")
    price_node = getattr(settings, "price_per_node_hour", None)
    if price_node is not None:
        nodes = int(getattr(settings, "instance_count", 1) or 1)
        hours, how = None, ""
        if getattr(settings, "estimated_hours", None) is not None:
            hours, how = float(settings.estimated_hours), "backend.estimated_hours"
        elif getattr(settings, "tokens_per_second", None) and tokens is not None:
            hours = tokens.billed_tokens / float(settings.tokens_per_second) / 3600.0
            how = f"{tokens.billed_tokens:,} tokens / {settings.tokens_per_second} tokens/s"
        if hours is not None:
            amount = float(price_node) * nodes * hours * trials
            return CostEstimate(amount, f"{price_node} per node-hour x {nodes} node(s) x {hours:.2f} h ({how}){times}")
        return CostEstimate(None, "price_per_node_hour is set but the hours are unknown: "
                                  "set backend.estimated_hours or backend.tokens_per_second")
    return CostEstimate(None, "no price configured (backend.price_per_1k_tokens or backend.price_per_node_hour)")


def check_budget(settings, estimate: CostEstimate) -> None:
    """PhituneError when the estimate is over backend.max_cost, or max_cost is set and nothing can be estimated."""
    limit = getattr(settings, "max_cost", None)
    if limit is None:
        return
    if estimate.amount is None:
        raise PhituneError(f"backend.max_cost={limit} is set but the cost cannot be estimated: {estimate.basis}; "
                           "nothing was submitted")
    if estimate.amount > float(limit):
        raise PhituneError(f"estimated cost {estimate.amount:.2f} is over backend.max_cost={limit} "
                           f"({estimate.basis}); nothing was submitted")


def report(tokens: Optional[TokenEstimate], estimate: CostEstimate, out=None, trials: int = 1) -> None:
    out = out or sys.stdout
    if tokens is not None:
        how = "counted with" if tokens.exact else "estimated at"
        per = " per trial (at most)" if trials > 1 else ""
        print(f"billed training tokens{per}: {tokens.tokens_per_epoch:,} per epoch x {tokens.epochs} epochs = "
              f"{tokens.billed_tokens:,} ({tokens.n_examples} examples, {how} {tokens.counted_with})", file=out)
    if estimate.amount is not None:
        print(f"estimated cost: {estimate.amount:,.2f} ({estimate.basis})", file=out)
    else:
        print(f"estimated cost: unknown ({estimate.basis})", file=out)


def preflight(cfg, settings, trials: int = 1, epochs=None, remote_data: bool = False):
    """Validate, count, print, refuse over budget; returns (TokenEstimate | None, CostEstimate, prepared data)."""
    prepared, tokens = None, None
    if remote_data:
        print("note: the data is already in Azure (an azureml:/https URI); not validated or counted locally",
              file=sys.stderr)
    else:
        prepared = prepare_data(cfg)  # DataError (already printed) when the data is unusable
        tokens = token_estimate(cfg, epochs=epochs, prepared=prepared)
    estimate = estimate_cost(settings, tokens, trials=trials)
    report(tokens, estimate, trials=trials)
    check_budget(settings, estimate)
    return tokens, estimate, prepared
