"""Peak memory of phitune's training loop on long conversations, each memory tool on and off.

    flock /tmp/phitune-heavy.lock .venv/bin/python bench/train_memory.py                 # every setting
    flock /tmp/phitune-heavy.lock .venv/bin/python bench/train_memory.py --settings off,all

The long-conversation job at the realistic shape: Phi-3's architecture with the real
32,064-row vocabulary, 8 layers x 512 wide (bench/train_throughput.py's phi3-60m, random
weights), LoRA r=8 on every projection, conversations of ~3,000 tokens (support chats of
data/support_train.jsonl joined end to end), `--per-step` of them per optimizer step and
`--steps` steps, through phitune.train.loop.fit. Each setting runs in its own subprocess,
so its peak RSS (ru_maxrss) is its own; the loss of each step is printed too, since none
of the tools may change it (LoRA dropout is 0 here so that the rows' cut cannot either).

    off        max_device_batch 8 (one row of 8 examples, ~24k tokens), full float32 logits
    chunked    train.loss_chunk_tokens=2048
    tokens     train.max_device_tokens=4096
    tokens_chunked  the two together (no checkpointing)
    ckpt       train.gradient_checkpointing=true
    all        the three together
    trl        TRL's SFTTrainer on the same conversations and model as its users run it for this job:
               padded batches of max_device_batch (8) examples up to max_length 4096, LoRA through
               peft_config, assistant-only loss, gradient checkpointing on (TRL's default)
    trl_nockpt the same with gradient_checkpointing=False

The TRL settings need `pip install -e '.[bench]'`.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULT_TAG = "BENCH_MEMORY "
SETTINGS = {
    "off": {"max_device_tokens": None, "loss_chunk_tokens": None, "gradient_checkpointing": False},
    "chunked": {"max_device_tokens": None, "loss_chunk_tokens": 2048, "gradient_checkpointing": False},
    "tokens": {"max_device_tokens": 4096, "loss_chunk_tokens": None, "gradient_checkpointing": False},
    "tokens_chunked": {"max_device_tokens": 4096, "loss_chunk_tokens": 2048, "gradient_checkpointing": False},
    "ckpt": {"max_device_tokens": None, "loss_chunk_tokens": None, "gradient_checkpointing": True},
    "all": {"max_device_tokens": 4096, "loss_chunk_tokens": 2048, "gradient_checkpointing": True},
}
TRL_SETTINGS = {"trl": True, "trl_nockpt": False}  # name -> TRL's gradient_checkpointing
MAX_LEN = 4096  # tokens: Phi-3-mini-4k's context
DEVICE_BATCH = 8  # train.max_device_batch's default


def long_conversations(tokenizer, n: int, target_tokens: int) -> list[list[dict]]:
    """n conversations of about target_tokens each: the sample's support chats joined turn after turn."""
    from phitune.chat import count_tokens

    rows = [json.loads(line)["messages"] for line in open(ROOT / "data" / "support_train.jsonl", encoding="utf-8")
            if line.strip()]
    out, i = [], 0
    for _ in range(n):
        msgs: list[dict] = []
        while not msgs or count_tokens(tokenizer, msgs)[0] < target_tokens:
            msgs += [m for m in rows[i % len(rows)] if m["role"] != "system"]
            i += 1
        out.append(msgs)
    return out


