"""Classification scores: accuracy, macro-F1, per-class precision / recall / F1, confusion matrix.

phitune's own `evaluate` metric module, loaded by path (the Hub is not needed):

    evaluate.load("<phitune>/metrics/classification")

The arithmetic is phitune.classify.metrics.scores (scikit-learn's default conventions:
zero_division=0; macro-F1 over the classes seen in references or predictions).
"""
import datasets
import evaluate

from phitune.classify.metrics import confusion, scores

_DESCRIPTION = __doc__
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    labels (list of str): the class names, in class-id order (default: "0", "1", ... up to the largest id).
Returns:
    accuracy (float), macro_f1 (float), per_class ({label: {precision, recall, f1, support}}),
    confusion_matrix (list of rows: true class; columns: predicted class).
Example:
    >>> m = evaluate.load("src/phitune/metrics/classification")
    >>> m.compute(predictions=[0, 1, 1], references=[0, 1, 0], labels=["a", "b"])["accuracy"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        n = len(labels) if labels is not None else 1 + max([*predictions, *references], default=-1)
        return scores(confusion(references, predictions, n), labels)
