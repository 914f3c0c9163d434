"""ROUGE-L: longest common subsequence of words between a prediction and its reference.

phitune's own `evaluate` metric module, loaded by path:

    evaluate.load("<phitune>/metrics/rouge_l")

Per example (Lin, 2004, sentence level): lower-case and split into word tokens
(`\\w+`, Unicode-aware); LCS = the longest common subsequence's length;
precision = LCS / prediction tokens, recall = LCS / reference tokens,
F = 2PR / (P + R) (beta = 1, as rouge_score's fmeasure; 0 when LCS = 0; 1 when both
texts have no token). The result is the mean over examples. Unlike token F1,
word order counts: "mat the on" shares all its words with "the cat on the mat"
but only the subsequence "the on".
"""
import re

import datasets
import evaluate

_DESCRIPTION = __doc__
_CITATION = """@inproceedings{lin-2004-rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew}, booktitle={Text Summarization Branches Out}, year={2004}}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): one reference text per prediction.
Returns:
    rouge_l (float): mean per-example LCS F-measure in [0, 1].
    rouge_l_precision (float), rouge_l_recall (float): their means.
Example:
    >>> rl = evaluate.load("src/phitune/metrics/rouge_l")
    >>> rl.compute(predictions=["the cat sat on the mat"], references=["the cat is on the mat"])["rouge_l"]
    0.8333333333333334
"""


def tokens(text: str) -> list:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list, b: list) -> int:
    """Dynamic programme over one row: O(len(a) * len(b)) time, O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def prf(prediction: str, reference: str) -> tuple:
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        same = float(pred == ref)
        return same, same, same
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0, 0.0, 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return p, r, 2 * p * r / (p + r)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
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
        return {"rouge_l": sum(s[2] for s in scores) / n,
                "rouge_l_precision": sum(s[0] for s in scores) / n,
                "rouge_l_recall": sum(s[1] for s in scores) / n}
