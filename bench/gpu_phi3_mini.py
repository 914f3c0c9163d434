"""GPU training throughput on the real Phi-3-mini architecture: phitune's shipped path vs TRL's best GPU setting.

    python bench/gpu_phi3_mini.py                  # 4 peers, 20 steps each (under 6 minutes on one H100/H200)
    python bench/gpu_phi3_mini.py --peers phitune,trl --steps 20
    python bench/gpu_phi3_mini.py --attn sdpa      # TRL on SDPA, phitune on packed_sdpa (default: flash-attn if it imports)
    python bench/gpu_phi3_mini.py --dry-run        # no GPU needed: each peer's settings, parameter and FLOP counts, data plan
    python bench/gpu_phi3_mini.py --smoke          # no GPU needed: every peer end to end on a 2-layer, 256-wide
                                                   # Phi-3 on CPU, 3 steps of 512 tokens (figures meaningless)

Needs a CUDA GPU with bf16 (exits with a message otherwise, except --dry-run and
--smoke); meant for one 80 GB H100/H200 (peak memory per peer is one of the outputs). Nothing is downloaded: the model is
microsoft/Phi-3-mini-4k-instruct's architecture (PHI3_MINI_4K below, copied from
its config.json) with random weights, built directly on the GPU in bfloat16.

Same examples for every peer: --steps x --rows-per-step rows of --seq-len (2,048)
tokens, each row exactly --examples-per-row (4) examples of --min-len..--max-len
(128..1,024) tokens, random token ids, labels on the last 60 % of each example
(the "assistant" part). One optimizer step = --rows-per-step rows =
rows x examples-per-row examples (default 4 x 4 = 16 examples, 8,192 tokens), lr
3e-4 (phitune's phi3-mini-4k base), constant; LoRA r=8, alpha=16, dropout 0.05 on
qkv_proj, o_proj, gate_up_proj, down_proj.

Peers (each in its own subprocess, so peak GPU memory is per peer):
- phitune: what `python train.py model=phi3-mini-4k` runs on CUDA: phitune.train.loop.fit
  with its shipped settings: base weights bf16 (model.torch_dtype auto), LoRA adapters and
  their AdamW state float32 (peft), bf16 autocast (train.mixed_precision auto), the chunked
  cross-entropy (train.loss_chunk_tokens, its default), attention flash_attention_2 (varlen,
  fed cu_seq_lens from pack()) when flash-attn is installed, else packed_sdpa; device_batch =
  examples-per-row and grad_accum = rows-per-step; the example order is arranged so that the
  seeded shuffle of phitune.data.pack.plan_batches puts each row's examples in one pack, so
  every forward pass is one padding-free 2,048-token row;
- phitune-gc: the same with train.gradient_checkpointing=true (phitune.train.memory);
- trl: trl.SFTTrainer at its best GPU setting: padding_free=True (the examples of a batch in
  one row, position_ids restarting), flash_attention_2 when flash-attn is installed, bf16,
  gradient_checkpointing=True as TRL ships it; the same pre-tokenized examples (input_ids +
  labels), per_device_train_batch_size = examples-per-row, gradient_accumulation_steps =
  rows-per-step;
- trl-nogc: the same with gradient_checkpointing=False;
- trl-padded (not in the default set): TRL's defaults, padded batches, checkpointing on.

Reported per peer: non-padding tokens/s over steps warmup+1..N (clock read after
torch.cuda.synchronize() at each optimizer step's end), positions computed per second
(padding included), peak torch.cuda.max_memory_allocated(), and two MFUs against
--peak-tflops (989, H100/H200 SXM dense bf16):
- MFU (LoRA): the FLOPs this training needs per token, counted from the model: forward
  2 x each frozen linear weight (the lm_head included, the embedding lookup is free) and
  2 x each adapter weight; backward 2 x each frozen weight (the input gradient only: frozen
  weights need no weight gradient) and 4 x each adapter weight; attention 12 x layers x
  hidden x the mean causal context (forward 4, backward 8 per key, over each example's own
  tokens). About 4N per token instead of 6N. Checkpointing's recomputed forward is not counted
  (model FLOPs, not hardware FLOPs), so phitune-gc and trl show their cost as a lower MFU;
- MFU (6N): the usual 6 x all parameters x tokens/s, for comparison with published figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
ALL_PEERS = ("phitune", "phitune-gc", "trl", "trl-nogc", "trl-padded")
DEFAULT_PEERS = ("phitune", "phitune-gc", "trl", "trl-nogc")

# microsoft/Phi-3-mini-4k-instruct config.json (transformers Phi3Config), 3,821,079,552 parameters.
PHI3_MINI_4K = dict(
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    sliding_window=2047,
    attention_dropout=0.0,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
    attention_bias=False,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=32000,
    pad_token_id=32000,
    use_cache=False,  # training (phitune's load_model sets it off too)
)
REAL_VOCAB = 32011  # token ids actually in Phi-3's tokenizer; random ids are drawn below this
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SEED = 42
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM; the H200 has the same tensor cores


# --------------------------------------------------------------------------- data


def make_rows(n_rows: int, seq_len: int, per_row: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """Example lengths, per_row of them per row, each in [min_len, max_len], each row summing to seq_len."""
    import numpy as np

    if not per_row * min_len <= seq_len <= per_row * max_len:
        raise SystemExit(f"{per_row} examples of {min_len}..{max_len} tokens cannot fill {seq_len} tokens")
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < n_rows:
        head = rng.integers(min_len, max_len + 1, size=per_row - 1).tolist()
        last = seq_len - sum(head)
        if min_len <= last <= max_len:  # rejection sampling keeps every length uniform-ish in range
            rows.append(head + [last])
    return rows


def make_examples(args):
    """phitune Encoded examples, ordered so that plan_batches(seed, epoch 0) packs each row's examples together."""
    import numpy as np

    from phitune.chat import IGNORE_INDEX, Encoded
    from phitune.data.pack import plan_batches

    n_rows = args.steps * args.rows_per_step
    rows = make_rows(n_rows, args.seq_len, args.examples_per_row, args.min_len, args.max_len, SEED)
    rng = np.random.default_rng(SEED + 1)
    flat = []
    for lengths in rows:
        for n in lengths:
            ids = rng.integers(0, REAL_VOCAB, size=n).tolist()
            prompt = int(n * 0.4)
            flat.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    groups = plan_batches([len(e) for e in flat], args.examples_per_row, SEED, 0)
    placed = [None] * len(flat)
    for g, row in enumerate(groups):
        for j, idx in enumerate(row):
            placed[idx] = flat[g * args.examples_per_row + j]
    return placed


