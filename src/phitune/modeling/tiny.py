"""The embedded tiny Phi-3: a real Phi3ForCausalLM of ~1.6M parameters, built offline.

No model hub is reachable here, so phitune builds its default model itself: the
real architecture (so LoRA targets, chat template, special tokens and loading
code are exactly those of microsoft/Phi-3-mini-4k-instruct), a byte-level BPE
tokenizer trained on `phitune/assets/tiny_corpus.txt`, and weights that are
briefly pretrained on that same corpus (plain causal LM, all weights, AdamW).

Why pretrain: with random weights a LoRA fine-tune barely moves the loss off
ln(vocab) and every learning rate looks alike, so a sweep would optimise noise.
After ~35 s (CPU) of pretraining the model knows English, support-style prose and the
Phi-3 chat format in miniature, like the real base models users fine-tune; the
sample fine-tuning data (data/support_*.jsonl) is NOT in the corpus, so a
fine-tune still has a product to learn.

The result is an ordinary Hugging Face folder (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with the chat template),
so `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`
load it like any hub model. Building is deterministic: same library versions and
CPU kind -> byte-identical model.safetensors and tokenizer.json (pretraining runs
on one CPU thread with torch's deterministic algorithms, whatever the machine).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
from importlib import resources
from pathlib import Path

# Bump when anything below changes what gets built: old caches are then ignored.
TINY_VERSION = "tiny-phi3-v2"  # v2: pretrained on the enlarged corpus
SEED = 1234

# The chat template of microsoft/Phi-3-mini-4k-instruct (tokenizer_config.json),
# verbatim: no bos, "<|role|>\n{content}<|end|>\n" per turn, eos when not generating.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3's added tokens in the order of the real vocabulary (ids 32000..32010 there),
# appended after the BPE vocabulary here.
PHI3_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
# Llama-style specials at ids 0..2, as in Phi-3's sentencepiece vocabulary.
BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

BPE_VOCAB_SIZE = 2048  # BPE entries (+11 Phi-3 specials, table rounded up to 2112 rows)
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,  # head_dim 32
    num_key_value_heads=4,
    max_position_embeddings=2048,  # tokens; conf/model/tiny-phi3.yaml trains at 512
)
# Build-time pretraining. 4 windows * 256 tokens = 1,024 tokens/step; 200 steps =
# 205k tokens, ~4 passes over the ~50k-token corpus. 256-token windows cover a
# typical chat example (data/support_*.jsonl: median ~210 tokens, so RoPE sees
# those distances). ~0.16 s of CPU per step on one thread: ~35 s for the build.
PRETRAIN = dict(
    steps=200,
    batch=4,  # windows per step
    seq_len=256,  # tokens per window
    lr=2e-3,  # peak; 1e-3..3e-3 score alike, 8e-3 is worse
    warmup_steps=20,  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio=0.1,
    weight_decay=0.1,  # on matrices only, not on the norms
    betas=(0.9, 0.95),
    max_grad_norm=1.0,
)
# Threads, deterministic-algorithm mode and RNG are process-wide: builds in one
# process run one at a time.
_BUILD_LOCK = threading.Lock()


def _cache_root() -> Path:
    env = os.environ.get("PHITUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "phitune"


def tiny_phi3_dir() -> Path:
    """Where ensure_tiny_phi3() keeps the model ($PHITUNE_CACHE or ~/.cache/phitune)."""
    return _cache_root() / TINY_VERSION


def _corpus_text() -> str:
    return resources.files("phitune.assets").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def _corpus_lines() -> list[str]:
    """Tokenizer training text: the corpus lines without the chat markers (added tokens)."""
    lines = []
    for line in _corpus_text().splitlines():
        for special in PHI3_ADDED_TOKENS:
            line = line.replace(special, "")
        if line.strip():
            lines.append(line)
    return lines


def _corpus_documents() -> list[str]:
    """Pretraining documents: the corpus's blank-line-separated blocks.

    Chat blocks are written in Phi-3's template (what apply_chat_template gives,
    <|endoftext|> included); that final <|endoftext|> is dropped here because
    _pretraining_stream ends every document with one.
    """
    blocks = (b.strip("\n") for b in _corpus_text().split("\n\n"))
    return [b.removesuffix("<|endoftext|>") for b in blocks if b.strip()]


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets cover every character (leading spaces included),
    # which phitune.chat relies on to map chat-template spans to tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=BASE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    tok.add_special_tokens(PHI3_ADDED_TOKENS)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",  # as the real Phi-3: pad = <|endoftext|>
        chat_template=PHI3_CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_phi3(target_dir) -> Path:
    """Build the tiny Phi-3 (model + tokenizer) into target_dir and return it."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PHI3_ADDED_TOKENS + BASE_SPECIAL_TOKENS}
    eos_ids = [ids["<|end|>"], ids["<|endoftext|>"]]
    # Like the real model (32011 tokens, 32064 embeddings), round the embedding
    # table up to a multiple of 64 rows: len(tokenizer) < vocab_size is normal.
    vocab_size = -(-len(tokenizer) // 64) * 64

    config = Phi3Config(
        vocab_size=vocab_size,
        original_max_position_embeddings=MODEL_SHAPE["max_position_embeddings"],
        bos_token_id=ids["<s>"],
        eos_token_id=eos_ids,
        # Phi3Config's default pad id (32000) is out of range for this vocabulary.
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        sliding_window=None,
        use_cache=True,
        **MODEL_SHAPE,
    )
    # A fixed seed without touching the caller's RNG stream; one thread and
    # deterministic kernels so that the weights do not depend on the machine's cores.
    with _BUILD_LOCK, _deterministic_single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Phi3ForCausalLM(config).to(torch.float32)
        _pretrain(model, _pretraining_stream(tokenizer, ids["<|endoftext|>"]))
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=eos_ids, pad_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(target)
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where
    # the real Phi-3 has it.
    tokenizer.save_pretrained(target, save_jinja_files=False)
    return target


@contextlib.contextmanager
def _deterministic_single_thread():
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _pretraining_stream(tokenizer, eot_id: int):
    """The corpus as one token stream, <|endoftext|> after each document."""
    import torch

    ids: list[int] = []
    for doc in _corpus_documents():
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eot_id]
    return torch.tensor(ids, dtype=torch.long)


