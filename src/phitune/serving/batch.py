"""Batched decoding: every active sequence advances one token per forward pass.

    decoder = BatchDecoder(generator)          # a phitune.modeling.generate.ChatGenerator
    seq = Sequence(generator, prompt_ids, max_tokens, temperature, top_p, stops, seed)
    delta = decoder.join(seq)                  # prompt forward (alone) + its first token
    deltas = decoder.join_many(seqs)           # queued prompts in one left-padded forward
    for seq, delta in decoder.step():          # one forward over all joined sequences
        ...
    decoder.leave(seq)                         # finished, cancelled or timed out

One KV cache holds all rows, left-padded to a common length: row i's real tokens are
the last `n_cached` columns, the attention mask hides its padding and position_ids
count only its real tokens, so each row sees what it would see alone. Sequences that
join together run their prompts in one forward, left-padded the same way (a lone one
runs exactly the one-at-a-time forward), and their cache is padded into the batch; a
leaving row is dropped and the columns that are padding in every remaining row are cut.
A batch of one unpadded row runs without a mask, as ChatGenerator does.

The cache is transformers' DynamicCache with plain full layers (no config: no sliding
-window layers that drop columns), whose per-layer `keys`/`values` tensors
[batch, kv_heads, tokens, head_dim] are padded, selected and concatenated here.

Rows may name different peft adapters of one base (multi-adapter serving): the forward
then passes peft's `adapter_names`, one per row (None: the active adapter).

Per sequence: temperature, top_p, seed (its own torch.Generator), stop strings,
max_tokens, and the text accounting of ChatGenerator (stop tokens, stop strings,
held-back prefixes, the result dict of `last_result`).
Not thread-safe: one worker thread owns a decoder and the model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from phitune.modeling.generate import _held_back


class Sequence:
    """One request's decoding state and text; `push(token)` returns the text to stream now."""

    def __init__(self, generator, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
                 stops: list[str], seed: int | None, adapter: str | None = None):
        self.g, self.prompt = generator, list(prompt)
        self.budget = min(int(max_tokens), generator.context_length - len(self.prompt))
        self.temperature, self.top_p, self.adapter = float(temperature), float(top_p), adapter
        self.stops = [s for s in stops or [] if s]
        self.rng = torch.Generator(device="cpu")
        if seed is not None:
            self.rng.manual_seed(int(seed))
        else:
            self.rng.seed()  # fresh entropy, leaving torch's global RNG alone
        self.out: list[int] = []
        self.text, self.emitted, self.sampled, self.finish = "", 0, 0, "length"
        self.done = False
        self.n_cached = 0  # real (unpadded) tokens of this row in the cache
        self.last = None  # the token to feed at the next step

    def sample(self, logits: torch.Tensor) -> str:
        return self.push(self.g._sample(logits, self.temperature, self.top_p, self.rng))

    def push(self, token: int) -> str:
        """Account one sampled token, as ChatGenerator._run does; mark the sequence done at a stop or its budget."""
        self.sampled += 1
        self.last = token
        if token in self.g.stop_ids:
            self.finish, self.done = "stop", True
            return self._flush()
        self.out.append(token)
        text = self.g.tokenizer.decode(self.out, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.finish, self.done = text[: min(hits)], "stop", True
            return self._flush()
        self.text = text
        delta = ""
        safe = len(text) - _held_back(text, self.stops)
        if safe > self.emitted:
            delta, self.emitted = text[self.emitted:safe], safe
        if self.sampled >= self.budget:
            self.done = True
            delta += self._flush()
        return delta

    def _flush(self) -> str:
        rest = self.text[self.emitted:]
        self.emitted = max(self.emitted, len(self.text))
        return rest

    def result(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish, "prompt_tokens": len(self.prompt),
                "completion_tokens": self.sampled}


class BatchDecoder:
    def __init__(self, generator):
        self.g = generator
        self.model = generator.model
        self.device = generator.device
        self.rows: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, cached columns], True where a row has a real token
        # Held for each forward pass: adapters are added or removed (phitune serve --follow) between them.
        self.lock = getattr(generator, "lock", None) or contextlib.nullcontext()

    def __len__(self) -> int:
        return len(self.rows)

    def _eval(self) -> None:
        # Module.eval() walks every submodule (about 1 ms a call on the tiny model's ~55 modules
        # with LoRA, more than a tenth of a decode step): only when something left it training.
        if self.model.training:
            self.model.eval()

    def _forward(self, ids: torch.Tensor, cache, adapters: list, **kw) -> torch.Tensor:
        # Rows of other peft adapters than the active one: peft's mixed-adapter batch, one name per row.
        active = getattr(self.model, "active_adapter", None)
        if any(a is not None and a != active for a in adapters):
            kw["adapter_names"] = [a if a is not None else active for a in adapters]
        with self.lock:
            return self.model(input_ids=ids, **self.g.forward_kw, **{self.g._cache_arg: cache}, **kw).logits

    def join(self, seq: Sequence) -> str:
        """Run seq's prompt alone, sample its first token and add its row to the batch. The first token's text."""
        return self.join_many([seq])[0]

    def join_many(self, seqs: list[Sequence]) -> list[str]:
        """Run these prompts in one forward, left-padded to the longest (prompts of one length, a lone
        one included, run unpadded and unmasked, as ChatGenerator does), sample each first token and
        add the unfinished rows to the batch. The first tokens' texts, in order."""
        from transformers import DynamicCache

        self._eval()
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)  # the padding id is hidden by the mask
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq.prompt):] = torch.tensor(seq.prompt, dtype=torch.long)
            mask[i, width - len(seq.prompt):] = True
        kw = {}
        if not bool(mask.all()):
            kw = {"attention_mask": mask.long().to(self.device),
                  "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0).to(self.device)}
        cache = DynamicCache()
        with torch.inference_mode():
            logits = self._forward(ids.to(self.device), cache, [s.adapter for s in seqs], **kw)
        deltas = []
        for i, seq in enumerate(seqs):
            seq.n_cached = len(seq.prompt)
            deltas.append(seq.sample(logits[i, -1]))
        keep = [i for i, seq in enumerate(seqs) if not seq.done]
        if keep:
            self._add_rows(seqs, cache, mask.to(self.device), keep)
        return deltas

    def _add_rows(self, seqs: list[Sequence], cache, mask: torch.Tensor, keep: list[int]) -> None:
        """Rows `keep` of a prefill of `seqs` (its cache, its mask [len(seqs), columns]) appended to the batch."""
        seqs = [seqs[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = mask[index]
        hide = ~mask[:, None, :, None]  # padding columns: zeroed, whatever the forward left in them
        for layer in cache.layers:
            layer.keys = layer.keys[index].masked_fill(hide, 0)
            layer.values = layer.values[index].masked_fill(hide, 0)
        if not self.rows:
            self.cache, self.mask, self.rows = cache, mask, list(seqs)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self.mask.shape[1], width - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, pad_old), _left_pad(new.keys, pad_new)])
            old.values = torch.cat([_left_pad(old.values, pad_old), _left_pad(new.values, pad_new)])
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self.rows.extend(seqs)

    def step(self) -> list[tuple[Sequence, str]]:
        """One forward over every row (its last sampled token in), one token sampled per row."""
        if not self.rows:
            return []
        self._eval()
        ids = torch.tensor([[s.last] for s in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.n_cached] for s in self.rows], dtype=torch.long, device=self.device)
        mask = F.pad(self.mask, (0, 1), value=True)
        # A lone unpadded row runs as ChatGenerator's decode step does: no mask at all.
        attention = None if bool(mask.all()) and len(self.rows) == 1 else mask.long()
        with torch.inference_mode():
            logits = self._forward(ids, self.cache, [s.adapter for s in self.rows], position_ids=positions,
                                   attention_mask=attention)
        self.mask = mask
        last = logits[:, -1].float()
        # Greedy rows: one argmax over the batch instead of one per row (the same token as _sample's).
        greedy = last[:, : self.g.n_tokens].argmax(-1).tolist()
        out = []
        for i, seq in enumerate(self.rows):
            seq.n_cached += 1
            out.append((seq, seq.push(greedy[i]) if seq.temperature == 0 else seq.sample(last[i])))
        return out

    def leave(self, gone) -> None:
        """Drop these sequences' rows (and the columns that only padded them)."""
        gone = {id(s) for s in gone}
        keep = [i for i, s in enumerate(self.rows) if id(s) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask[index]
        start = int(self.mask.any(0).to(torch.int8).argmax())  # first column some row uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, heads, tokens, head_dim] with n zero columns in front (hidden by the mask)."""
    return F.pad(x, (0, 0, n, 0)) if n else x