# --------------------------------------------------------------------------- child side


class StepClock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.tokens = 0  # non-padding tokens through the base model's forward
        self.computed = 0  # every position the GPU computed, padding included
        self.marks: list[tuple[float, int, int]] = []

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.computed += int(ids.numel())
        self.tokens += int(mask.sum()) if mask is not None else int(ids.numel())

    def step_end(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), self.tokens, self.computed))

    def summary(self, warmup: int) -> dict:
        if len(self.marks) <= warmup:
            raise SystemExit(f"only {len(self.marks)} steps ran; need more than --warmup {warmup}")
        t0, k0, c0 = self.marks[warmup - 1] if warmup else self.marks[0]
        t1, k1, c1 = self.marks[-1]
        return {"steps": len(self.marks), "timed_steps": len(self.marks) - max(warmup, 1), "timed_s": t1 - t0,
                "timed_tokens": k1 - k0, "tokens_per_s": (k1 - k0) / (t1 - t0),
                "computed_tokens_per_s": (c1 - c0) / (t1 - t0), "padding_fraction": 1 - (k1 - k0) / max(1, c1 - c0)}


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _attn(args) -> str:
    """TRL's attention: flash_attention_2 (its padding-free setting needs it) when flash-attn is installed."""
    if args.attn != "auto":
        return args.attn
    return "flash_attention_2" if _has_flash() else "sdpa"


