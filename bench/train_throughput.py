"""Training throughput: phitune vs TRL's SFTTrainer vs a plain HF Trainer (CPU, tiny Phi-3).

    python bench/train_throughput.py                       # 4 peers x 3 repeats, ~9 min on a shared 2-core box
    python bench/train_throughput.py --repeats 2 --examples 240 --threads 2
    python bench/train_throughput.py --peers phitune,trl-gc --repeats 1
    python bench/train_throughput.py --peer phitune --profile   # one peer in this process, torch.profiler table

What is measured: non-padding tokens per second of one LoRA training epoch, the
same for every peer:

- model: phitune's builtin tiny Phi-3 (phitune.modeling.tiny.ensure_tiny_phi3),
  float32, sdpa attention, use_cache off;
- data: the first --examples conversations of data/support_train.jsonl;
- LoRA r=8, alpha=16, dropout=0.05 on qkv_proj, o_proj, gate_up_proj, down_proj;
- AdamW (torch, betas 0.9/0.999, eps 1e-8, weight decay 0), constant learning
  rate --lr, no warm-up, grad-norm clip 1.0, 8 examples per optimizer step, no
  accumulation, 1 epoch, seed 42, --threads torch threads (default 1: on a shared
  2-core machine two OpenMP threads per process stall on each other's time slices);
- no evaluation, no checkpoints, report_to none.

Peers:
- phitune: phitune.chat.encode_example -> phitune.train.loop.fit
  (padding-free packing: the 8 examples of a step in one row, position_ids restarting);
- trainer: transformers.Trainer, the same encodings padded to the longest of the
  batch (phitune.data.pack.pad: labels -100 on padding), the model computes the loss;
- trl: trl.SFTTrainer on the conversational dataset ({"messages": [...]}, without
  phitune's per-message "weight" key, which TRL does not know) with
  assistant_only_loss=True and its defaults otherwise (no packing, no padding_free:
  padded batches), except gradient_checkpointing=False and bf16=False so that it
  does the same computation as the other two in float32. The tiny model's chat
  template is Phi-3's verbatim, which TRL 1.x recognises: SFTTrainer swaps in its
  own trl/chat_templates/phi3_training.jinja ({% generation %} around each assistant
  message + <|end|>\n, same token ids) by itself, so the tokenizer is passed as is;
- trl-gc (optional): the same with TRL's default gradient_checkpointing=True;
- phitune uses its configured attention, packed_sdpa (phitune.modeling.attention);
  phitune-densemask uses transformers' sdpa with the dense [T, T] block mask (phitune before
  packed_sdpa landed).
- phitune-varlen: phitune exactly, except that the model's attention is
  the prototype that became phitune.modeling.attention (causal SDPA per example of the packed row instead
  of one SDPA over the whole row with a [T, T] block-diagonal mask): a prototype of
  the change recommended in bench/README.md, measured alongside.

Tokens are counted the same way for all peers, by a forward pre-hook on the base
Phi3ForCausalLM: attention_mask.sum() when there is a mask (padded batches), else
input_ids.numel() (phitune's packed rows have no padding). Timing: a clock read at
the end of every optimizer step; the first --warmup steps are excluded, so
tokens/s = tokens of steps warmup+1..N / time from the end of step `warmup` to the
end of step N. tokens per CPU-second divides the same tokens by the process's CPU
time over those steps (time.process_time()), a figure that other processes on a
shared machine disturb less. Each peer runs in its own subprocess (peak RSS = that
process's ru_maxrss), peers alternate order between repeats, and the table shows
the median over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "support_train.jsonl"
DEFAULT_PEERS = ("phitune", "trainer", "trl", "phitune-densemask")
ALL_PEERS = ("phitune", "trainer", "trl", "trl-gc", "phitune-densemask", "phitune-varlen")
TARGET_VS_TRL = 1.3  # goal: phitune at least 1.3x TRL's tokens/s

LORA = dict(rank=8, alpha=16, dropout=0.05, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
MODEL_CFG = {"name": "tiny-phi3", "builtin": "tiny-phi3", "torch_dtype": "float32", "attn_implementation": "sdpa"}
MAX_LEN = 512  # tokens: tiny-phi3's context_length, also TRL's max_length; the sample examples are shorter
SEED = 42
RESULT_TAG = "BENCH_RESULT "


# --------------------------------------------------------------------------- child side


class StepClock:
    """Counts non-padding tokens of forward passes; records (time, tokens) at each optimizer step's end."""

    def __init__(self):
        self.tokens = 0
        self.marks: list[tuple[float, float, int]] = []  # (wall clock, process CPU time, tokens so far)
        self.profiler = None
        self._start = (time.perf_counter(), time.process_time())  # reset by each peer just before its loop

    def hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            self.tokens += int(mask.sum())
        elif ids is not None:
            self.tokens += int(ids.numel())
        return None

    def attach(self, base_model) -> None:
        base_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def step_end(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), self.tokens))
        if self.profiler is not None:
            self.profiler.step()

    def summary(self, warmup: int) -> dict:
        if len(self.marks) <= warmup:
            raise SystemExit(f"only {len(self.marks)} steps ran; need more than --warmup {warmup}")
        t0, c0, k0 = self.marks[warmup - 1] if warmup else (*self._start, 0)
        t1, c1, k1 = self.marks[-1]
        return {"steps": len(self.marks), "timed_steps": len(self.marks) - warmup, "timed_tokens": k1 - k0,
                "timed_s": t1 - t0, "tokens_per_s": (k1 - k0) / (t1 - t0), "total_tokens": k1,
                "timed_cpu_s": c1 - c0, "tokens_per_cpu_s": (k1 - k0) / max(1e-9, c1 - c0)}


