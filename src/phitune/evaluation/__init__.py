"""Evaluation of a fine-tuned chat model: teacher-forced loss and token accuracy on
held-out conversations, plus generation metrics (exact match, token F1, ROUGE-L,
BLEU) computed with `evaluate` through phitune's own metric modules (src/phitune/metrics/).

`suite` scores a loaded model; `source` turns a model URI into base + adapter;
`run` is what `python eval.py`, `phitune eval` and the end of a training run call.
"""
