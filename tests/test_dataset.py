"""phitune.data.dataset.prepare_splits: validation before loading, file/auto/none
splits, overlap, digests; and the sample data shipped in data/."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from phitune.config import DataConfig
from phitune.data.dataset import Example, auto_split, prepare_splits
from phitune.data.validate import validate_file
from phitune.errors import DataError


def example_line(i: int, system: bool = True) -> str:
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return json.dumps({"messages": messages})


def write(path: Path, lines, *, eol: str = "\n", bom: bool = False) -> str:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(line + eol for line in lines).encode("utf-8"))
    return str(path)


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


@pytest.fixture
def train_file(tmp_path) -> str:
    return write(tmp_path / "train.jsonl", [example_line(i) for i in range(40)])


@pytest.fixture
def valid_file(tmp_path) -> str:
    return write(tmp_path / "valid.jsonl", [example_line(i) for i in range(100, 110)])


def test_file_mode(train_file, valid_file, capsys):
    splits = prepare_splits(data_cfg(train_file=train_file, validation_file=valid_file, validation="file"))
    assert splits.mode == "file" and splits.auto_fraction is None
    assert len(splits.train) == 40 and len(splits.valid) == 10
    assert splits.train[3] == Example(line=4, messages=json.loads(example_line(3))["messages"], source=train_file)
    assert splits.valid[0].source == valid_file and splits.valid[0].line == 1
    assert splits.overlap == 0
    assert splits.train_report.n_examples == 40 and splits.valid_report.n_examples == 10
    assert capsys.readouterr().err == ""  # clean data: nothing printed


def test_file_mode_without_a_validation_file(train_file):
    with pytest.raises(DataError, match=r"data.validation=file but data.validation_file is not set"):
        prepare_splits(data_cfg(train_file=train_file, validation="file"))


def test_none_mode(train_file):
    splits = prepare_splits(data_cfg(train_file=train_file, validation="none"))
    assert splits.mode == "none" and splits.valid == [] and splits.valid_digest is None
    assert len(splits.train) == 40


def test_bad_config_values(train_file):
    with pytest.raises(DataError, match=r"data.validation='sometimes': expected one of file, auto, none"):
        prepare_splits(data_cfg(train_file=train_file, validation="sometimes"))
    with pytest.raises(DataError, match=r"data.auto_fraction=1.5"):
        prepare_splits(data_cfg(train_file=train_file, validation="auto", auto_fraction=1.5))
    with pytest.raises(DataError, match=r"data.train_file is not set"):
        prepare_splits(data_cfg(validation="none"))


# ------------------------------------------------------------------ auto split
def test_auto_split_fraction_and_order(train_file):
    splits = prepare_splits(data_cfg(train_file=train_file, validation="auto", auto_fraction=0.25, split_seed=7))
    assert splits.mode == "auto" and splits.auto_fraction == 0.25
    assert len(splits.valid) == 10 and len(splits.train) == 30  # round(0.25 * 40)
    train_lines = [ex.line for ex in splits.train]
    valid_lines = [ex.line for ex in splits.valid]
    assert sorted(train_lines + valid_lines) == list(range(1, 41))  # a partition
    assert train_lines == sorted(train_lines) and valid_lines == sorted(valid_lines)  # file order kept
    assert all(ex.source == train_file for ex in splits.valid)


def test_auto_split_is_deterministic_and_seeded(train_file):
    def held_out(seed):
        cfg = data_cfg(train_file=train_file, validation="auto", auto_fraction=0.2, split_seed=seed)
        return [ex.line for ex in prepare_splits(cfg).valid]

    assert held_out(1) == held_out(1)
    assert held_out(1) != held_out(2)


def test_auto_split_depends_on_content_not_position():
    examples = [Example(i + 1, json.loads(example_line(i))["messages"], "f") for i in range(30)]
    _, valid = auto_split(examples, 0.2, seed=3)
    # Insert an unrelated example at the top: the same contents are held out.
    shifted = [Example(1, json.loads(example_line(999))["messages"], "f")] + examples
    _, valid2 = auto_split(shifted, 0.2, seed=3)
    held = {ex.messages[-1]["content"] for ex in valid}
    held2 = {ex.messages[-1]["content"] for ex in valid2}
    assert len(held & held2) >= len(held) - 1  # round(0.2 * 31) = 6 vs 6: at most one swaps out


@pytest.mark.parametrize("n, fraction, expected", [(20, 0.01, 1), (20, 0.99, 19), (2, 0.5, 1), (10, 0.1, 1), (11, 0.5, 6)])
def test_auto_split_bounds(n, fraction, expected):
    examples = [Example(i + 1, json.loads(example_line(i))["messages"], "f") for i in range(n)]
    train, valid = auto_split(examples, fraction, seed=0)
    assert len(valid) == expected and len(train) == n - expected


def test_auto_split_needs_two_examples(tmp_path):
    one = write(tmp_path / "one.jsonl", [example_line(0)])
    with pytest.raises(DataError, match="needs at least 2 examples to split; the training file has 1"):
        prepare_splits(data_cfg(train_file=one, validation="auto"))


# ------------------------------------------------------------------ validation first
def test_bad_train_file_raises_before_loading(tmp_path, valid_file, capsys):
    bad = write(tmp_path / "bad.jsonl", [example_line(i) for i in range(10)] + ["oops"] * 60)
    with pytest.raises(DataError) as info:
        prepare_splits(data_cfg(train_file=bad, validation_file=valid_file))
    assert str(info.value) == f"{bad}: 60 errors; run `phitune data validate {bad}` for all of them"
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{bad}:11: invalid JSON: Expecting value at column 1"
    assert len(err) == 51 and err[49] == f"{bad}:60: invalid JSON: Expecting value at column 1"
    assert err[50] == f"... and 10 more problems in {bad}"


def test_both_files_bad_are_reported_together(tmp_path):
    bad_train = write(tmp_path / "t.jsonl", [example_line(i) for i in range(10)] + ["{}"])
    bad_valid = tmp_path / "missing.jsonl"
    with pytest.raises(DataError) as info:
        prepare_splits(data_cfg(train_file=bad_train, validation_file=str(bad_valid)))
    assert str(info.value).splitlines() == [
        f"{bad_train}: 1 errors; run `phitune data validate {bad_train}` for all of them",
        f"{bad_valid}: cannot read it",
    ]


def test_warnings_pass_unless_disallowed(tmp_path, capsys):
    few = write(tmp_path / "few.jsonl", [example_line(i) for i in range(5)])
    splits = prepare_splits(data_cfg(train_file=few, validation="none"))
    assert len(splits.train) == 5
    assert capsys.readouterr().err.splitlines() == [f"{few}: warning: only 5 examples; Azure AI Foundry requires at least 10"]
    with pytest.raises(DataError, match=r"1 warnings and data.allow_warnings=false"):
        prepare_splits(data_cfg(train_file=few, validation="none", allow_warnings=False))


def test_token_counter_and_context_are_passed_to_the_validator(train_file):
    cfg = data_cfg(train_file=train_file, validation="none", max_seq_len=5)
    splits = prepare_splits(cfg, token_counter=lambda messages: (6, 2))
    stats = splits.train_report.token_stats
    assert stats["over_context"] == 40 and stats["train_per_epoch"] == 40 * 5  # capped at max_seq_len
    splits = prepare_splits(cfg, token_counter=lambda messages: (6, 2), context_length=100)
    assert splits.train_report.token_stats["over_context"] == 0


# ------------------------------------------------------------------ overlap and digests
def test_overlap_is_counted_and_warned(tmp_path, train_file, capsys):
    # Two validation examples repeat training ones; a weight on one does not hide it.
    repeat = json.loads(example_line(5))
    repeat["messages"][2]["weight"] = 1
    valid = write(tmp_path / "v.jsonl", [example_line(100), json.dumps(repeat), example_line(7), example_line(101)])
    splits = prepare_splits(data_cfg(train_file=train_file, validation_file=valid))
    assert splits.overlap == 2
    assert "warning: 2 of 4 validation examples also appear in the training data" in capsys.readouterr().err


def test_digests_are_stable_and_content_based(tmp_path, train_file, valid_file):
    cfg = data_cfg(train_file=train_file, validation_file=valid_file)
    first = prepare_splits(cfg)
    again = prepare_splits(cfg)
    assert (first.train_digest, first.valid_digest, first.digest) == (again.train_digest, again.valid_digest, again.digest)
    assert len(first.digest) == 64 and first.digest not in (first.train_digest, first.valid_digest)

    # Same examples, other spelling of the file (BOM, CRLF, spaces, key order): same digests.
    respelt = [json.dumps(json.loads(example_line(i)), indent=None, separators=(", ", ":  "), sort_keys=True)
               for i in range(40)]
    (tmp_path / "other").mkdir()
    other = write(tmp_path / "other" / "train.jsonl", respelt, eol="\r\n", bom=True)
    moved = prepare_splits(data_cfg(train_file=other, validation_file=valid_file))
    assert moved.train_digest == first.train_digest and moved.digest == first.digest

    # One changed character changes the digests.
    changed = write(tmp_path / "changed.jsonl", [example_line(i) for i in range(39)] + [example_line(39).replace("answer", "Answer")])
    edited = prepare_splits(data_cfg(train_file=changed, validation_file=valid_file))
    assert edited.train_digest != first.train_digest and edited.digest != first.digest
    assert edited.valid_digest == first.valid_digest


def test_digest_value_is_pinned(tmp_path):
    """The digest goes into MLflow: a change of its recipe must be deliberate."""
    path = write(tmp_path / "t.jsonl", [example_line(i) for i in range(10)])
    splits = prepare_splits(data_cfg(train_file=path, validation="none"))
    assert splits.train_digest == PINNED_TRAIN_DIGEST
    assert splits.digest == PINNED_DIGEST


# sha256 over json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" per example
PINNED_TRAIN_DIGEST = "7e87083b5eff3265fbc317423871b2767dcdf0266e3333deb9effbf282d3fa0b"
PINNED_DIGEST = "7b95cce62c096c15f01930663b263c400cd561edb07a55c458cdfc5c0719543b"


# ------------------------------------------------------------------ shipped sample data
def test_sample_data_is_clean_and_disjoint(repo_root):
    train = repo_root / "data" / "support_train.jsonl"
    valid = repo_root / "data" / "support_valid.jsonl"
    reports = [validate_file(train), validate_file(valid)]
    for report in reports:
        assert report.ok and report.n_warnings == 0, [str(p) for p in report.problems]
    assert 300 <= reports[0].n_examples <= 400 and 40 <= reports[1].n_examples <= 60
    splits = prepare_splits(data_cfg(train_file=str(train), validation_file=str(valid)))
    assert splits.overlap == 0
    multi_turn = sum(sum(m["role"] == "user" for m in ex.messages) > 1 for ex in splits.train)
    assert 0.15 <= multi_turn / len(splits.train) <= 0.35
    assert any(m.get("weight") == 0 for ex in splits.train for m in ex.messages)
    words = max(sum(len(m["content"].split()) for m in ex.messages) for ex in splits.train + splits.valid)
    assert words <= 250


def test_sample_data_is_what_make_sample_generates(repo_root):
    spec = importlib.util.spec_from_file_location("make_sample", repo_root / "data" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    train, valid = make_sample.generate()
    assert make_sample.to_jsonl(train) == (repo_root / "data" / "support_train.jsonl").read_text(encoding="utf-8")
    assert make_sample.to_jsonl(valid) == (repo_root / "data" / "support_valid.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize("group, mode, n_valid", [("sample", "file", None), ("auto-split", "auto", 36)])
def test_composed_data_groups(repo_root, group, mode, n_valid):
    """conf/data/*.yaml through Hydra, as train.py composes them."""
    import phitune.config  # noqa: F401  (registers phitune_base)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"data={group}"])
    splits = prepare_splits(cfg.data)
    assert splits.mode == mode and splits.overlap == 0
    if n_valid is not None:
        assert len(splits.valid) == n_valid  # round(0.1 * 360)
        assert len(splits.train) + len(splits.valid) == 360