def phitune_attn_setting(args) -> str:
    """phitune's model.attn_implementation for this run: flash-attn varlen when installed, else packed_sdpa."""
    if args.attn in ("sdpa", "eager"):
        return "packed_sdpa" if args.attn == "sdpa" else "eager"
    return "flash_attention_2" if args.attn == "flash_attention_2" or _has_flash() else "packed_sdpa"


SMOKE_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)


def _device(args) -> str:
    return "cpu" if args.smoke else "cuda"


def build_base_model(args, device: str | None = None, attn: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    device = device or _device(args)
    shape = dict(num_hidden_layers=args.layers)
    if args.smoke:
        shape = SMOKE_SHAPE
    config = Phi3Config(**dict(PHI3_MINI_4K, **shape))
    import transformers
    from packaging.version import Version

    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{dtype_key: torch.float32 if args.smoke else torch.bfloat16},
                                                 attn_implementation=attn or (_attn(args) if device != "meta" else "sdpa"))
    model.config.use_cache = False
    return model


def lora_cfg(args) -> dict:
    return {"method": "lora", "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                                       "target_modules": list(LORA_TARGETS)}}


def phitune_settings(args) -> dict:
    """The shipped train settings (phitune.config.TrainConfig defaults) that this peer runs with."""
    from phitune.config import TrainConfig

    shipped = TrainConfig()
    return {"attn_implementation": phitune_attn_setting(args), "mixed_precision": shipped.mixed_precision,
            "loss_chunk_tokens": shipped.loss_chunk_tokens, "max_device_tokens": shipped.max_device_tokens}


def build_phitune_model(args, checkpointing: bool, device: str | None = None):
    """The base model with phitune's attention, LoRA applied by phitune, checkpointing as train.py sets it."""
    from phitune.modeling.attention import resolve
    from phitune.modeling.loader import apply_training_method
    from phitune.train import memory

    device = device or _device(args)
    attn = resolve(phitune_attn_setting(args), device)
    model = apply_training_method(build_base_model(args, device=device, attn=attn), lora_cfg(args), {})
    if checkpointing:
        memory.enable_gradient_checkpointing(model)
    return model, attn


def run_phitune(args, examples, clock, checkpointing: bool = False) -> dict:
    import torch
    import transformers
    from omegaconf import OmegaConf

    from phitune.config import OptimizerConfig
    from phitune.optim import build_optimizer, build_scheduler
    from phitune.train.distributed import Dist
    from phitune.train.callbacks import Callback
    from phitune.train.loop import LoopSpec, fit
    from phitune.train.schedule import BatchPlan

    transformers.set_seed(SEED)
    model, attn = build_phitune_model(args, checkpointing)
    model.get_base_model().register_forward_pre_hook(clock.hook, with_kwargs=True)
    opt_cfg = OmegaConf.structured(OptimizerConfig(name="adamw", scheduler="constant", warmup_ratio=0.0))
    plan = BatchPlan(effective_batch=args.examples_per_row * args.rows_per_step, device_batch=args.examples_per_row,
                     grad_accum=args.rows_per_step, world_size=1)
    optimizer = build_optimizer(opt_cfg, model.parameters(), args.lr)
    scheduler = build_scheduler(opt_cfg, optimizer, args.steps)
    settings = phitune_settings(args)
    spec = LoopSpec(epochs=1, plan=plan, seed=SEED, eval_steps=0, max_steps=args.steps, max_grad_norm=1.0,
                    full_eval_each_epoch=False, output_dir=None, progress=False,
                    mixed_precision=settings["mixed_precision"], loss_chunk_tokens=settings["loss_chunk_tokens"],
                    max_device_tokens=settings["max_device_tokens"])
    adapter_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})

    class Tick(Callback):
        def on_step(self, step, metrics):
            clock.step_end()

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not args.smoke:
        torch.cuda.reset_peak_memory_stats()
    state = fit(model, optimizer, scheduler, examples, [], spec, Dist(device=torch.device(_device(args))), [Tick()])
    return {"n_params": n_params, "n_trainable": n_train, "final_loss": state.history[-1]["train_loss"],
            "attn": attn, "adapter_dtypes": adapter_dtypes, "gradient_checkpointing": checkpointing,
            **{k: v for k, v in settings.items() if k != "attn_implementation"}}


