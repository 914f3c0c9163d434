"""The training loop: packed micro-batches, accumulation, DDP, evals, epoch checkpoints.

Deliberately small. An optimizer step sees `effective_batch` examples: each of
`world_size` devices runs `grad_accum` forward passes of `device_batch` examples
packed into one padding-free row. Example order is a function of (seed, epoch), so a
run resumed from an epoch checkpoint replays exactly what an uninterrupted run does.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from phitune.data.pack import bound_by_tokens, pack, plan_batches
from phitune.train import checkpoint as ckpt
from phitune.train.callbacks import Callback
from phitune.train.distributed import Dist
from phitune.train.forward import autocast_dtype, forward_stats
from phitune.train.schedule import BatchPlan
from phitune.train.tokens import labelled_tokens


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    train_tokens: int = 0  # non-padding tokens seen in training forward passes
    history: list = field(default_factory=list)  # one dict per logged step (results.csv rows)
    epoch_metrics: list = field(default_factory=list)


@dataclass
class LoopSpec:
    epochs: int
    plan: BatchPlan
    seed: int
    eval_steps: int = 10
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    full_eval_each_epoch: bool = True
    keep_checkpoints: int = 3
    output_dir: str | None = None
    progress: bool = True
    max_device_tokens: int | None = None  # tokens per packed row (None: max_device_batch examples, any length)
    loss_chunk_tokens: int | None = None  # labelled tokens per lm_head + loss chunk (None: full logits)
    mixed_precision: str = "off"  # auto | bf16 | off (phitune.train.forward.autocast_dtype)
    # Another task's batches, loss and metrics (phitune.classify.ops.ClassifyOps); None = chat.
    task: object = None

    @classmethod
    def from_config(cls, train_cfg, *, epochs: int, plan: BatchPlan, seed: int, output_dir: str | None) -> "LoopSpec":
        """The loop's settings from the `train` config group; the rest are resolved by the recipe."""
        shared = ("eval_steps", "max_steps", "max_grad_norm", "full_eval_each_epoch", "progress")
        memory = {k: train_cfg.get(k, cls.__dataclass_fields__[k].default)
                  for k in ("max_device_tokens", "loss_chunk_tokens", "mixed_precision")}
        return cls(epochs=epochs, plan=plan, seed=seed, output_dir=output_dir,
                   keep_checkpoints=train_cfg.keep_checkpoints, **{k: train_cfg[k] for k in shared}, **memory)


def steps_per_epoch(n_examples: int, plan: BatchPlan) -> int:
    micro_batches = math.ceil(n_examples / plan.device_batch)
    return math.ceil(micro_batches / (plan.grad_accum * plan.world_size))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forward(model, batch: dict, spec: LoopSpec | None = None, amp=None):
    if spec is not None and spec.task is not None:
        return spec.task.forward(model, batch, amp)
    return forward_stats(model, batch, spec.loss_chunk_tokens if spec else None, amp)


def _pack(spec: LoopSpec, examples: list) -> dict:
    return spec.task.pack(examples) if spec.task is not None else pack(examples)


def _units(spec: LoopSpec, batch: dict) -> int:
    """What a step's summed loss is divided by: labelled tokens (chat), examples (classification)."""
    return spec.task.units(batch) if spec.task is not None else labelled_tokens(batch["labels"])


@torch.no_grad()
def evaluate(model, examples: list, device_batch: int, dist: Dist, batch_ids: list[list[int]] | None = None,
             spec: LoopSpec | None = None) -> dict:
    """Loss and token accuracy over `examples` (sharded across devices); `spec`: the memory settings."""
    # The unwrapped module: a DDP forward would start collectives that only some ranks join.
    model = ckpt._unwrap(model)
    was_training = model.training
    model.eval()
    groups = batch_ids if batch_ids is not None else [list(range(i, min(i + device_batch, len(examples))))
                                                      for i in range(0, len(examples), device_batch)]
    if spec is not None and spec.max_device_tokens:
        lengths = [len(e.input_ids) for e in examples]
        groups = [row for g in groups for row in bound_by_tokens([g], lengths, spec.max_device_tokens)]
    amp = autocast_dtype(spec.mixed_precision, dist.device) if spec is not None else None
    if spec is not None and spec.task is not None:  # e.g. accuracy and macro-F1 need every prediction
        out = spec.task.evaluate(model, [[examples[i] for i in g] for g in groups[dist.rank::dist.world_size]], dist, amp)
        model.train(was_training)
        return out
    ce = correct = count = 0.0
    for group in groups[dist.rank::dist.world_size]:
        c, k, n = _forward(model, _to(pack([examples[i] for i in group]), dist.device), spec, amp)
        ce, correct, count = ce + float(c), correct + float(k), count + float(n)
    ce, correct, count = dist.all_sum(ce, correct, count)
    model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "mean_token_accuracy": float("nan"), "tokens": 0}
    return {"loss": ce / count, "mean_token_accuracy": correct / count, "tokens": int(count)}