def _load_examples(path: Path, n: int) -> list[list[dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line)["messages"])
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{path}: {len(rows)} examples, --examples asks for {n}")
    return rows


def register_varlen_attention() -> str:
    """The prototype measured first here, now phitune's own packed_sdpa (phitune.modeling.attention)."""
    from phitune.modeling.attention import register

    return register()


def _lora_train_cfg() -> dict:
    return {"method": "lora", "lora": dict(LORA)}


def _base_model(attn: str | None = None):
    import torch

    from phitune.modeling.loader import load_model

    return load_model(dict(MODEL_CFG, attn_implementation=attn or MODEL_CFG["attn_implementation"]), device="cpu",
                      dtype=torch.float32)


def _encodings(tokenizer, conversations):
    from phitune.chat import encode_example

    return [encode_example(tokenizer, msgs, MAX_LEN) for msgs in conversations]


def _make_profiler(args):
    if not args.profile:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    # steps 1..warmup skipped, then 1 warm-up step for the profiler, then 4 recorded steps
    return profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=args.warmup, warmup=1, active=4),
                   record_shapes=False, with_stack=False)


def run_phitune(args, tokenizer, conversations, clock: StepClock, varlen: bool = False,
                densemask: bool = False) -> dict:
    import transformers
    from omegaconf import OmegaConf

    from phitune.config import OptimizerConfig
    from phitune.modeling.loader import apply_training_method
    from phitune.optim import build_optimizer, build_scheduler
    from phitune.train.distributed import Dist
    from phitune.train.callbacks import Callback
    from phitune.train.loop import LoopSpec, fit, steps_per_epoch
    from phitune.train.schedule import plan_batch

    encodings = _encodings(tokenizer, conversations)
    transformers.set_seed(SEED)
    # phitune as configured (conf/model/tiny-phi3.yaml: packed_sdpa); densemask: transformers' sdpa with
    # the dense [T, T] block mask (phitune before packed_sdpa); varlen: the bench's original prototype.
    attn = register_varlen_attention() if varlen else ("sdpa" if densemask else "packed_sdpa")
    model = apply_training_method(_base_model(attn), _lora_train_cfg(), MODEL_CFG)
    clock.attach(model.get_base_model())
    opt_cfg = OmegaConf.structured(OptimizerConfig(name="adamw", scheduler="constant", warmup_ratio=0.0,
                                                   weight_decay=0.0))
    plan = plan_batch(args.batch, 1, args.batch, 1)  # 8 examples per step = 8 per pass x 1 accumulation x 1 device
    optimizer = build_optimizer(opt_cfg, model.parameters(), args.lr)
    scheduler = build_scheduler(opt_cfg, optimizer, steps_per_epoch(len(encodings), plan))
    spec = LoopSpec(epochs=1, plan=plan, seed=SEED, eval_steps=0, max_grad_norm=1.0, full_eval_each_epoch=False,
                    output_dir=None, progress=False)

    class Tick(Callback):
        def on_step(self, step, metrics):
            clock.step_end()

    clock.start()
    state = fit(model, optimizer, scheduler, encodings, [], spec, Dist(), [Tick()])
    losses = [row["train_loss"] for row in state.history]
    return {"mean_train_loss": sum(losses) / len(losses), "loop_tokens": state.train_tokens}


