"""Load the training (and validation) chat JSONL into examples and split them.

Every file is validated first, so bad data stops a run before any model is
loaded. `validation` is one of
  file  use data.validation_file;
  auto  hold out a seeded `auto_fraction` of the training file (Azure's automatic split);
  none  no validation set.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Optional

from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from phitune.data.validate import ValidationReport, canonical_json, iter_valid_examples, validate_file
from phitune.errors import DataError

MODES = ("file", "auto", "none")
PRINT_PROBLEMS = 50  # per file; `phitune data validate` shows them all


@dataclass
class Example:
    line: int  # 1-based line in `source`
    messages: list
    source: str  # path of the file it came from
    label: Optional[str] = None  # task=classification: the example's class


@dataclass
class Splits:
    train: list
    valid: list
    mode: str  # "file" | "auto" | "none"
    auto_fraction: Optional[float]  # set in auto mode
    overlap: int  # validation examples whose messages also appear in train
    train_digest: str  # sha256 hex of the examples' canonical JSON: same data, same digest
    valid_digest: Optional[str]  # None when there is no validation set
    digest: str  # of both
    train_report: Optional[ValidationReport] = None
    valid_report: Optional[ValidationReport] = None


def _messages_key(messages: list) -> str:
    """Canonical JSON of what the model sees: roles, names and contents (weights ignored)."""
    return canonical_json([{k: v for k, v in m.items() if k != "weight"} for m in messages])


def examples_digest(examples: list) -> str:
    """sha256 hex over the canonical JSON of each example's messages, one per line, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(canonical_json(ex.messages if ex.label is None else [ex.messages, ex.label]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _check(path: str, token_counter, context_length, allow_warnings: bool,
           control_tokens=(), task=None, training: bool = True) -> "tuple[ValidationReport, Optional[str]]":
    """Validate one file, print its problems to stderr; return (report, failure message or None)."""
    kwargs = dict(token_counter=token_counter, context_length=context_length, control_tokens=control_tokens)
    report = task.validate(path, training=training, **kwargs) if task is not None else validate_file(path, **kwargs)
    for problem in report.problems[:PRINT_PROBLEMS]:
        print(problem, file=sys.stderr)
    rest = report.n_errors + report.n_warnings - min(len(report.problems), PRINT_PROBLEMS)
    if rest > 0:
        print(f"... and {rest} more problems in {path}", file=sys.stderr)
    hint = f"run `phitune data validate {path}` for all of them"
    if not report.readable:
        return report, f"{path}: cannot read it"
    if report.n_errors:
        return report, f"{path}: {report.n_errors} errors; {hint}"
    if report.n_warnings and not allow_warnings:
        return report, f"{path}: {report.n_warnings} warnings and data.allow_warnings=false; {hint}"
    return report, None


def _load(path: str, task=None) -> list:
    try:
        if task is not None:
            return task.load(path)
        return [Example(line, messages, path) for line, messages in iter_valid_examples(path)]
    except OSError as exc:  # the file changed since it was validated
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def auto_split(examples: list, fraction: float, seed: int) -> "tuple[list, list]":
    """Hold out round(fraction * n) examples (at least 1, at most n - 1).

    Which ones depends only on the seed and each example's content, not on its
    position: editing other lines of the file does not reshuffle the split.
    Both halves keep file order.
    """
    n = len(examples)
    if n < 2:
        raise DataError(f"data.validation=auto needs at least 2 examples to split; the training file has {n}")
    k = min(max(1, round(fraction * n)), n - 1)

    def rank(i: int) -> tuple:
        key = f"{seed}\n{canonical_json(examples[i].messages)}".encode("utf-8")
        return hashlib.sha256(key).digest(), i  # index breaks ties between duplicates

    held = set(sorted(range(n), key=rank)[:k])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    valid = [ex for i, ex in enumerate(examples) if i in held]
    return train, valid


def prepare_splits(data_cfg, token_counter=None, context_length=None, control_tokens=(), task=None) -> Splits:
    """Validate, load and split the data of a `phitune.config.DataConfig`; DataError when unusable.

    task: another task's file format, with validate(path, training, **kwargs) and load(path)
    (phitune.classify.data.ClassificationData); None = chat."""
    mode = str(data_cfg.get("validation", "file"))
    if mode not in MODES:
        raise DataError(f"data.validation={mode!r}: expected one of {', '.join(MODES)}")
    try:
        train_file = str(data_cfg.train_file)
        valid_file = data_cfg.get("validation_file")
    except MissingMandatoryValue:  # DataConfig's ??? default
        raise DataError("data.train_file is not set: add data.train_file=PATH to the command line") from None
    except OmegaConfBaseException as exc:  # e.g. a broken ${...} interpolation in a path
        raise DataError(f"data config: {' '.join(str(exc).split())}") from None
    if mode == "file" and not valid_file:
        raise DataError(
            "data.validation=file but data.validation_file is not set: add data.validation_file=PATH, "
            "or data.validation=auto to hold out part of the training file, or data.validation=none"
        )
    fraction = float(data_cfg.get("auto_fraction", 0.1))
    if mode == "auto" and not 0.0 < fraction < 1.0:
        raise DataError(f"data.auto_fraction={fraction}: expected a fraction between 0 and 1")
    if context_length is None:
        context_length = data_cfg.get("max_seq_len")
    allow_warnings = bool(data_cfg.get("allow_warnings", True))

    # Validate every file before loading anything, and report all failures at once.
    files = [train_file] + ([str(valid_file)] if mode == "file" else [])
    reports, failures = [], []
    for i, path in enumerate(files):
        report, failure = _check(path, token_counter, context_length, allow_warnings, control_tokens, task, i == 0)
        reports.append(report)
        if failure:
            failures.append(failure)
    if failures:
        raise DataError("\n".join(failures))

    train = _load(train_file, task)
    if mode == "file":
        valid = _load(str(valid_file), task)
    elif mode == "auto":
        train, valid = auto_split(train, fraction, int(data_cfg.get("split_seed", 42)))
    else:
        valid = []

    train_keys = {_messages_key(ex.messages) for ex in train}
    overlap = sum(_messages_key(ex.messages) in train_keys for ex in valid)
    if overlap:
        print(
            f"warning: {overlap} of {len(valid)} validation examples also appear in the training data; "
            "valid_loss will look better than it is",
            file=sys.stderr,
        )
    train_digest = examples_digest(train)
    valid_digest = examples_digest(valid) if mode != "none" else None
    digest = hashlib.sha256(f"train:{train_digest}\nvalid:{valid_digest or ''}\n".encode()).hexdigest()
    return Splits(
        train=train,
        valid=valid,
        mode=mode,
        auto_fraction=fraction if mode == "auto" else None,
        overlap=overlap,
        train_digest=train_digest,
        valid_digest=valid_digest,
        digest=digest,
        train_report=reports[0],
        valid_report=reports[1] if len(reports) > 1 else None,
    )
