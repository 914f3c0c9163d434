"""Cost before compute: billed tokens from the validated data, estimates, max_cost."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from phitune.azure.cost import CostEstimate, TokenEstimate, check_budget, estimate_cost, token_estimate
from phitune.azure.settings import AzureMLBackend, FoundryBackend
from phitune.errors import PhituneError

pytestmark = [pytest.mark.timeout(300)]


def compose_cfg(repo_root, overrides):
    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


def test_billed_tokens_are_the_model_tokenizers_count_times_epochs(repo_root, tiny_tokenizer):
    """With the tiny Phi-3's tokenizer and chat template: sum over examples of min(tokens, context) x epochs."""
    from phitune.chat import count_tokens
    from phitune.data.validate import iter_valid_examples

    cfg = compose_cfg(repo_root, ["backend=foundry", "train.epochs=2"])
    est = token_estimate(cfg)
    ctx = cfg.model.context_length
    want = sum(min(count_tokens(tiny_tokenizer, m)[0], ctx) for _, m in iter_valid_examples(cfg.data.train_file))
    assert (est.tokens_per_epoch, est.epochs, est.billed_tokens) == (want, 2, 2 * want)
    assert est.exact and "tiny-phi3 tokenizer" in est.counted_with


def test_auto_split_bills_only_the_training_part(repo_root, monkeypatch):
    from azure_transport import fast_token_counter

    fast_token_counter(monkeypatch)
    whole = token_estimate(compose_cfg(repo_root, ["data=auto-split", "data.validation=none"]))
    split = token_estimate(compose_cfg(repo_root, ["data=auto-split"]))
    assert split.n_examples == whole.n_examples - round(0.1 * whole.n_examples)
    assert split.tokens_per_epoch < whole.tokens_per_epoch


def test_epochs_auto_and_sweep_candidates(repo_root, monkeypatch):
    from azure_transport import fast_token_counter

    fast_token_counter(monkeypatch)
    cfg = compose_cfg(repo_root, ["train.epochs=auto"])
    assert token_estimate(cfg).epochs == 3  # 360 examples: 3 epochs keeps 1,080 passes within 100..25,000
    assert token_estimate(cfg, epochs=[1, 2, 5]).epochs == 5  # a sweep bills its largest candidate


TOKENS = TokenEstimate(n_examples=100, tokens_per_epoch=50_000, epochs=3, counted_with="test", exact=True)


@pytest.mark.parametrize("settings, trials, amount", [
    (FoundryBackend(price_per_1k_tokens=0.002), 1, 0.3),  # 150,000 / 1000 x 0.002
    (AzureMLBackend(price_per_node_hour=4.0, estimated_hours=1.5, instance_count=2), 1, 12.0),
    (AzureMLBackend(price_per_node_hour=3.6, tokens_per_second=500.0), 1, 0.3),  # 150,000 / 500 / 3600 h
    (AzureMLBackend(price_per_node_hour=4.0, estimated_hours=0.5), 10, 20.0),  # x 10 trials
    (AzureMLBackend(), 1, None),
    (AzureMLBackend(price_per_node_hour=4.0), 1, None),  # hours unknown
])
def test_estimates(settings, trials, amount):
    est = estimate_cost(settings, TOKENS, trials=trials)
    assert est.amount == (pytest.approx(amount) if amount is not None else None)


def test_max_cost():
    check_budget(AzureMLBackend(max_cost=10.0), CostEstimate(9.99, "x"))
    check_budget(AzureMLBackend(), CostEstimate(None, "no price"))  # no limit, no estimate: fine
    with pytest.raises(PhituneError, match="over backend.max_cost=10.0"):
        check_budget(AzureMLBackend(max_cost=10.0), CostEstimate(10.01, "x"))
    with pytest.raises(PhituneError, match="cannot be estimated"):
        check_budget(AzureMLBackend(max_cost=10.0), CostEstimate(None, "no price configured"))
