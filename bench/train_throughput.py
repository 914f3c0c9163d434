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
ALL_PEERS = ("phitune", "trainer", "trl", "trl-gc", "trl-packing", "phitune-densemask", "phitune-varlen")
# --whole: whole processes, each the same job (train one epoch, validation loss at the end, adapter saved)
WHOLE_PEERS = ("phitune", "trl", "trl-packing", "trainer")
ALL_WHOLE_PEERS = WHOLE_PEERS + ("phitune-default",)
TARGET_VS_TRL = 1.3  # tiny model: phitune at least 1.3x TRL's tokens/s
# phi3-60m: training tokens/s >= 1.7x TRL's best setting, whole process >= 1.5x faster, peak RSS <= 0.7x
TARGETS_60M = {"tokens_per_s": 1.7, "whole_process": 1.5, "peak_rss": 0.7}
# The realistic shape: Phi-3's architecture and its real 32,064-row vocabulary (embedding and
# output head: 2 x 16.4M parameters) at 8 layers x 512 wide, 60,105,216 parameters in all.
PHI3_60M = dict(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)

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


def _cache_root() -> Path:
    return Path(os.environ.get("PHITUNE_CACHE") or Path.home() / ".cache" / "phitune") / "bench"


def ensure_phi3_60m() -> Path:
    """The realistic-shape model as a local folder (built once, ~10 s): PHI3_60M, random weights
    (seed 0), float32, and tiny-phi3's tokenizer and chat template (its 2,112 ids index the first
    rows of the 32,064-row table; the compute per token is that of the full vocabulary)."""
    out = _cache_root() / "phi3-60m"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from phitune.modeling.tiny import ensure_tiny_phi3

    tiny = ensure_tiny_phi3()
    tiny_cfg = Phi3Config.from_pretrained(tiny)
    cfg = Phi3Config(**PHI3_60M, original_max_position_embeddings=PHI3_60M["max_position_embeddings"],
                     bos_token_id=tiny_cfg.bos_token_id, eos_token_id=tiny_cfg.eos_token_id,
                     pad_token_id=tiny_cfg.pad_token_id, tie_word_embeddings=False, sliding_window=None, use_cache=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Phi3ForCausalLM(cfg).to(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".phi3-60m-", dir=out.parent))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp, save_jinja_files=False)
    tmp.rename(out)
    return out


def _first_sentence(text: str) -> str:
    import re

    m = re.match(r".*?[.!?](\s|$)", text, re.S)
    return (m.group(0) if m else text).strip()


def short_chats(src: Path, n: int, dst: Path) -> Path:
    """The first n conversations of src cut to one short exchange: the first sentence of the first
    user turn and of the first assistant turn (data/support_train.jsonl: 38 tokens a chat on average).
    Short chats keep four whole-process peers x repeats inside a 10-minute run on 2 busy cores."""
    rows = _load_examples(src, n)
    with open(dst, "w", encoding="utf-8") as f:
        for msgs in rows:
            user = next(m for m in msgs if m["role"] == "user")
            reply = next(m for m in msgs if m["role"] == "assistant")
            f.write(json.dumps({"messages": [{"role": "user", "content": _first_sentence(user["content"])},
                                             {"role": "assistant", "content": _first_sentence(reply["content"])}]})
                    + "\n")
    return dst


def _use_model(args) -> None:
    """MODEL_CFG / MAX_LEN for --model (the peers read them)."""
    global MODEL_CFG
    if args.model == "phi3-60m":
        MODEL_CFG = {"name": "phi3-60m", "path": str(ensure_phi3_60m()), "torch_dtype": "float32",
                     "attn_implementation": "sdpa"}


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


