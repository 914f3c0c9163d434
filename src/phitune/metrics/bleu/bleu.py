"""BLEU: corpus-level modified n-gram precision with a brevity penalty (Papineni et al., 2002).

phitune's own `evaluate` metric module, loaded by path:

    evaluate.load("<phitune>/metrics/bleu")

Tokens: words and single punctuation marks (`\\w+|[^\\w\\s]`), case-sensitive
unless `lowercase=True`. For n = 1..max_order, every prediction n-gram counts at
most as often as it occurs in one reference (clipping); p_n = clipped matches /
prediction n-grams, summed over the whole corpus. BLEU = BP * exp(mean(log p_n)),
0 if any p_n is 0 (unless `smooth`, which uses (matches + 1) / (n-grams + 1) for
every order, as Lin & Och 2004 and Hugging Face's bleu do). BP = 1 if the
prediction length c exceeds the reference length r, else exp(1 - r / c); r sums,
over examples, the reference length closest to the prediction's (the shorter on a
tie).
"""
import collections
import math
import re

import datasets
import evaluate

_DESCRIPTION = __doc__
_CITATION = """@inproceedings{papineni-etal-2002-bleu,
  title={{B}leu: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL}, year={2002}}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str, or list of lists of str): reference(s) per prediction.
    max_order (int): longest n-gram. Default 4.
    smooth (bool): add-one smoothing of every p_n. Default False.
    lowercase (bool): compare lower-cased tokens. Default False.
Returns:
    bleu (float) in [0, 1], precisions (list of p_n), brevity_penalty, length_ratio (c / r),
    translation_length (c), reference_length (r).
Example:
    >>> bleu = evaluate.load("src/phitune/metrics/bleu")
    >>> round(bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on a mat"])["bleu"], 6)
    0.537285
"""


def tokens(text: str, lowercase: bool = False) -> list:
    return re.findall(r"\w+|[^\w\s]", text.lower() if lowercase else text)


def ngrams(toks: list, n: int) -> collections.Counter:
    return collections.Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def corpus_bleu(predictions, references, max_order=4, smooth=False, lowercase=False) -> dict:
    matches = [0] * max_order
    possible = [0] * max_order
    c = r = 0
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        p_toks = tokens(pred, lowercase)
        r_toks = [tokens(x, lowercase) for x in refs] or [[]]
        c += len(p_toks)
        r += min((abs(len(t) - len(p_toks)), len(t)) for t in r_toks)[1]
        for n in range(1, max_order + 1):
            max_ref = collections.Counter()
            for t in r_toks:
                max_ref |= ngrams(t, n)  # per n-gram, the most any one reference has
            pred_ngrams = ngrams(p_toks, n)
            matches[n - 1] += sum((pred_ngrams & max_ref).values())
            possible[n - 1] += sum(pred_ngrams.values())
    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible)]
    else:
        precisions = [m / p if p else 0.0 for m, p in zip(matches, possible)]
    geo = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    ratio = c / r if r else 0.0
    if c == 0:
        bp = 0.0
    else:
        bp = 1.0 if c > r else math.exp(1 - r / c)
    return {"bleu": geo * bp, "precisions": precisions, "brevity_penalty": bp, "length_ratio": ratio,
            "translation_length": c, "reference_length": r}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"), id="sequence")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, max_order=4, smooth=False, lowercase=False):
        return corpus_bleu(predictions, references, int(max_order), bool(smooth), bool(lowercase))
