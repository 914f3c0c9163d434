"""Data files shipped with phitune (the tiny tokenizer corpus)."""