def _packed_row_len(tokenizer, conversations, batch: int) -> int:
    """TRL's packing counts packed rows per batch: one row of about `batch` examples' tokens
    (rounded up to 64) gives the same tokens per optimizer step as the other peers."""
    lengths = [len(e) for e in _encodings(tokenizer, conversations)]
    steps = -(-len(lengths) // batch)
    row = -(-sum(lengths) // steps)
    return max(-(-row // 64) * 64, max(lengths))


def run_trl(args, tokenizer, conversations, clock: StepClock, gradient_checkpointing: bool,
            packing: bool = False) -> dict:
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
    # packing=True: TRL's bfd packing, padding-free rows with position_ids restarting per example
    batch, max_length = (1, _packed_row_len(tokenizer, conversations, args.batch)) if packing else (args.batch, MAX_LEN)
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            max_grad_norm=1.0, seed=SEED, data_seed=SEED, use_cpu=True, bf16=False, fp16=False,
            report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0,
            # SFT-specific: assistant-only loss; packing / padding_free stay at their default False but for trl-packing
            assistant_only_loss=True, max_length=max_length, gradient_checkpointing=gradient_checkpointing,
            packing=packing,
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

    _use_model(args)
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
    elif args.peer in ("trl", "trl-gc", "trl-packing"):
        extra = run_trl(args, tokenizer, conversations, clock, gradient_checkpointing=args.peer == "trl-gc",
                        packing=args.peer == "trl-packing")
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


# --------------------------------------------------------------------------- whole processes (--whole)
# The same job four ways, each a whole `python` process timed from outside: train one LoRA epoch
# (--batch examples per optimizer step), the validation loss once at the end, the adapter saved.
# phitune's is `python train.py` itself (it also tracks the run in MLflow and logs the model).


def _phitune_overrides(args, work: Path, tag: str, evaluate_at_end: bool) -> list[str]:
    return [f"model.path={args.model_dir}", f"model.name={args.model}", f"model.base_learning_rate={args.lr}",
            f"model.base_batch_size={args.batch}", f"train.max_device_batch={args.batch}",
            f"model.context_length={MAX_LEN}", f"data.train_file={work / 'train.jsonl'}",
            f"data.validation_file={args.valid}", "train.epochs=1", "train.progress=false", "train.eval_steps=0",
            f"train.evaluate_at_end={str(evaluate_at_end).lower()}", f"seed={SEED}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"train.output_dir={work / ('ckpt-' + tag)}",
            f"hydra.run.dir={work / ('hydra-' + tag)}"]


# Where phitune's fixed cost goes: these functions are timed (inclusive; nested ones overlap).
PHASES = (("phitune.recipe", "run"), ("phitune.recipe", "_quiet_libraries"), ("phitune.recipe", "_setup_data"),
          ("phitune.recipe", "_setup_training"), ("phitune.recipe", "_tracked_fit"),
          ("phitune.tracking.run", "setup_tracking"), ("phitune.recipe", "_log_datasets"), ("phitune.train.loop", "fit"),
          ("phitune.recipe", "_finalise"), ("phitune.recipe", "_log_model"), ("phitune.evaluation.run", "evaluate_run"),
          ("phitune.recipe", "_closing_block"))


def job_phitune(args, work: Path, tag: str, evaluate_at_end: bool) -> dict:
    """`python train.py ...` run in this process (runpy), with the PHASES timed."""
    import importlib
    import runpy

    t_start = time.perf_counter()
    spent: dict[str, float] = {}
    cpu: dict[str, float] = {}  # the same phases in this process's CPU seconds (a loaded machine's fair clock)

    def timed(name, real):
        def wrapper(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return real(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
                cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0
        return wrapper

    # Imported here rather than by train.py a moment later (torch, mlflow: they would be anyway).
    for mod_name, attr in PHASES:
        if mod_name == "phitune.evaluation.run" and not evaluate_at_end:
            continue  # train.py does not import it then
        mod = importlib.import_module(mod_name)
        setattr(mod, attr, timed(attr, getattr(mod, attr)))
    from phitune.train.callbacks import Callback

    loop, clock = importlib.import_module("phitune.train.loop"), StepClock()
    timed_fit = loop.fit

    class Tick(Callback):
        def on_step(self, step, metrics):
            clock.step_end()

    def clocked_fit(model, *a, **k):  # fit(model, optimizer, scheduler, train, valid, spec, dist, callbacks, ...)
        clock.attach(model.get_base_model())
        a = list(a)
        a[6] = list(a[6]) + [Tick()]
        clock.start()
        return timed_fit(model, *a, **k)

    loop.fit = clocked_fit
    spent["imports_before_train_py"] = time.perf_counter() - t_start
    cpu["imports_before_train_py"] = time.process_time()
    sys.argv = [str(ROOT / "train.py"), *_phitune_overrides(args, work, tag, evaluate_at_end)]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
    spent["train_py_total"] = time.perf_counter() - t_start - spent["imports_before_train_py"]
    cpu["train_py_total"] = time.process_time() - cpu["imports_before_train_py"]
    return {"loop_s": spent.get("fit", 0.0), "loop_cpu_s": cpu.get("fit", 0.0), "phases": spent, "phases_cpu": cpu,
            **clock.summary(args.warmup)}


def _lora_config():
    from peft import LoraConfig, TaskType

    return LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=list(LORA["target_modules"]), bias="none", task_type=TaskType.CAUSAL_LM)


def _train_args(args, out: str, batch: int) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="linear",
                warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, seed=SEED, data_seed=SEED,
                use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", eval_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, logging_steps=1)


def job_trl(args, work: Path, tag: str, packing: bool) -> dict:
    """What a TRL user writes for this job: load_dataset, from_pretrained, SFTTrainer with LoRA."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    data = load_dataset("json", data_files={"train": str(work / "train.jsonl"), "validation": str(args.valid)})
    batch, max_length = (1, args.pack_len) if packing else (args.batch, MAX_LEN)
    out = str(work / ("trl-" + tag))
    cfg = SFTConfig(**_train_args(args, out, batch), assistant_only_loss=True, max_length=max_length,
                    gradient_checkpointing=False, packing=packing)
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data["train"], eval_dataset=data["validation"],
                         processing_class=tokenizer, peft_config=_lora_config(), callbacks=[_TrainerTick(clock)])
    clock.attach(trainer.model.get_base_model())
    return _timed_fit(trainer, clock, out, args.warmup)


def _timed_fit(trainer, clock, out: str, warmup: int) -> dict:
    """Train, evaluate and save an HF/TRL trainer; the loop's wall seconds and the clock's rates."""
    t0, c0 = time.perf_counter(), time.process_time()
    clock.start()
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(out)
    return {"loop_s": time.perf_counter() - t0, "loop_cpu_s": time.process_time() - c0, "eval_loss": metrics["eval_loss"],
            **clock.summary(warmup)}


def job_trainer(args, work: Path, tag: str) -> dict:
    """A plain HF Trainer script: phitune's chat encoding, padded batches, peft LoRA."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from phitune.chat import encode_example
    from phitune.data.pack import pad

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    train = [encode_example(tokenizer, m, MAX_LEN) for m in _load_examples(work / "train.jsonl", args.examples)]
    valid = [encode_example(tokenizer, json.loads(line)["messages"], MAX_LEN)
             for line in Path(args.valid).read_text(encoding="utf-8").splitlines() if line.strip()]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, _lora_config())
    out = str(work / ("trainer-" + tag))
    clock = StepClock()
    clock.attach(model.get_base_model())
    trainer = Trainer(model=model, args=TrainingArguments(**_train_args(args, out, args.batch),
                                                          remove_unused_columns=False),
                      train_dataset=train, eval_dataset=valid, data_collator=lambda b: pad(b, tokenizer.pad_token_id),
                      callbacks=[_TrainerTick(clock)])
    return _timed_fit(trainer, clock, out, args.warmup)


def job_child(args) -> None:
    t0 = time.perf_counter()
    work, tag = Path(args.workdir), f"{args.job}-{args.tag}"
    if args.job in ("phitune", "phitune-default"):
        res = job_phitune(args, work, tag, evaluate_at_end=args.job == "phitune-default")
    elif args.job in ("trl", "trl-packing"):
        res = job_trl(args, work, tag, packing=args.job == "trl-packing")
    else:
        res = job_trainer(args, work, tag)
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)  # also in the log, should the parent be stopped
    # the parent's wall minus job_s: interpreter start-up and exit (process teardown)
    print(RESULT_TAG + json.dumps(dict(res, job=args.job, job_s=time.perf_counter() - t0,
                                       self_cpu_s=me.ru_utime + me.ru_stime, self_maxrss_mib=me.ru_maxrss / 1024)),
          flush=True)


def _run_job(args, job: str, work: Path, tag: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", job, "--tag", tag, "--workdir", str(work),
           "--model", args.model, "--model-dir", str(args.model_dir), "--valid", str(args.valid),
           "--examples", str(args.examples), "--batch", str(args.batch), "--lr", str(args.lr),
           "--pack-len", str(args.pack_len), "--warmup", str(args.warmup)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT / "src"))
    log = work / f"{tag}-{job}.log"
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time and peak RSS
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(text[-6000:])
        raise SystemExit(f"job {job} failed (exit {proc.returncode}); log: {log}")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    return dict(res, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_mib=usage.ru_maxrss / 1024,
                fixed_s=wall - res["loop_s"], fixed_cpu_s=usage.ru_utime + usage.ru_stime - res["loop_cpu_s"],
                startup_and_exit_s=wall - res["job_s"])


def whole(args) -> None:
    jobs = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers_given else list(WHOLE_PEERS)
    for j in jobs:
        if j not in ALL_WHOLE_PEERS:
            raise SystemExit(f"--peers: unknown whole-process peer {j!r} (known: {', '.join(ALL_WHOLE_PEERS)})")
    work = Path(tempfile.mkdtemp(prefix="phitune-whole-"))
    rows = _load_examples(Path(args.data), args.examples)
    (work / "train.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    from transformers import AutoTokenizer

    args.pack_len = _packed_row_len(AutoTokenizer.from_pretrained(args.model_dir), rows, args.batch)
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()  # the store exists, as on a 2nd run
    print(f"# whole processes: {args.examples} chats of {args.data}, validation {args.valid}, model {args.model} "
          f"({args.model_dir}), {args.batch} per step, 1 epoch, lr {args.lr:g}, {args.threads} thread(s), "
          f"trl-packing rows of {args.pack_len} tokens; work dir {work}", flush=True)
    runs: dict[str, list[dict]] = {j: [] for j in jobs}
    for r in range(args.repeats):
        for j in (jobs if r % 2 == 0 else list(reversed(jobs))):
            res = _run_job(args, j, work, str(r))
            runs[j].append(res)
            print(f"  repeat {r + 1} {j:16s} wall {res['wall_s']:6.1f} s  CPU {res['cpu_s']:6.1f} s  "
                  f"loop {res['loop_s']:6.1f} s  fixed {res['fixed_s']:5.1f} s (CPU {res['fixed_cpu_s']:5.1f} s)  "
                  f"peak RSS {res['peak_rss_mib']:6.0f} MiB  "
                  f"load avg {os.getloadavg()[0]:.1f}", flush=True)
            print(f"      interpreter start-up + exit {res['startup_and_exit_s']:.1f} s", flush=True) if not res.get(
                "phases") else None
            if res.get("phases"):
                print("      phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["phases"].items())
                      + f"; interpreter start-up + exit {res['startup_and_exit_s']:.1f}", flush=True)
                print("      phases (CPU s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["phases_cpu"].items()),
                      flush=True)
    keys = ("wall_s", "cpu_s", "loop_s", "fixed_s", "fixed_cpu_s", "tokens_per_s", "tokens_per_cpu_s")
    med = {j: {k: statistics.median(x[k] for x in runs[j]) for k in keys} for j in jobs}
    rss = {j: max(x["peak_rss_mib"] for x in runs[j]) for j in jobs}
    trls = [j for j in ("trl", "trl-packing") if j in med]
    best = min(trls, key=lambda j: med[j]["wall_s"]) if trls else None
    print(f"\n| job | training tokens/s (median of {args.repeats}) | tokens per CPU-s | wall s | CPU s | "
          "loop s (train + final validation + save) | fixed s (wall - loop) | fixed CPU s | peak RSS MiB |"
          + (f" tokens/s vs {best} | wall: {best} / job | RSS vs {best} |" if best else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if best else ""))
    for j in jobs:
        m = med[j]
        line = (f"| {j} | {m['tokens_per_s']:.0f} | {m['tokens_per_cpu_s']:.0f} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | "
                f"{m['loop_s']:.1f} | {m['fixed_s']:.1f} | {m['fixed_cpu_s']:.1f} | {rss[j]:.0f} |")
        if best:
            line += (f" {m['tokens_per_s'] / med[best]['tokens_per_s']:.2f}x | {med[best]['wall_s'] / m['wall_s']:.2f}x |"
                     f" {rss[j] / rss[best]:.2f}x |")
        print(line)
    if best and "phitune" in med and args.model == "phi3-60m":
        tps = max((j for j in trls), key=lambda j: med[j]["tokens_per_s"])
        train_speed = med["phitune"]["tokens_per_s"] / med[tps]["tokens_per_s"]
        print(f"\ntraining tokens/s, phitune vs TRL-best ({tps}): {train_speed:.2f}x (per CPU-second "
              f"{med['phitune']['tokens_per_cpu_s'] / med[tps]['tokens_per_cpu_s']:.2f}x; target >= "
              f"{TARGETS_60M['tokens_per_s']}x: {'met' if train_speed >= TARGETS_60M['tokens_per_s'] else 'NOT met'})")
        speed = med[best]["wall_s"] / med["phitune"]["wall_s"]
        ratio_rss = rss["phitune"] / rss[best]
        print(f"whole process, phitune vs TRL-best ({best}): {speed:.2f}x faster (target >= "
              f"{TARGETS_60M['whole_process']}x: {'met' if speed >= TARGETS_60M['whole_process'] else 'NOT met'}); "
              f"peak RSS {ratio_rss:.2f}x (target <= {TARGETS_60M['peak_rss']}x: "
              f"{'met' if ratio_rss <= TARGETS_60M['peak_rss'] else 'NOT met'}); fixed cost "
              f"{med['phitune']['fixed_s']:.1f} s vs {med[best]['fixed_s']:.1f} s (CPU s {med['phitune']['fixed_cpu_s']:.1f} "
              f"vs {med[best]['fixed_cpu_s']:.1f})")
    _print_machine()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "versions": _versions()}, indent=2,
                                              default=str))