def fit(model, optimizer, scheduler, train_examples: list, valid_examples: list, spec: LoopSpec, dist: Dist,
        callbacks: list[Callback] = (), state: TrainState | None = None, run_id: str | None = None) -> TrainState:
    state = state or TrainState()
    plan = spec.plan
    per_epoch = steps_per_epoch(len(train_examples), plan)
    total_steps = per_epoch * spec.epochs
    if spec.max_steps:
        total_steps = min(total_steps, spec.max_steps)
    lengths = [len(e.input_ids) for e in train_examples]
    valid_groups = [list(range(i, min(i + plan.device_batch, len(valid_examples))))
                    for i in range(0, len(valid_examples), plan.device_batch)]
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (spec.progress and dist.is_main))
    model.train()
    mbs_per_step = plan.grad_accum * plan.world_size
    amp = autocast_dtype(spec.mixed_precision, dist.device)
    try:
        for epoch in range(state.epoch, spec.epochs):
            if state.step >= total_steps:
                break
            micro = plan_batches(lengths, plan.device_batch, spec.seed, epoch)
            first_step = epoch * per_epoch
            for s in range(per_epoch):
                step_index = first_step + s
                if step_index < state.step:
                    continue  # only reached when a mid-epoch state is restored
                if state.step >= total_steps:
                    break
                # train.max_device_tokens: the step's examples in more, shorter rows (same loss and gradient)
                groups = bound_by_tokens(micro[s * mbs_per_step:(s + 1) * mbs_per_step], lengths,
                                         spec.max_device_tokens, plan.device_batch)
                batches = [_pack(spec, [train_examples[i] for i in g]) for g in groups]
                step_tokens = sum(_units(spec, b) for b in batches)
                mine = batches[dist.rank::dist.world_size]
                # every device must run as many passes for DDP's all-reduce to line up;
                # a device short of data repeats a batch with zero weight.
                passes = max(plan.grad_accum, math.ceil(len(batches) / plan.world_size))
                weights = [1.0] * len(mine) + [0.0] * (passes - len(mine))
                mine = mine + [batches[0]] * (passes - len(mine))
                ce_sum = correct = 0.0
                seen = 0
                for j, (batch, w) in enumerate(zip(mine, weights)):
                    batch = _to(batch, dist.device)
                    sync = contextlib.nullcontext() if (j == len(mine) - 1 or not dist.enabled) else model.no_sync()
                    with sync:
                        c, k, _ = _forward(model, batch, spec, amp)
                        # DDP averages gradients over devices: scale by world_size so the
                        # step's gradient is the mean over all its labelled tokens.
                        loss = c * (w * plan.world_size / max(1, step_tokens))
                        loss.backward()
                    if w:
                        ce_sum, correct = ce_sum + float(c.detach()), correct + float(k)
                        seen += int(batch["input_ids"].numel())
                if spec.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], spec.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ce_sum, correct, seen = dist.all_sum(ce_sum, correct, seen)
                state.step += 1
                state.train_tokens += int(seen)
                row = {"step": state.step, "train_loss": ce_sum / max(1, step_tokens),
                       f"train_{spec.task.accuracy if spec.task else 'mean_token_accuracy'}": correct / max(1, step_tokens),
                       "learning_rate": scheduler.get_last_lr()[0], "train_tokens": state.train_tokens, "epoch": epoch + 1}
                if valid_groups and spec.eval_steps and state.step % spec.eval_steps == 0:
                    # Azure's valid_loss: one validation batch, cycling through the set.
                    g = valid_groups[(state.step // spec.eval_steps - 1) % len(valid_groups)]
                    v = (evaluate(model, valid_examples, plan.device_batch, Dist(device=dist.device), [g], spec)
                         if dist.is_main else None)
                    if dist.is_main:
                        row.update({f"valid_{k}": x for k, x in v.items() if k != "tokens"})
                state.history.append(row) if dist.is_main else None
                if dist.is_main:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", epoch=epoch + 1)
                    for cb in callbacks:
                        cb.on_step(state.step, row)
                    if "valid_loss" in row:
                        for cb in callbacks:
                            cb.on_evaluate(state.step, row)
            epoch_done = state.step >= first_step + per_epoch
            metrics = {}
            if spec.full_eval_each_epoch and valid_examples:
                full = evaluate(model, valid_examples, plan.device_batch, dist, spec=spec)
                metrics = {f"full_valid_{k}": x for k, x in full.items() if k != "tokens"}
                if spec.task is None:
                    metrics["perplexity"] = math.exp(min(full["loss"], 50.0))
                if dist.is_main and state.history:
                    state.history[-1].update(metrics)
            state.epoch = epoch + 1 if epoch_done else epoch
            state.epoch_metrics.append(dict(metrics, epoch=epoch + 1, step=state.step))
            path = None
            if spec.output_dir and epoch_done:
                rng = dist.gather_object(ckpt.rng_state(dist.device))  # each rank draws its own dropout masks
                if dist.is_main:
                    path = ckpt.write_checkpoint(spec.output_dir, epoch + 1, model, optimizer, scheduler,
                                                 {"step": state.step, "train_tokens": state.train_tokens,
                                                  "history": state.history, "epoch_metrics": state.epoch_metrics,
                                                  "run_id": run_id, "time": time.time()}, rng)
            dist.barrier()
            if dist.is_main:
                # Logged before it is published: a checkpoint that resume can start after is in MLflow.
                for cb in callbacks:
                    cb.on_epoch_end(epoch + 1, state.step, metrics, path)
                if path is not None:
                    ckpt.publish_checkpoint(path, keep=spec.keep_checkpoints)
            if not epoch_done:
                break  # max_steps reached mid-epoch
    finally:
        bar.close()
    return state
