"""Chat generation for serving and the MLflow pyfunc model.

A plain decoding loop with a KV cache: one forward over the prompt, then one
token per step. That makes streaming, stop strings and token accounting simple
and identical in `generate` and `stream`.

Not thread-safe: one ChatGenerator runs one generation at a time (a server
should serialise calls, e.g. with a lock or a single worker).

Several LoRA adapters on one base (`phitune serve URI URI...`): the model is one peft
model holding each adapter under a name; `stream(..., adapter=NAME)` activates that
adapter before its first forward pass. `self.lock` is held for the whole of a
generation and while an adapter is added or removed, so a model swapped in by
`phitune serve --follow` changes between two generations, never during one (a decoder
that runs the model itself, such as a batched one, holds it around its forward passes).
"""
from __future__ import annotations

import inspect
import threading
from typing import Iterator, Sequence

import torch

from phitune.chat import chat_tokens, generation_prompt_ids
from phitune.errors import PhituneError


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` might be the start of a stop string
    (or an incomplete UTF-8 character), so must not be streamed yet."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    # A multi-byte character split across tokens decodes as U+FFFD until complete.
    trailing = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, trailing)


class ChatGenerator:
    """Generate assistant replies with a causal LM and its chat template.

    generate(...) -> {"text", "finish_reason": "stop"|"length", "prompt_tokens", "completion_tokens"}
    stream(...)   -> iterator of text deltas; once exhausted, `self.last_result` holds
                     the same dict as generate() (and `self.last_finish_reason` its reason).

    finish_reason is "stop" at any special token of the chat format (end of turn, eos,
    or a turn marker such as `<|user|>`, which would start an invented turn) or a `stop`
    string (neither is part of the text), "length" when max_tokens or the context runs out.
    completion_tokens counts every token sampled, the end-of-turn token included.
    """

    def __init__(self, model, tokenizer, context_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.device = next(model.parameters()).device
        gen_cfg = getattr(model, "generation_config", None)
        ids = set(_as_list(getattr(gen_cfg, "eos_token_id", None)))
        ids |= set(_as_list(getattr(model.config, "eos_token_id", None)))
        self.stop_ids = ids | chat_tokens(tokenizer).special_ids
        # Embedding tables are often padded past the tokenizer (Phi-3: 32064 rows for
        # 32011 tokens); those rows were never trained and decode to nothing.
        self.n_tokens = len(tokenizer)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        # transformers 5.x renamed past_key_values -> cache (the old name warns).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are sampled: a prompt's forward skips the lm_head on
        # the others ([prompt tokens, vocab] floats: 1,000 tokens of Phi-3's 32,064 are 128 MB).
        self.forward_kw = {"use_cache": True}
        if "logits_to_keep" in params:
            self.forward_kw["logits_to_keep"] = 1
        self.last_result: dict | None = None
        self.last_finish_reason: str | None = None
        # A plain Lock, not an RLock: a generation abandoned half-way is closed (and its
        # lock released) by whichever thread drops the last reference to it.
        self.lock = threading.Lock()

    # -- named peft adapters (one base, several fine-tunes) ------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of the peft adapters loaded in the model ([] for a plain model)."""
        return list(getattr(self.model, "peft_config", None) or {})

    def add_adapter(self, name: str, adapter_dir: str) -> None:
        """Load a peft adapter folder under `name` next to the others (not activated)."""
        if not hasattr(self.model, "load_adapter") or not self.adapters:
            raise PhituneError(f"{adapter_dir}: this model holds no peft adapter, so another cannot join it")
        with self.lock:
            self.model.load_adapter(str(adapter_dir), adapter_name=name)  # frozen, in eval mode

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            self.model.delete_adapter(name)

    def _activate(self, adapter: str | None) -> None:
        """Make `adapter` the active one (None: leave the model as it is). Called with the lock held."""
        if adapter is None or getattr(self.model, "active_adapter", None) == adapter:
            return
        if adapter not in self.adapters:
            raise PhituneError(f"no adapter {adapter!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        self.model.set_adapter(adapter, inference_mode=True)

    def prompt_ids(self, messages) -> list[int]:
        """Token ids of the chat-template prompt, content read as text (phitune.chat)."""
        return generation_prompt_ids(self.tokenizer, messages)

    def generate(self, messages, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None, adapter: str | None = None) -> dict:
        for _ in self.stream(messages, max_tokens, temperature, top_p, stop, seed, adapter=adapter):
            pass
        return dict(self.last_result)

    def stream(self, messages, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
               stop: list[str] | None = None, seed: int | None = None, adapter: str | None = None) -> Iterator[str]:
        """adapter: the peft adapter to answer with (serving's GenParams.adapter); None: the active one."""
        # Not a generator itself: bad arguments and a too-long prompt raise PhituneError
        # here, when the stream is created, before a server has sent any byte.
        prompt = self._check(messages, max_tokens, temperature, top_p)
        return self._run(prompt, max_tokens, float(temperature), float(top_p), list(stop or []), seed, adapter)

    def _check(self, messages, max_tokens, temperature, top_p) -> list[int]:
        if not messages:
            raise PhituneError("messages must not be empty")
        if int(max_tokens) < 1:
            raise PhituneError(f"max_tokens must be >= 1, got {max_tokens}")
        if float(temperature) < 0:
            raise PhituneError(f"temperature must be >= 0, got {temperature}")
        if not 0 < float(top_p) <= 1:
            raise PhituneError(f"top_p must be in (0, 1], got {top_p}")
        prompt = self.prompt_ids(messages)
        if len(prompt) >= self.context_length:
            raise PhituneError(
                f"the prompt is {len(prompt)} tokens but the model's context is {self.context_length} tokens; "
                "shorten the conversation"
            )
        return prompt

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except (TypeError, AttributeError):  # transformers < 4.56 (no config argument)
            return DynamicCache()

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
        logits = logits.float().cpu()[: self.n_tokens]
        if temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest set of most likely tokens whose mass reaches top_p
            outside = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p
            sorted_p[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=gen))

    def _run(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
             stops: list[str], seed: int | None, adapter: str | None = None) -> Iterator[str]:
        with self.lock:  # taken at the first next(): on the thread that generates
            self._activate(adapter)
            yield from self._decode(prompt, max_tokens, temperature, top_p, stops, seed)

    def _decode(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
                stops: list[str], seed: int | None) -> Iterator[str]:
        self.last_result, self.last_finish_reason = None, None
        budget = min(int(max_tokens), self.context_length - len(prompt))
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()  # fresh entropy, leaving torch's global RNG alone
        stops = [s for s in stops if s]
        was_training = self.model.training
        self.model.eval()
        out: list[int] = []
        text, emitted, sampled, finish = "", 0, 0, "length"
        cache = self._new_cache()
        try:
            with torch.inference_mode():
                step_input = torch.tensor([prompt], dtype=torch.long, device=self.device)
                for step in range(budget):
                    logits = self.model(input_ids=step_input, **self.forward_kw, **{self._cache_arg: cache}).logits
                    token = self._sample(logits[0, -1], temperature, top_p, gen)
                    sampled += 1
                    if token in self.stop_ids:
                        finish = "stop"
                        break
                    out.append(token)
                    text = self.tokenizer.decode(out, skip_special_tokens=True)
                    hits = [i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0]
                    if hits:
                        text, finish = text[: min(hits)], "stop"
                        break
                    safe = len(text) - _held_back(text, stops)
                    if safe > emitted:
                        yield text[emitted:safe]
                        emitted = safe
                    step_input = torch.tensor([[token]], dtype=torch.long, device=self.device)
            if len(text) > emitted:
                yield text[emitted:]
        finally:
            self.model.train(was_training)
        self.last_finish_reason = finish
        self.last_result = {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": sampled,
        }


def load_generator(source, device: str = "cpu") -> ChatGenerator:
    """Load a resolved model (phitune.models.uri.ModelSource): base + adapter in a ChatGenerator
    (the slow part: seconds to minutes)."""
    import warnings

    import transformers

    from phitune.modeling.loader import load_for_inference

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    model, tokenizer = load_for_inference(source.base_ref, source.adapter_dir, device=device)
    context = int(source.context_length or getattr(model.config, "max_position_embeddings", 4096))
    return ChatGenerator(model, tokenizer, context)
