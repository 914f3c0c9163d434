"""conf/optimizer/ -> a torch optimizer and learning-rate schedule (one group, one factory)."""
from __future__ import annotations

import math

import torch

from phitune.errors import PhituneError


def build_optimizer(opt_cfg, params, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise PhituneError("no trainable parameters: check train.method and train.lora.target_modules")
    name = opt_cfg.name
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=opt_cfg.weight_decay)
    raise PhituneError(f"optimizer.name: unknown optimizer {name!r} (adamw, sgd, adafactor)")


def build_scheduler(opt_cfg, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(opt_cfg.warmup_ratio * total_steps))
    kind = opt_cfg.scheduler
    if kind not in ("linear", "cosine", "constant"):
        raise PhituneError(f"optimizer.scheduler: unknown schedule {kind!r} (linear, cosine, constant)")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
