"""Classification JSONL: one example per line, the conversation or text to classify and its label.

    {"messages": [{"role": "user", "content": "..."}], "label": "billing"}   system/user/assistant turns
    {"text": "...", "label": "billing"}                                       read as one user turn

Rules, each reported as `FILE:LINE: message` by phitune.data.validate.validate_file:
errors for a missing, empty or non-string label, and for a label outside the training
set (or task.labels); warnings for a class with fewer than 5 examples or under 5% of
the file (imbalance). The summary counts the labels.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Optional

from phitune.data.validate import Problem, _json_type, check_messages, iter_json_lines, validate_file

KEYS = ("messages", "text", "label")
MIN_PER_CLASS = 5  # examples; fewer and the class is barely learnt
MIN_SHARE = 0.05  # of the file's examples; less is an imbalance worth a warning


def example_messages(obj: dict) -> list:
    """The conversation the head reads: `text` is one user turn."""
    return [{"role": "user", "content": obj["text"]}] if "text" in obj else obj["messages"]


def input_errors(obj: Any) -> list[str]:
    """Errors of the input part of a line (`messages` or `text`), for training and serving alike."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object per line, got {_json_type(obj)}"]
    has_m, has_t = "messages" in obj, "text" in obj
    if has_m and has_t:
        return ['both "messages" and "text": give one of them']
    if not (has_m or has_t):
        return ['no "messages" or "text" key']
    if has_t:
        text = obj["text"]
        if not isinstance(text, str):
            return [f'"text" must be a string, got {_json_type(text)}']
        return [] if text.strip() else ['"text" is empty']
    return check_messages(obj["messages"], require_assistant=False)


class LabelCheck:
    """validate_file's `check` for classification lines; counts labels as it goes."""

    def __init__(self, known: Optional[list] = None, known_from: str = "the training set"):
        self.known = list(known) if known is not None else None
        self.known_from = known_from
        self.counts: Counter = Counter()
        self.first_line: dict = {}

    def __call__(self, obj: Any, lineno: int):
        errors = input_errors(obj)
        if not isinstance(obj, dict):
            return errors, [], None
        warnings = [f'unknown top-level key "{k}" (ignored; expected {", ".join(KEYS)})' for k in obj if k not in KEYS]
        label = obj.get("label")
        if "label" not in obj:
            errors.append('no "label" key')
        elif not isinstance(label, str):
            errors.append(f'"label" must be a string, got {_json_type(label)}')
        elif not label.strip():
            errors.append('"label" is empty')
        elif self.known is not None and label not in self.known:
            shown = ", ".join(self.known[:10]) + (" ..." if len(self.known) > 10 else "")
            errors.append(f'label {json.dumps(label)} is not in {self.known_from} ({shown})')
        if errors:
            return errors, warnings, None
        self.counts[label] += 1
        self.first_line.setdefault(label, lineno)
        return [], warnings, example_messages(obj)

    def finish(self, report, training: bool) -> None:
        """Label counts into the report; for a training file the per-class warnings."""
        report.label_counts = dict(self.counts)
        if not training:
            return
        total = sum(self.counts.values())
        for label in sorted(self.counts):
            n, line = self.counts[label], self.first_line[label]
            if n < MIN_PER_CLASS:
                _warn(report, line, f"label {json.dumps(label)} has only {n} examples (fewer than {MIN_PER_CLASS}: "
                                    "too few to learn it)")
            elif total and n / total < MIN_SHARE:
                _warn(report, line, f"label {json.dumps(label)} is {n / total:.1%} of the examples (under "
                                    f"{MIN_SHARE:.0%}: imbalanced; task.class_weights=balanced weights it up)")
        for label in self.known or []:
            if label not in self.counts:
                _warn(report, 0, f"label {json.dumps(label)} of {self.known_from} has no example in this file")


def _warn(report, line: int, message: str) -> None:
    report.n_warnings += 1
    report.problems.append(Problem(report.path, line, message, "warning"))


def validate_classification_file(path, known: Optional[list] = None, known_from: str = "task.labels",
                                 training: bool = True, **kwargs):
    """validate_file with the classification rules; `known`: the allowed labels (None = any)."""
    check = LabelCheck(known, known_from)
    report = validate_file(path, check=check, **kwargs)
    check.finish(report, training)
    return report


def iter_labelled(path):
    """(line, messages, label) of each valid line; for a file the validator accepted."""
    check = LabelCheck()
    for lineno, obj in iter_json_lines(path):
        errors, _, messages = check(obj, lineno)
        if not errors:
            yield lineno, messages, obj["label"]


class ClassificationData:
    """prepare_splits' `task`: validates the training file, then the validation file against its labels."""

    def __init__(self, labels: Optional[list] = None):
        self.fixed = [str(x) for x in labels] if labels else None
        self.train_labels: Optional[list] = None

    def validate(self, path, training: bool = True, **kwargs):
        if self.fixed:
            known, source = self.fixed, "task.labels"
        else:
            known, source = (None, "") if training else (self.train_labels, "the training set")
        report = validate_classification_file(path, known, source, training, **kwargs)
        if training:
            self.train_labels = sorted(report.label_counts or {})
        return report

    def load(self, path) -> list:
        from phitune.data.dataset import Example

        return [Example(line, messages, str(path), label) for line, messages, label in iter_labelled(path)]


def looks_like_classification(path) -> bool:
    """The first JSON object of the file has a "label" key (`phitune data validate --task auto`)."""
    try:
        with open(str(path), "rb") as f:
            for raw in f:
                text = raw.decode("utf-8-sig", errors="replace").strip()
                if text:
                    obj = json.loads(text)
                    return isinstance(obj, dict) and "label" in obj
    except (OSError, ValueError, RecursionError):
        pass
    return False
