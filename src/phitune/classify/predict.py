"""Classify inputs with a trained classifier: what the MLflow model and the endpoint run.

An input is a text (read as one user turn, as in training) or a messages list. The
answer per input: the label with the highest probability and every label's probability.
"""
from __future__ import annotations

import threading

from phitune.errors import PhituneError

BATCH = 16  # inputs per packed forward pass


def as_messages(item, where: str = "input") -> list:
    """A text or a messages list -> messages; PhituneError saying what is wrong otherwise."""
    from phitune.classify.data import input_errors

    obj = {"text": item} if isinstance(item, str) else {"messages": item}
    errors = input_errors(obj)
    if errors:
        raise PhituneError(f"{where}: {errors[0].replace(chr(34) + 'text' + chr(34), 'the text')}")
    return [{"role": "user", "content": item}] if isinstance(item, str) else item


class Classifier:
    def __init__(self, model, tokenizer, context_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.labels = list(model.labels)
        self.context_length = int(context_length)
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()  # one forward pass at a time (servers answer on several threads)

    @classmethod
    def load(cls, base_ref: dict, folder: str, device="cpu") -> "Classifier":
        from phitune.classify.model import load_classifier

        model, tokenizer = load_classifier(base_ref, folder, device)
        return cls(model, tokenizer, int(base_ref.get("context_length") or 4096))

    def classify(self, inputs: list) -> tuple[list[dict], int]:
        """([{"label", "scores": {label: probability}}], prompt tokens) for texts or messages lists."""
        from phitune.classify.encode import ClassEncoded, input_ids
        from phitune.classify.run import predict

        many = len(inputs) > 1
        msgs = [as_messages(x, f"input[{i}]" if many else "input") for i, x in enumerate(inputs)]
        encoded = [ClassEncoded(input_ids(self.tokenizer, m, self.context_length), -1) for m in msgs]
        with self._lock:
            probs = predict(self.model, encoded, BATCH, self.device)
        data = [{"label": self.labels[max(range(len(p)), key=p.__getitem__)],
                 "scores": {name: float(x) for name, x in zip(self.labels, p)}} for p in probs]
        return data, sum(len(e.input_ids) for e in encoded)
