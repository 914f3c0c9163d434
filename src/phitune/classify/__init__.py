"""task=classification: one label per example, a head on the base model's last token.

    data.py      the line format, its validator rules, loading
    labels.py    the label set (class ids = positions in it), saved with the model
    encode.py    tokens of each example; packing several into one row (head positions)
    model.py     the classifier: base + head, LoRA with the head in modules_to_save, packed forward
    ops.py       what the training loop calls for this task (batches, loss, evaluation)
    metrics.py   accuracy, macro-F1, per-class figures from a confusion matrix
    run.py       the recipe's classification steps (data, model, final report, logged model)
"""
