"""Classification training throughput: phitune packed vs phitune padded vs HF Trainer (CPU, tiny Phi-3).

    python bench/classify_throughput.py                  # 3 peers x 2 rounds, alternated; a few minutes
    python bench/classify_throughput.py --steps 30 --rounds 3 --threads 1

What is measured: training examples per second over --steps optimizer steps of 8 examples
(the first 8 x steps tickets of data/tickets_train.jsonl, the same for every peer), after
--warmup steps that are not timed:

- model: phitune's builtin tiny Phi-3 as transformers' Phi3ForSequenceClassification
  (float32, use_cache off), 6 labels; LoRA r=8, alpha=16, dropout 0.05 on qkv_proj,
  o_proj, gate_up_proj, down_proj, the `score` head trained whole (peft modules_to_save);
- AdamW lr 2e-3, constant, grad-norm clip 1.0, no evaluation, no checkpoints; --threads
  torch threads (default 1: on a shared 2-core machine two threads per process stall).

Peers:
- packed: phitune.classify (encode.pack: the 8 examples of a step end to end in one row,
  position_ids restarting, the head at each example's last position; attention
  packed_sdpa) -> ClassifyOps.forward, backward, AdamW step;
- padded: the same model and loop, batches right-padded to the longest example
  (encode.pad + attention_mask; attention sdpa);
- trainer: transformers.Trainer on AutoModelForSequenceClassification + peft (SEQ_CLS),
  DataCollatorWithPadding, per_device_train_batch_size=8, the model's own pooling of the
  last non-pad token.
Rounds alternate the peers' order (packed, padded, trainer, then reversed...).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _data(tokenizer, n: int):
    from phitune.classify.data import ClassificationData
    from phitune.classify.encode import encode_examples
    from phitune.classify.labels import label_set

    examples = ClassificationData().load(REPO / "data/tickets_train.jsonl")
    labels = label_set([e.label for e in examples])
    return encode_examples(tokenizer, examples[:n], labels, 512), labels


def _phitune(mode: str, encoded, labels, tokenizer, steps: int, warmup: int) -> float:
    from omegaconf import OmegaConf

    from phitune.classify.encode import pack, pad
    from phitune.classify.model import build_classifier
    from phitune.classify.ops import ClassifyOps
    from phitune.config import ModelConfig, TrainConfig

    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/tiny-phi3.yaml"))
    if mode == "padded":
        model_cfg.attn_implementation = "sdpa"
    torch.manual_seed(42)
    model = build_classifier(model_cfg, OmegaConf.structured(TrainConfig), labels, tokenizer.pad_token_id)
    ops = ClassifyOps(len(labels))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        group = encoded[step * 8:(step + 1) * 8]
        if mode == "packed":
            ce, _, n = ops.forward(model, pack(group))
        else:
            b = pad(group, tokenizer.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], last=b["last"]).float()
            ce, n = torch.nn.functional.cross_entropy(logits, b["class_labels"], reduction="sum"), len(group)
        (ce / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * 8 / (time.perf_counter() - t0)


class _Timer:
    """A TrainerCallback that starts the clock after the warm-up steps."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == warmup:
                    timer.t0 = time.perf_counter()

        self.callback, self.t0 = CB(), None


def _trainer(encoded, labels, tokenizer, steps: int, warmup: int) -> float:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from phitune.modeling.tiny import ensure_tiny_phi3

    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(str(ensure_tiny_phi3()), num_labels=len(labels),
                                                               pad_token_id=tokenizer.pad_token_id,
                                                               attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type=TaskType.SEQ_CLS))
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.label}
            for e in encoded[:8 * (warmup + steps)]]
    timer = _Timer(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=warmup + steps,
                                 learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                                 max_grad_norm=1.0, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, dataloader_num_workers=0, seed=42, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer),
                          callbacks=[timer.callback])
        trainer.train()
    return steps * 8 / (time.perf_counter() - timer.t0)


def main(argv=None) -> int:
    import transformers

    from phitune.modeling.loader import load_tokenizer
    from phitune.confdir import load_model_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    tokenizer = load_tokenizer(load_model_config("tiny-phi3"))
    encoded, labels = _data(tokenizer, 8 * (args.warmup + args.steps))
    peers = ["packed", "padded", "trainer"]
    results = {k: [] for k in peers}
    for r in range(args.rounds):
        for peer in (peers if r % 2 == 0 else peers[::-1]):
            fn = (lambda: _trainer(encoded, labels, tokenizer, args.steps, args.warmup)) if peer == "trainer" else \
                (lambda: _phitune(peer, encoded, labels, tokenizer, args.steps, args.warmup))
            value = fn()
            results[peer].append(value)
            print(f"round {r + 1} {peer:8s} {value:8.1f} examples/s", flush=True)
    best = {k: max(v) for k, v in results.items()}
    print(f"\nbest of {args.rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items())
          + f" examples/s; packed/trainer {best['packed'] / best['trainer']:.2f}x, "
            f"packed/padded {best['packed'] / best['padded']:.2f}x")
    mean_tokens = sum(len(e) for e in encoded) / len(encoded)
    print(f"{len(encoded)} examples, {mean_tokens:.1f} tokens each on average; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, python {platform.python_version()}, threads {args.threads}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