def _pretrain(model, stream) -> None:
    """Causal-LM pretraining of every weight on random windows of `stream` (seeded)."""
    import torch

    p = PRETRAIN
    gen = torch.Generator().manual_seed(SEED)
    params = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [t for t in params if t.dim() >= 2], "weight_decay": p["weight_decay"]},
         {"params": [t for t in params if t.dim() < 2], "weight_decay": 0.0}],
        lr=p["lr"], betas=p["betas"], eps=1e-8,
    )

    def lr_factor(step: int) -> float:
        if step < p["warmup_steps"]:
            return (step + 1) / p["warmup_steps"]
        progress = (step - p["warmup_steps"]) / max(1, p["steps"] - p["warmup_steps"])
        return p["min_lr_ratio"] + (1 - p["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    offsets = torch.arange(p["seq_len"])
    model.train()
    for _ in range(p["steps"]):
        starts = torch.randint(0, len(stream) - p["seq_len"], (p["batch"],), generator=gen)
        batch = stream[starts[:, None] + offsets]  # (batch, seq_len)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, p["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))


def ensure_tiny_phi3() -> Path:
    """Return the cached tiny Phi-3 folder, building it on first use.

    Safe under concurrency (pytest workers, DDP ranks, joblib trials): each process
    builds into its own temporary folder next to the cache and publishes it with
    one os.replace, so a reader sees either no folder or a complete one.
    """
    target = tiny_phi3_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=target.parent))
    try:
        build_tiny_phi3(tmp)
        if target.exists() and not _is_complete(target):
            # A leftover from something other than this function (it never
            # publishes partial folders): move it aside, then publish ours.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process published first (non-empty target): use theirs.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