def lora_flops_per_token(args, examples) -> float:
    """Training FLOPs per token of LoRA on this model, counted on a meta-device copy (no memory).

    Frozen linear weights W (lm_head included): 2|W| forward + 2|W| for the input gradient, and
    no weight gradient; adapters A: 6|A|; attention: 12 x layers x hidden x mean causal context
    (each example attends to its own earlier tokens only)."""
    from phitune.modeling.loader import apply_training_method

    model = apply_training_method(build_base_model(args, device="meta", attn="sdpa"), lora_cfg(args), {})
    frozen = sum(p.numel() for n, p in model.named_parameters()
                 if not p.requires_grad and p.dim() == 2 and "embed_tokens" not in n)
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.get_base_model().config
    lengths = [len(e) for e in examples]
    mean_ctx = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return 4 * frozen + 6 * adapter + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_ctx


def trl_settings(args, gradient_checkpointing: bool, padding_free: bool, out: str) -> dict:
    """SFTConfig's arguments for a TRL peer (padding_free: TRL's best GPU setting)."""
    return dict(output_dir=out, per_device_train_batch_size=args.examples_per_row,
                gradient_accumulation_steps=args.rows_per_step, max_steps=args.steps, learning_rate=args.lr,
                lr_scheduler_type="constant", warmup_steps=0, seed=SEED, report_to="none",
                save_strategy="no", eval_strategy="no", disable_tqdm=True, padding_free=padding_free,
                # padding-free rows are not truncated by TRL; the examples are at most --max-len tokens already
                max_length=None if padding_free else args.max_len,
                gradient_checkpointing=gradient_checkpointing,
                **({"use_cpu": True, "bf16": False} if args.smoke else {"bf16": True}))


def run_trl(args, examples, clock, gradient_checkpointing: bool, padding_free: bool = True) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    # pre-tokenized: TRL skips tokenization and keeps the labels column as is
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    transformers.set_seed(SEED)
    model = build_base_model(args)
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=list(LORA_TARGETS), bias="none", task_type=TaskType.CAUSAL_LM)
    tokenizer = _stub_tokenizer(PreTrainedTokenizerFast)

    class Tick(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock.step_end()

    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(**trl_settings(args, gradient_checkpointing, padding_free, out))
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[Tick()])
        base = trainer.model.get_base_model()
        base.register_forward_pre_hook(clock.hook, with_kwargs=True)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if not args.smoke:
            torch.cuda.reset_peak_memory_stats()
        out_ = trainer.train()
    return {"n_params": n_params, "n_trainable": n_train, "final_loss": float(out_.training_loss), "attn": _attn(args),
            "padding_free": padding_free, "gradient_checkpointing": gradient_checkpointing}


def _stub_tokenizer(cls):
    """A tokenizer object for TRL's pad/eos bookkeeping: the data is already token ids (pad = eos = 32000)."""
    from tokenizers import Tokenizer, models

    vocab = {f"<t{i}>": i for i in range(REAL_VOCAB)}
    vocab["<|endoftext|>"] = 32000
    tok = cls(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<t0>")), eos_token="<|endoftext|>",
              pad_token="<|endoftext|>", unk_token="<t0>")
    return tok