def run_trainer(args, tokenizer, conversations, clock: StepClock) -> dict:
    import transformers
    from transformers import Trainer, TrainingArguments

    from phitune.data.pack import pad
    from phitune.modeling.loader import apply_training_method

    encodings = _encodings(tokenizer, conversations)
    transformers.set_seed(SEED)
    model = apply_training_method(_base_model(), _lora_train_cfg(), MODEL_CFG)
    clock.attach(model.get_base_model())
    pad_id = tokenizer.pad_token_id

    def collate(batch):  # pad to the longest of the batch; labels -100 on padding and each first token
        return pad(batch, pad_id)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            max_grad_norm=1.0, seed=SEED, data_seed=SEED, use_cpu=True, bf16=False, fp16=False,
            report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=encodings, data_collator=collate,
                          callbacks=[_TrainerTick(clock)])
        clock.start()
        out_ = trainer.train()
    return {"mean_train_loss": float(out_.training_loss)}


def _TrainerTick(clock):
    from transformers import TrainerCallback

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    return Tick()


def run_trl(args, tokenizer, conversations, clock: StepClock, gradient_checkpointing: bool) -> dict:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from trl import SFTConfig, SFTTrainer

    # TRL has no notion of phitune's per-message "weight": it trains every assistant turn.
    rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]} for msgs in conversations]
    dataset = Dataset.from_list(rows)
    transformers.set_seed(SEED)
    model = _base_model()
    peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=list(LORA["target_modules"]), bias="none", task_type=TaskType.CAUSAL_LM)
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            max_grad_norm=1.0, seed=SEED, data_seed=SEED, use_cpu=True, bf16=False, fp16=False,
            report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0,
            # SFT-specific: assistant-only loss; packing / padding_free stay at their default False
            assistant_only_loss=True, max_length=MAX_LEN, gradient_checkpointing=gradient_checkpointing,
        )
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[_TrainerTick(clock)])
        base = trainer.model.get_base_model()
        clock.attach(base)
        clock.start()
        out_ = trainer.train()
    return {"mean_train_loss": float(out_.training_loss)}