def trl_child(args) -> None:
    """TRL's SFTTrainer on the long-conversation job: peak RSS, training seconds, the step losses."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from train_throughput import ensure_phi3_60m

    torch.set_num_threads(args.threads)
    path = ensure_phi3_60m()
    tokenizer = AutoTokenizer.from_pretrained(path)
    conversations = long_conversations(tokenizer, args.per_step * args.steps, args.tokens)
    dataset = Dataset.from_list([{"messages": msgs} for msgs in conversations])
    transformers.set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM,
                      target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(output_dir=out, per_device_train_batch_size=DEVICE_BATCH,
                        gradient_accumulation_steps=max(1, args.per_step // DEVICE_BATCH), max_steps=args.steps,
                        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        optim="adamw_torch", max_grad_norm=1.0, seed=0, use_cpu=True, bf16=False,
                        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
                        logging_steps=1, dataloader_num_workers=0, assistant_only_loss=True, max_length=MAX_LEN,
                        gradient_checkpointing=TRL_SETTINGS[args.child], packing=False)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Losses()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True)) for m in conversations]
    print(RESULT_TAG + json.dumps({
        "setting": args.child, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": rss_loaded, "train_s": wall, "losses": losses, "tokens": sum(lengths),
        "examples": len(lengths), "mean_tokens": sum(lengths) / len(lengths), "threads": args.threads}), flush=True)


def child(args) -> None:
    if args.child in TRL_SETTINGS:
        return trl_child(args)
    import torch
    import transformers
    from omegaconf import OmegaConf

    from phitune.chat import encode_example
    from phitune.config import ModelConfig, TrainConfig
    from phitune.modeling.loader import apply_training_method, load_model, load_tokenizer
    from phitune.train import memory
    from phitune.train.distributed import Dist
    from phitune.train.loop import LoopSpec, fit
    from phitune.train.schedule import plan_batch
    from train_throughput import ensure_phi3_60m

    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.child]
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                {"name": "phi3-60m", "path": str(ensure_phi3_60m()), "torch_dtype": "float32",
                                 "attn_implementation": "packed_sdpa", "context_length": MAX_LEN})
    train_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                {"lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, "max_device_batch": DEVICE_BATCH,
                                 **setting})
    tokenizer = load_tokenizer(model_cfg)
    examples = [encode_example(tokenizer, m, MAX_LEN)
                for m in long_conversations(tokenizer, args.per_step * args.steps, args.tokens)]
    transformers.set_seed(0)
    model = apply_training_method(load_model(model_cfg, device="cpu"), train_cfg, model_cfg)
    if setting["gradient_checkpointing"]:
        memory.enable_gradient_checkpointing(model)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    plan = plan_batch(args.per_step, 1, DEVICE_BATCH, 1)
    spec = LoopSpec.from_config(train_cfg, epochs=1, plan=plan, seed=0, output_dir=None)
    spec.eval_steps, spec.full_eval_each_epoch, spec.progress, spec.max_steps = 0, False, False, args.steps
    t0 = time.perf_counter()
    state = fit(model, opt, sched, examples, [], spec, Dist())
    wall = time.perf_counter() - t0
    print(RESULT_TAG + json.dumps({
        "setting": args.child, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": rss_loaded, "train_s": wall, "losses": [r["train_loss"] for r in state.history],
        "tokens": sum(len(e.input_ids) for e in examples), "examples": len(examples),
        "mean_tokens": sum(len(e.input_ids) for e in examples) / len(examples), "threads": args.threads}), flush=True)


def parent(args) -> None:
    import platform

    import torch
    import transformers

    results = []
    for name in args.settings.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--per-step", str(args.per_step), "--steps", str(args.steps),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res = json.loads(lines[-1][len(RESULT_TAG):])
        res["process_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"{name}: peak RSS {res['peak_rss_mib']:.0f} MiB, train {res['train_s']:.0f} s, "
              f"losses {', '.join(f'{x:.5f}' for x in res['losses'])}", flush=True)
    if not results:
        raise SystemExit("no setting ran")
    base = next((r for r in results if r["setting"] == "off"), None)
    r0 = results[0]
    print(f"\n{r0['examples']} conversations of {r0['mean_tokens']:.0f} tokens on average, {args.per_step} a step, "
          f"{args.steps} step(s); torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}, {args.threads} threads\n")
    print("| setting | peak RSS MiB | vs off | after model load MiB | training s | step losses |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else "-"
        print(f"| {r['setting']} | {r['peak_rss_mib']:.0f} | {ratio} | {r['rss_after_load_mib']:.0f} | "
              f"{r['train_s']:.0f} | {', '.join(f'{x:.5f}' for x in r['losses'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated: " + ", ".join([*SETTINGS, *TRL_SETTINGS]))
    p.add_argument("--per-step", type=int, default=8, help="conversations per optimizer step")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--tokens", type=int, default=3000, help="tokens per conversation, about")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=580, help="seconds per setting")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=(*SETTINGS, *TRL_SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
