import pytest
import torch
from omegaconf import OmegaConf

from phitune.config import OptimizerConfig
from phitune.errors import PhituneError
from phitune.optim import build_optimizer, build_scheduler
from phitune.train.schedule import learning_rate, plan_batch, resolve_epochs


@pytest.mark.parametrize("n, expected", [(10, 10), (20, 5), (34, 3), (500, 3), (8333, 3), (8334, 2), (30000, 1), (1, 25)])
def test_auto_epochs_follow_openai_heuristic(n, expected):
    assert resolve_epochs("auto", n) == expected


@pytest.mark.parametrize("bad", ["three", 0, -1, "1.5", None])
def test_bad_epochs_are_refused_with_the_key_name(bad):
    with pytest.raises(PhituneError, match="train.epochs"):
        resolve_epochs(bad, 100)


@pytest.mark.parametrize("base, mult, cap, world, device, accum", [
    (8, 1, 8, 1, 8, 1),
    (8, 4, 8, 1, 8, 4),  # 32 examples/step = 8 x 4 accumulation
    (8, 4, 8, 2, 8, 2),  # 32 = 8 x 2 x 2 devices
    (8, 2, 4, 1, 4, 4),
    (8, 1, 16, 2, 4, 1),
])
def test_batch_size_multiplier_becomes_device_batch_times_accumulation(base, mult, cap, world, device, accum):
    plan = plan_batch(base, mult, cap, world)
    assert (plan.device_batch, plan.grad_accum) == (device, accum)
    assert plan.examples_per_step == base * mult


def test_learning_rate_is_base_times_multiplier():
    assert learning_rate(2e-4, 0.5) == pytest.approx(1e-4)
    with pytest.raises(PhituneError, match="learning_rate_multiplier"):
        learning_rate(2e-4, 0)


def test_linear_schedule_warms_up_then_decays_to_zero():
    cfg = OmegaConf.structured(OptimizerConfig(warmup_ratio=0.2))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(cfg, [p], lr=1.0)
    sched = build_scheduler(cfg, opt, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2]  # warm-up over 2 steps
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[-1] < lrs[3] and opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_unknown_optimizer_is_a_clear_error():
    cfg = OmegaConf.structured(OptimizerConfig(name="adamx"))
    with pytest.raises(PhituneError, match="optimizer.name"):
        build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], lr=1.0)