def child(args) -> None:
    import warnings

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass

    from phitune.modeling.loader import load_tokenizer

    tokenizer = load_tokenizer(MODEL_CFG)
    conversations = _load_examples(Path(args.data), args.examples)
    clock = StepClock()
    clock.profiler = _make_profiler(args)
    if clock.profiler is not None:
        clock.profiler.start()
    t0 = time.perf_counter()
    if args.peer in ("phitune", "phitune-varlen", "phitune-densemask"):
        extra = run_phitune(args, tokenizer, conversations, clock, varlen=args.peer == "phitune-varlen",
                            densemask=args.peer == "phitune-densemask")
    elif args.peer == "trainer":
        extra = run_trainer(args, tokenizer, conversations, clock)
    elif args.peer in ("trl", "trl-gc"):
        extra = run_trl(args, tokenizer, conversations, clock, gradient_checkpointing=args.peer == "trl-gc")
    else:
        raise SystemExit(f"unknown peer {args.peer}")
    run_s = time.perf_counter() - t0
    if clock.profiler is not None:
        clock.profiler.stop()
        print(clock.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    import resource

    result = dict(peer=args.peer, threads=torch.get_num_threads(), setup_and_train_s=run_s,
                  loadavg_1min_at_end=os.getloadavg()[0],
                  self_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **clock.summary(args.warmup), **extra)
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent side


def _run_peer(args, peer: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", peer, "--examples", str(args.examples),
           "--threads", str(args.threads), "--lr", str(args.lr), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--data", str(args.data)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    # Peak RSS comes from the child itself (ru_maxrss of RUSAGE_SELF at its end): the parent's
    # RUSAGE_CHILDREN is a max over all children, not a per-peer figure.
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout[-4000:] + stderr[-8000:])
        raise SystemExit(f"peer {peer} failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res["process_wall_s"] = wall
    return res


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def parent(args) -> None:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in ALL_PEERS:
            raise SystemExit(f"--peers: unknown peer {p!r} (known: {', '.join(ALL_PEERS)})")
    print(f"# {args.examples} examples of {args.data}, batch {args.batch}, lr {args.lr:g}, {args.threads} thread(s), "
          f"first {args.warmup} steps untimed, {args.repeats} repeat(s)", flush=True)
    runs: dict[str, list[dict]] = {p: [] for p in peers}
    for r in range(args.repeats):
        order = peers if r % 2 == 0 else list(reversed(peers))
        for p in order:
            res = _run_peer(args, p)
            runs[p].append(res)
            print(f"  repeat {r + 1} {p:8s} {res['tokens_per_s']:7.0f} tok/s {res['tokens_per_cpu_s']:7.0f} tok/CPU-s  "
                  f"({res['timed_tokens']} tokens in {res['timed_s']:.1f} s, {res['steps']} steps, "
                  f"loss {res['mean_train_loss']:.3f}, peak RSS {res['self_maxrss_mib']:.0f} MiB, "
                  f"process {res['process_wall_s']:.0f} s, load avg {res['loadavg_1min_at_end']:.1f})", flush=True)

    med = {p: statistics.median(x["tokens_per_s"] for x in runs[p]) for p in peers}
    med_cpu = {p: statistics.median(x["tokens_per_cpu_s"] for x in runs[p]) for p in peers}
    rss = {p: max(x["self_maxrss_mib"] for x in runs[p]) for p in peers}
    ref = med.get("phitune")
    print()
    print(f"| peer | tokens/s (median of {args.repeats}) | vs phitune | tokens per CPU-second | vs phitune | "
          "peak RSS MiB | mean train loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p in peers:
        ratio = f"{med[p] / ref:.2f}x" if ref else "-"
        ratio_cpu = f"{med_cpu[p] / med_cpu['phitune']:.2f}x" if ref else "-"
        loss = statistics.median(x["mean_train_loss"] for x in runs[p])
        print(f"| {p} | {med[p]:.0f} | {ratio} | {med_cpu[p]:.0f} | {ratio_cpu} | {rss[p]:.0f} | {loss:.3f} |")
    print()
    if ref:
        for p, label in (("trl", "TRL"), ("trl-gc", "TRL (gradient checkpointing, its default)"),
                         ("trainer", "HF Trainer")):
            if p in med:
                line = f"phitune / {label}: {ref / med[p]:.2f}x (per CPU-second: {med_cpu['phitune'] / med_cpu[p]:.2f}x)"
                if p == "trl":
                    line += f"  (target >= {TARGET_VS_TRL}x: {'met' if ref / med[p] >= TARGET_VS_TRL else 'NOT met'})"
                print(line)
    if "phitune-densemask" in med:
        print(f"phitune / phitune-densemask (dense [T, T] mask): {med['phitune'] / med['phitune-densemask']:.2f}x "
              f"(per CPU-second: {med_cpu['phitune'] / med_cpu['phitune-densemask']:.2f}x)")
    if "phitune-varlen" in med:
        for p, label in (("trl", "TRL"), ("trainer", "HF Trainer")):
            if p in med:
                print(f"phitune-varlen (prototype fix) / {label}: {med['phitune-varlen'] / med[p]:.2f}x "
                      f"(per CPU-second: {med_cpu['phitune-varlen'] / med_cpu[p]:.2f}x)")
    v = _versions()
    print(f"\nmachine: {_cpu_model()}, {os.cpu_count()} logical CPU(s); python {platform.python_version()}; "
          + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "median_tokens_per_s": med,
                                               "median_tokens_per_cpu_s": med_cpu,
                                               "peak_rss_mib": rss, "versions": v, "cpu": _cpu_model()}, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"comma-separated, of {', '.join(ALL_PEERS)} (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per peer, order alternating (default: %(default)s)")
    ap.add_argument("--examples", type=int, default=160, help="first N conversations of --data (default: %(default)s)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batch", type=int, default=8, help="examples per optimizer step (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3, help="tiny-phi3's base_learning_rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, the same for every peer (default: %(default)s; see bench/README.md)")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the timing (default: %(default)s)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--peer", choices=ALL_PEERS, help="internal: run one peer in this process and print its result")
    ap.add_argument("--profile", action="store_true", help="with --peer: torch.profiler table of 4 steps after warm-up")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args(argv)
    if args.peer:
        sys.path.insert(0, str(ROOT / "src"))
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
