"""Exact match: the fraction of predictions equal to their reference.

phitune's own `evaluate` metric module, loaded by path (the Hub is not needed):

    evaluate.load("<phitune>/metrics/exact_match")

Both texts are normalised before comparing: leading/trailing whitespace removed and
inner runs of whitespace collapsed to one space (a model that ends with a newline
still matches). `ignore_case` and `ignore_punctuation` loosen it further.
"""
import re
import string
import unicodedata

import datasets
import evaluate

_DESCRIPTION = __doc__
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): one reference text per prediction.
    ignore_case (bool): compare lower-cased texts. Default False.
    ignore_punctuation (bool): drop punctuation characters (Unicode category P*) first. Default False.
Returns:
    exact_match (float): matches / examples, in [0, 1] (0.0 for no examples).
Example:
    >>> em = evaluate.load("src/phitune/metrics/exact_match")
    >>> em.compute(predictions=["Hello  world "], references=["Hello world"])
    {'exact_match': 1.0}
"""


def _strip_punctuation(text: str) -> str:
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("P") and ch not in string.punctuation)


def normalize(text: str, ignore_case: bool = False, ignore_punctuation: bool = False) -> str:
    if ignore_punctuation:
        text = _strip_punctuation(text)
    if ignore_case:
        text = text.lower()
    return re.sub(r"\s+", " ", text).strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False, ignore_punctuation=False):
        if not predictions:
            return {"exact_match": 0.0}
        hits = sum(normalize(p, ignore_case, ignore_punctuation) == normalize(r, ignore_case, ignore_punctuation)
                   for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions)}
