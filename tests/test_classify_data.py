"""task=classification, its data: the config group, the validator's rules on their lines,
the label set (sorted, fixed, saved), the splits, the sample dataset."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import phitune.config  # noqa: F401  (registers the structured configs)
from phitune.classify.data import ClassificationData, validate_classification_file
from phitune.classify.labels import label_set, load_labels, save_labels
from phitune.cli import main
from phitune.errors import DataError


def _compose(repo_root, *overrides):
    with initialize_config_dir(str(repo_root / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _tickets(n_per_label=6, labels=("billing", "shipping")):
    return [{"text": f"ticket {i} about {label}", "label": label} for label in labels for i in range(n_per_label)]


def test_chat_is_the_default_task_and_the_sweep_still_minimises_loss(repo_root):
    cfg = _compose(repo_root)
    assert cfg.task.name == "chat" and cfg.task.objective == "full_valid_loss"
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.hydra.sweeper.metric is None


def test_classification_sweeps_maximise_macro_f1_unless_told_otherwise(repo_root):
    cfg = _compose(repo_root, "task=classification")
    assert cfg.task.name == "classification" and cfg.task.objective == "full_valid_macro_f1"
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.metric == "full_valid_macro_f1"
    assert _compose(repo_root, "task=classification", "sweep=classify").hydra.sweeper.direction == "maximize"
    told = _compose(repo_root, "task=classification", "hydra.sweeper.direction=minimize")
    assert told.hydra.sweeper.direction == "minimize"
    with pytest.raises(Exception):  # a typo fails at composition
        _compose(repo_root, "task=classification", "task.label=[a]")


def test_validator_rules_on_their_lines(tmp_path):
    rows = _tickets(6) + [
        {"text": "no label here"},                                     # 13
        {"text": "number", "label": 3},                                # 14
        {"text": "empty", "label": "  "},                              # 15
        {"text": "", "label": "billing"},                              # 16
        {"messages": [{"role": "user", "content": "hi"}], "text": "x", "label": "billing"},  # 17
        {"messages": [{"role": "robot", "content": "hi"}], "label": "billing"},             # 18
        {"label": "billing"},                                          # 19
    ]
    report = validate_classification_file(_write(tmp_path / "t.jsonl", rows))
    errors = [str(p) for p in report.errors]
    assert errors == [f"{tmp_path / 't.jsonl'}:{line}: {msg}" for line, msg in [
        (13, 'no "label" key'), (14, '"label" must be a string, got number'), (15, '"label" is empty'),
        (16, '"text" is empty'), (17, 'both "messages" and "text": give one of them'),
        (18, 'message 1: role "robot" is not one of system, user, assistant'), (19, 'no "messages" or "text" key')]]
    assert report.label_counts == {"billing": 6, "shipping": 6} and not report.ok


def test_conversations_need_no_assistant_turn_but_may_have_one(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}]
             + ([{"role": "assistant", "content": "a"}] if i % 2 else []), "label": "a" if i % 3 else "b"}
            for i in range(15)]
    report = validate_classification_file(_write(tmp_path / "c.jsonl", rows))
    assert report.ok and report.n_examples == 15 and report.n_warnings == 0


def test_small_and_rare_classes_warn_at_their_first_line(tmp_path):
    rows = _tickets(30, ("billing", "shipping"))
    rows += [{"text": f"gift {i}", "label": "gift"} for i in range(3)]  # lines 61-63: 3 < 5
    rows += [{"text": f"promo {i}", "label": "promo"} for i in range(5)]  # 5 of 68: 7.4%, fine
    path = _write(tmp_path / "w.jsonl", rows + [{"text": f"more {i}", "label": "billing"} for i in range(40)])
    report = validate_classification_file(path)
    warnings = [str(p) for p in report.warnings]
    assert warnings == [f'{path}:61: warning: label "gift" has only 3 examples (fewer than 5: too few to learn it)',
                        f'{path}:64: warning: label "promo" is 4.6% of the examples (under 5%: imbalanced; '
                        'task.class_weights=balanced weights it up)']
    assert report.ok  # warnings only


def test_a_validation_label_outside_the_training_set_is_an_error(tmp_path):
    data = ClassificationData()
    data.validate(_write(tmp_path / "train.jsonl", _tickets()), training=True)
    valid = _write(tmp_path / "valid.jsonl", [{"text": "x", "label": "billing"}, {"text": "y", "label": "refund"}])
    report = data.validate(valid, training=False)
    assert [str(p) for p in report.errors] == [
        f'{valid}:2: label "refund" is not in the training set (billing, shipping)']
    assert report.warnings == []  # per-class warnings are about training files


def test_labels_sorted_stable_fixed_and_saved(tmp_path):
    assert label_set(["shipping", "billing", "shipping", "account"]) == ["account", "billing", "shipping"]
    assert label_set(["b", "a"], fixed=["b", "a", "c"]) == ["b", "a", "c"]  # task.labels: the given order
    save_labels(tmp_path, ["account", "billing"])
    assert load_labels(tmp_path) == ["account", "billing"] and load_labels(tmp_path / "none") is None


def test_prepare_splits_keeps_labels_and_refuses_unknown_ones(tmp_path):
    from omegaconf import OmegaConf

    from phitune.config import DataConfig
    from phitune.data.dataset import prepare_splits

    train = _write(tmp_path / "train.jsonl", _tickets(10))
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"train_file": str(train), "validation": "auto"})
    splits = prepare_splits(cfg, task=ClassificationData())
    assert len(splits.train) + len(splits.valid) == 20 and {e.label for e in splits.train} == {"billing", "shipping"}
    assert splits.train[0].messages == [{"role": "user", "content": "ticket 0 about billing"}]
    fixed = OmegaConf.merge(cfg, {"validation": "none"})
    with pytest.raises(DataError):
        prepare_splits(fixed, task=ClassificationData(labels=["billing"]))  # shipping is not in task.labels


def test_cli_detects_classification_data_and_exits_1_on_errors(tmp_path, capsys):
    good = _write(tmp_path / "good.jsonl", _tickets())
    assert main(["data", "validate", str(good), "--no-tokens"]) == 0
    out = capsys.readouterr().out
    assert "labels: 2 (billing 6, shipping 6)" in out and "no system message" not in out
    valid = _write(tmp_path / "valid.jsonl", [{"text": "x", "label": "refund"}])
    assert main(["data", "validate", str(valid), "--train-file", str(good), "--no-tokens"]) == 1
    assert f'{valid}:1: label "refund" is not in the labels of {good}' in capsys.readouterr().out
    # forced chat: the same file is not chat data
    assert main(["data", "validate", str(good), "--no-tokens", "--task", "chat"]) == 1


def test_sample_tickets_are_generated_and_usable(repo_root):
    gen = subprocess.run([sys.executable, "data/make_tickets.py", "--check"], cwd=repo_root, capture_output=True,
                         text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    data = ClassificationData()
    train = data.validate(repo_root / "data/tickets_train.jsonl", training=True)
    valid = data.validate(repo_root / "data/tickets_valid.jsonl", training=False)
    assert train.ok and valid.ok and train.n_warnings == 0
    assert train.n_examples >= 300 and 5 <= len(train.label_counts) <= 8


@pytest.mark.parametrize("overrides,expect", [
    ([], "full_valid_loss"),
    (["task=classification"], "full_valid_macro_f1"),
    (["task=classification", "hydra.sweeper.metric=full_valid_loss", "hydra.sweeper.direction=minimize"],
     "full_valid_loss"),  # a sweep that says otherwise gets what it optimises
])
def test_the_job_returns_the_metric_the_sweep_optimises(repo_root, overrides, expect):
    from hydra.core.hydra_config import HydraConfig

    from phitune.recipe import objective_name

    cfg = _compose(repo_root, *overrides)
    HydraConfig.instance().set_config(cfg)
    try:
        assert objective_name(cfg) == expect
    finally:
        HydraConfig.instance().cfg = None