def child(args) -> None:
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA device")
    examples = make_examples(args)
    clock = StepClock(cuda=not args.smoke)
    t0 = time.perf_counter()
    if args.peer in ("phitune", "phitune-gc"):
        extra = run_phitune(args, examples, clock, checkpointing=args.peer == "phitune-gc")
    else:
        extra = run_trl(args, examples, clock, gradient_checkpointing=args.peer in ("trl", "trl-padded"),
                        padding_free=args.peer != "trl-padded")
    cuda = not args.smoke
    res = dict(peer=args.peer, wall_s=time.perf_counter() - t0,
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
               peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
               device=torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", **clock.summary(args.warmup), **extra)
    res["mfu_6n"] = 6 * res["n_params"] * res["tokens_per_s"] / (args.peak_tflops * 1e12)
    res["lora_flops_per_token"] = lora_flops_per_token(args, examples)
    res["mfu"] = res["lora_flops_per_token"] * res["tokens_per_s"] / (args.peak_tflops * 1e12)
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- parent side


def dry_run(args) -> None:
    """What can be checked without a GPU: the config, the parameter count, the data plan."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # library deprecation notes, irrelevant here

    from phitune.modeling.loader import apply_training_method

    model = build_base_model(args, device="meta")
    base = sum(p.numel() for p in model.parameters())
    model = apply_training_method(model, lora_cfg(args), {})
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = make_rows(args.steps * args.rows_per_step, args.seq_len, args.examples_per_row, args.min_len, args.max_len,
                     SEED)
    lengths = [n for r in rows for n in r]
    # what a padded batch of the same examples (examples-per-row per batch, shuffled) would compute
    rng = __import__("random").Random(SEED)
    shuffled = lengths[:]
    rng.shuffle(shuffled)
    b = args.examples_per_row
    padded = sum(max(shuffled[i:i + b]) * len(shuffled[i:i + b]) for i in range(0, len(shuffled), b))
    print(f"Phi-3-mini-4k architecture, {args.layers} layers: {base:,} base parameters "
          f"(+{train:,} LoRA r={args.lora_rank} = {total:,}); torch {torch.__version__}")
    print(f"{args.steps} steps x {args.rows_per_step} rows x {args.seq_len} tokens = "
          f"{args.steps * args.rows_per_step * args.seq_len:,} tokens; {len(lengths)} examples of "
          f"{min(lengths)}..{max(lengths)} tokens (mean {statistics.mean(lengths):.0f})")
    print(f"padded batches of {b} (random grouping) would compute {padded:,} positions: "
          f"{1 - sum(lengths) / padded:.0%} padding")
    flops = lora_flops_per_token(args, make_examples(args))
    print(f"MFU (LoRA): {flops / 1e9:.2f} GFLOP per token x tokens/s / {args.peak_tflops:g}e12 "
          f"(1,000 tokens/s = {flops * 1000 / (args.peak_tflops * 1e12):.2%}); "
          f"MFU (6N): 6 x {total:,} = {6 * total / 1e9:.2f} GFLOP per token "
          f"(1,000 tokens/s = {6 * total * 1000 / (args.peak_tflops * 1e12):.2%})")
    print(f"phitune, phitune-gc: {phitune_settings(args)}, base weights bf16, LoRA float32 "
          f"(attention here: {phitune_attn_setting(args)}; flash-attn installed: {_has_flash()})")
    from trl import SFTConfig

    for peer, gc, free in (("trl", True, True), ("trl-nogc", False, True), ("trl-padded", True, False)):
        kwargs = trl_settings(args, gc, free, "/tmp/unused")
        try:  # SFTConfig checks bf16 against the machine: on a CPU-only one it refuses bf16=True
            SFTConfig(**kwargs)
            note = "SFTConfig accepts it"
        except (ValueError, ImportError) as exc:
            note = f"SFTConfig here: {str(exc).splitlines()[0][:90]}"
        shown = {k: kwargs[k] for k in ("padding_free", "gradient_checkpointing", "bf16")}
        print(f"{peer}: {shown}, attention {_attn(args)}; {note}")


def _run_peer(args, peer: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", peer]
    for k in ("steps", "warmup", "rows_per_step", "examples_per_row", "seq_len", "min_len", "max_len", "layers",
              "lr", "lora_rank", "lora_alpha", "lora_dropout", "peak_tflops", "attn"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        return {"peer": peer, "error": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len(RESULT_TAG):])


def parent(args) -> None:
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench/gpu_phi3_mini.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "nothing was measured. `--dry-run` or `--smoke` check the script without one.")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in ALL_PEERS:
            raise SystemExit(f"--peers: unknown peer {p!r} (known: {', '.join(ALL_PEERS)})")
    import importlib.metadata as md

    vers = {k: md.version(k) for k in ("torch", "transformers", "trl", "peft")}
    device = "CPU smoke run (2 layers x 256 wide; figures meaningless)" if args.smoke else torch.cuda.get_device_name(0)
    print(f"# {device}; {args.layers} layers; {args.steps} steps ({args.warmup} untimed) x "
          f"{args.rows_per_step} rows x {args.seq_len} tokens; attention: TRL {_attn(args)}, "
          f"phitune {phitune_attn_setting(args)}; "
          + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    results, started = [], time.perf_counter()
    for p in peers:
        r = _run_peer(args, p)
        results.append(r)
        if "error" in r:
            print(f"  {p}: FAILED ({r['error']})", flush=True)
            continue
        print(f"  {p:10s} {r['tokens_per_s']:9.0f} tok/s  MFU (LoRA) {r['mfu']:.1%}  (6N) {r['mfu_6n']:.1%}  "
              f"peak {r['peak_mem_gib']:.1f} GiB  padding {r['padding_fraction']:.0%}  attn {r['attn']}  "
              f"loss {r['final_loss']:.3f}  ({time.perf_counter() - started:.0f} s so far)", flush=True)
    ok = [r for r in results if "error" not in r]
    ref = next((r["tokens_per_s"] for r in ok if r["peer"] == "phitune"), None)
    print()
    print("| peer | attention | checkpointing | tokens/s (non-padding) | positions computed/s | padding | "
          "MFU (LoRA) | MFU (6N) | vs phitune | peak GPU mem GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in ok:
        vs = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        print(f"| {r['peer']} | {r['attn']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
              f"{r['tokens_per_s']:.0f} | {r['computed_tokens_per_s']:.0f} | {r['padding_fraction']:.0%} | "
              f"{r['mfu']:.1%} | {r['mfu_6n']:.1%} | {vs} | {r['peak_mem_gib']:.1f} |")
    if ref:
        for r in ok:
            if r["peer"] != "phitune":
                print(f"phitune / {r['peer']}: {ref / r['tokens_per_s']:.2f}x")
    print(f"total {time.perf_counter() - started:.0f} s; date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "versions": vers}, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"of {', '.join(ALL_PEERS)} (default: all)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per peer (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing (default: %(default)s)")
    ap.add_argument("--rows-per-step", type=int, default=4,
                    help="packed rows per optimizer step = gradient accumulation (default: %(default)s)")
    ap.add_argument("--examples-per-row", type=int, default=4,
                    help="examples per packed row = TRL's per-device batch (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row (default: %(default)s)")
    ap.add_argument("--min-len", type=int, default=128, help="shortest example, tokens (default: %(default)s)")
    ap.add_argument("--max-len", type=int, default=1024, help="longest example, tokens (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=PHI3_MINI_4K["num_hidden_layers"],
                    help="decoder layers (32 = Phi-3-mini; fewer for a quick smoke run)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--attn", default="auto", choices=("auto", "sdpa", "flash_attention_2", "eager"),
                    help="auto: flash_attention_2 for both if flash-attn imports, else phitune packed_sdpa and TRL sdpa; "
                         "sdpa: phitune packed_sdpa, TRL sdpa")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="the GPU's dense bf16 peak, TFLOP/s (default: %(default)s, H100/H200 SXM)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: print the config, parameter count and data plan")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: a 2-layer, 256-wide Phi-3 on CPU, float32, 3 steps of one 512-token row; checks the script only")
    ap.add_argument("--peer", choices=ALL_PEERS, help="internal: run one peer in this process")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.rows_per_step, args.layers = 3, 1, 1, SMOKE_SHAPE["num_hidden_layers"]
        args.seq_len, args.min_len, args.max_len = 512, 64, 256
    sys.path.insert(0, str(ROOT / "src"))
    if args.dry_run:
        dry_run(args)
    elif args.peer:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
