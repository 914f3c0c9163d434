"""GPU training throughput on the real Phi-3-mini architecture: phitune (packed) vs TRL's SFTTrainer (padded).

    python bench/gpu_phi3_mini.py                  # all 4 peers, 30 steps each (a few minutes on one H100)
    python bench/gpu_phi3_mini.py --peers phitune,trl --steps 20
    python bench/gpu_phi3_mini.py --attn sdpa      # force SDPA (default: flash_attention_2 if flash-attn imports)
    python bench/gpu_phi3_mini.py --dry-run        # no GPU needed: config, parameter count, the data plan
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
- phitune: phitune.train.loop.fit with device_batch = examples-per-row and
  grad_accum = rows-per-step; the example order is arranged so that the seeded
  shuffle of phitune.data.pack.plan_batches puts each row's examples in one pack,
  so every forward pass is one padding-free 2,048-token row (position_ids restart
  per example, no attention_mask);
- phitune-varlen: the same, with the attention replaced by the per-example SDPA
  prototype of bench/train_throughput.py (what bench/README.md recommends for
  phitune when flash-attn is not installed);
- trl: trl.SFTTrainer with its defaults (padded batches, no packing, no
  padding_free, gradient_checkpointing=True, bf16=True, adamw_torch_fused) on the
  same pre-tokenized examples (input_ids + labels), per_device_train_batch_size =
  examples-per-row, gradient_accumulation_steps = rows-per-step;
- trl-nogc: the same with gradient_checkpointing=False (phitune does not checkpoint),
  so that the difference is padding vs packing only.

Reported per peer: non-padding tokens/s over steps warmup+1..N (clock read after
torch.cuda.synchronize() at each optimizer step's end), padded tokens/s (what the
GPU actually computed), MFU = 6 * N_params_total * non-padding tokens/s / peak
(N_params_total = every parameter of the LoRA-wrapped model, frozen + adapters,
embeddings included; attention's sequence-length term is not counted; with a
frozen base the backward skips the weight gradients, so the FLOPs executed are
nearer 4N than 6N per token: 6N is the customary model-FLOPs convention, used
here so the figure compares with published MFUs), and peak
torch.cuda.max_memory_allocated(). --peak-tflops defaults to 989 (H100/H200 SXM
dense bf16).
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
ALL_PEERS = ("phitune", "phitune-varlen", "trl", "trl-nogc")
DEFAULT_PEERS = ALL_PEERS

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


def _attn(args) -> str:
    if args.attn != "auto":
        return args.attn
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


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


def run_phitune(args, examples, clock, varlen: bool = False) -> dict:
    import torch
    import transformers
    from omegaconf import OmegaConf

    from phitune.config import OptimizerConfig
    from phitune.modeling.loader import apply_training_method
    from phitune.optim import build_optimizer, build_scheduler
    from phitune.train.distributed import Dist
    from phitune.train.callbacks import Callback
    from phitune.train.loop import LoopSpec, fit
    from phitune.train.schedule import BatchPlan

    attn = None
    if varlen:  # the per-example SDPA prototype of bench/train_throughput.py (see bench/README.md)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_throughput import register_varlen_attention

        attn = register_varlen_attention()
    transformers.set_seed(SEED)
    model = apply_training_method(build_base_model(args, attn=attn), lora_cfg(args), {})
    model.get_base_model().register_forward_pre_hook(clock.hook, with_kwargs=True)
    opt_cfg = OmegaConf.structured(OptimizerConfig(name="adamw", scheduler="constant", warmup_ratio=0.0))
    plan = BatchPlan(effective_batch=args.examples_per_row * args.rows_per_step, device_batch=args.examples_per_row,
                     grad_accum=args.rows_per_step, world_size=1)
    optimizer = build_optimizer(opt_cfg, model.parameters(), args.lr)
    scheduler = build_scheduler(opt_cfg, optimizer, args.steps)
    spec = LoopSpec(epochs=1, plan=plan, seed=SEED, eval_steps=0, max_steps=args.steps, max_grad_norm=1.0,
                    full_eval_each_epoch=False, output_dir=None, progress=False)

    class Tick(Callback):
        def on_step(self, step, metrics):
            clock.step_end()

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not args.smoke:
        torch.cuda.reset_peak_memory_stats()
    state = fit(model, optimizer, scheduler, examples, [], spec, Dist(device=torch.device(_device(args))), [Tick()])
    return {"n_params": n_params, "n_trainable": n_train, "final_loss": state.history[-1]["train_loss"]}


def run_trl(args, examples, clock, gradient_checkpointing: bool) -> dict:
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
        cfg = SFTConfig(output_dir=out, per_device_train_batch_size=args.examples_per_row,
                        gradient_accumulation_steps=args.rows_per_step, max_steps=args.steps, learning_rate=args.lr,
                        lr_scheduler_type="constant", warmup_steps=0, seed=SEED, report_to="none",
                        save_strategy="no", eval_strategy="no", disable_tqdm=True,
                        gradient_checkpointing=gradient_checkpointing,
                        **({"use_cpu": True, "bf16": False} if args.smoke else {}))
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[Tick()])
        base = trainer.model.get_base_model()
        base.register_forward_pre_hook(clock.hook, with_kwargs=True)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if not args.smoke:
            torch.cuda.reset_peak_memory_stats()
        out_ = trainer.train()
    return {"n_params": n_params, "n_trainable": n_train, "final_loss": float(out_.training_loss)}


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
    if args.peer in ("phitune", "phitune-varlen"):
        extra = run_phitune(args, examples, clock, varlen=args.peer == "phitune-varlen")
    else:
        extra = run_trl(args, examples, clock, gradient_checkpointing=args.peer == "trl")
    cuda = not args.smoke
    res = dict(peer=args.peer, attn="varlen sdpa" if args.peer == "phitune-varlen" else _attn(args), wall_s=time.perf_counter() - t0,
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
               peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
               device=torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", **clock.summary(args.warmup), **extra)
    res["mfu"] = 6 * res["n_params"] * res["tokens_per_s"] / (args.peak_tflops * 1e12)
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
    print(f"MFU formula: 6 x {total:,} x tokens/s / {args.peak_tflops:g}e12 "
          f"(1,000 tokens/s = {6 * total * 1000 / (args.peak_tflops * 1e12):.2%} MFU)")


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
          f"{args.rows_per_step} rows x {args.seq_len} tokens; attention {_attn(args)}; "
          + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    results = []
    for p in peers:
        r = _run_peer(args, p)
        results.append(r)
        if "error" in r:
            print(f"  {p}: FAILED ({r['error']})", flush=True)
            continue
        print(f"  {p:9s} {r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:.1%}  peak {r['peak_mem_gib']:.1f} GiB  "
              f"padding {r['padding_fraction']:.0%}  loss {r['final_loss']:.3f}", flush=True)
    ok = [r for r in results if "error" not in r]
    ref = next((r["tokens_per_s"] for r in ok if r["peer"] == "phitune"), None)
    print()
    print("| peer | tokens/s (non-padding) | positions computed/s | padding | MFU (6N) | vs phitune | "
          "peak GPU mem GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in ok:
        vs = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        print(f"| {r['peer']} | {r['tokens_per_s']:.0f} | {r['computed_tokens_per_s']:.0f} | "
              f"{r['padding_fraction']:.0%} | {r['mfu']:.1%} | {vs} | {r['peak_mem_gib']:.1f} |")
    if ref:
        for r in ok:
            if r["peer"] != "phitune":
                print(f"phitune / {r['peer']}: {ref / r['tokens_per_s']:.2f}x")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "versions": vers}, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"of {', '.join(ALL_PEERS)} (default: all)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per peer (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (default: %(default)s)")
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
                    help="attention implementation for both peers (auto: flash_attention_2 if flash-attn imports)")
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
