"""Token F1: bag-of-words overlap between a prediction and its reference (SQuAD style).

phitune's own `evaluate` metric module, loaded by path:

    evaluate.load("<phitune>/metrics/token_f1")

Per example: lower-case, drop punctuation characters, split on whitespace; the
common tokens are the multiset intersection; precision = common / prediction
tokens, recall = common / reference tokens, F1 = 2PR / (P + R) (0 when nothing is
in common; 1 when both texts have no token). The result is the mean over examples.
Unlike SQuAD's script, English articles are kept (the measure is language-neutral).
"""
import collections
import string
import unicodedata

import datasets
import evaluate

_DESCRIPTION = __doc__
_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
  title={{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={EMNLP}, year={2016}}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): one reference text per prediction.
Returns:
    token_f1 (float): mean per-example F1 in [0, 1].
    token_precision (float), token_recall (float): their means.
Example:
    >>> f1 = evaluate.load("src/phitune/metrics/token_f1")
    >>> f1.compute(predictions=["Open Settings"], references=["open the settings page"])["token_f1"]
    0.6666666666666666
"""


def tokens(text: str) -> list:
    text = "".join(ch for ch in text.lower()
                   if not unicodedata.category(ch).startswith("P") and ch not in string.punctuation)
    return text.split()


def prf(prediction: str, reference: str) -> tuple:
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        same = float(pred == ref)  # both empty: a perfect (empty) answer
        return same, same, same
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    p, r = common / len(pred), common / len(ref)
    return p, r, 2 * p * r / (p + r)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [prf(p, r) for p, r in zip(predictions, references)]
        n = max(1, len(scores))
        return {"token_f1": sum(s[2] for s in scores) / n,
                "token_precision": sum(s[0] for s in scores) / n,
                "token_recall": sum(s[1] for s in scores) / n}