# --------------------------------------------------------------------------- parent side


def _run_peer(args, peer: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", peer, "--examples", str(args.examples),
           "--threads", str(args.threads), "--lr", str(args.lr), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--data", str(args.data), "--model", args.model]
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


def _print_machine() -> dict:
    v = _versions()
    print(f"\nmachine: {_cpu_model()}, {os.cpu_count()} logical CPU(s); python {platform.python_version()}; "
          + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    return v


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
    trls = [p for p in ("trl", "trl-packing") if p in med]
    if ref and trls and args.model == "phi3-60m":
        best = max(trls, key=lambda p: med[p])
        speed, speed_cpu, ratio_rss = ref / med[best], med_cpu["phitune"] / med_cpu[best], rss["phitune"] / rss[best]
        print(f"phitune / TRL-best ({best}): {speed:.2f}x tokens/s, {speed_cpu:.2f}x per CPU-second "
              f"(target >= {TARGETS_60M['tokens_per_s']}x: {'met' if speed >= TARGETS_60M['tokens_per_s'] else 'NOT met'}); "
              f"peak RSS {ratio_rss:.2f}x (target <= {TARGETS_60M['peak_rss']}x: "
              f"{'met' if ratio_rss <= TARGETS_60M['peak_rss'] else 'NOT met'})")
    v = _print_machine()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "median_tokens_per_s": med,
                                               "median_tokens_per_cpu_s": med_cpu,
                                               "peak_rss_mib": rss, "versions": v, "cpu": _cpu_model()}, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=None,
                    help=f"comma-separated, of {', '.join(ALL_PEERS)} (default: {','.join(DEFAULT_PEERS)}); "
                         f"with --whole, of {', '.join(ALL_WHOLE_PEERS)} (default: {','.join(WHOLE_PEERS)})")
    ap.add_argument("--model", choices=("tiny", "phi3-60m"), default="tiny",
                    help="tiny: the builtin tiny Phi-3; phi3-60m: Phi-3's architecture with the real 32,064 vocabulary "
                         "at 8 x 512 (built in this script), 128 short chats, 16 a step, lr 3e-4 (default: %(default)s)")
    ap.add_argument("--whole", action="store_true",
                    help="whole processes: `python train.py` vs the same job written with TRL and HF Trainer")
    ap.add_argument("--repeats", type=int, default=3, help="runs per peer, order alternating (default: %(default)s)")
    ap.add_argument("--examples", type=int, default=None, help="first N conversations of --data (default: 160; phi3-60m 128)")
    ap.add_argument("--data", default=None, help="chat JSONL (default: data/support_train.jsonl; phi3-60m: its short chats)")
    ap.add_argument("--valid", default=None, help="--whole: validation JSONL (default: data/support_valid.jsonl, "
                                                  "phi3-60m: its short chats)")
    ap.add_argument("--batch", type=int, default=None, help="examples per optimizer step (default: 8; phi3-60m 16)")
    ap.add_argument("--lr", type=float, default=None, help="default: 2e-3 (tiny-phi3's base), phi3-60m 3e-4")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, the same for every peer (default: %(default)s; see bench/README.md)")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the timing (default: %(default)s)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--peer", choices=ALL_PEERS, help="internal: run one peer in this process and print its result")
    ap.add_argument("--profile", action="store_true", help="with --peer: torch.profiler table of 4 steps after warm-up")
    ap.add_argument("--profile-rows", type=int, default=25)
    for internal in ("--job", "--tag", "--workdir", "--model-dir"):  # --whole's children
        ap.add_argument(internal, help=argparse.SUPPRESS)
    ap.add_argument("--pack-len", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.job:
        job_child(args)
        return
    _defaults(args)
    if args.peer:
        child(args)
    elif args.whole:
        whole(args)
    else:
        parent(args)


def _defaults(args) -> None:
    """Per-model defaults; phi3-60m writes its short chats into the bench cache."""
    big = args.model == "phi3-60m"
    args.peers_given = args.peers is not None
    if args.peers is None:
        args.peers = ",".join(WHOLE_PEERS if args.whole else DEFAULT_PEERS)
    args.examples = args.examples or (128 if big else 160)
    args.batch = args.batch or (16 if big else 8)
    args.lr = args.lr if args.lr is not None else (3e-4 if big else 2e-3)
    if big and (args.data is None or args.valid is None) and not args.peer:
        _cache_root().mkdir(parents=True, exist_ok=True)
        args.data = args.data or str(short_chats(DEFAULT_DATA, args.examples, _cache_root() / "short_train.jsonl"))
        args.valid = args.valid or str(short_chats(ROOT / "data" / "support_valid.jsonl", 48,
                                                   _cache_root() / "short_valid.jsonl"))
    args.data = args.data or str(DEFAULT_DATA)
    args.valid = args.valid or str(ROOT / "data" / "support_valid.jsonl")
    if args.whole:
        if big:
            args.model_dir = str(ensure_phi3_60m())
        else:
            from phitune.modeling.tiny import ensure_tiny_phi3

            args.model_dir = str(ensure_tiny_phi3())


if __name__ == "__main__":
    main()
