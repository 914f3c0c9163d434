"""Shared fixtures: the tiny Phi-3 built once per session in a throw-away cache.

Session-scoped fixtures are shared by every test: read them, don't mutate them
(derive a changed config with OmegaConf.merge(tiny_model_cfg, {...})).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# conf/data/*.yaml resolve data files through ${oc.env:PHITUNE_ROOT,.}.
os.environ.setdefault("PHITUNE_ROOT", str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def phitune_cache(tmp_path_factory) -> Path:
    """PHITUNE_CACHE -> a fresh folder for the whole session (as on a clean CI machine).

    Autouse so that any code path reaching ensure_tiny_phi3() (config composition,
    subprocesses, which inherit os.environ) never reads or writes ~/.cache.
    """
    cache = tmp_path_factory.mktemp("phitune-cache")
    old = os.environ.get("PHITUNE_CACHE")
    os.environ["PHITUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("PHITUNE_CACHE", None)
    else:
        os.environ["PHITUNE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(phitune_cache) -> Path:
    """Folder of the tiny Phi-3 (config.json, model.safetensors, tokenizer files)."""
    from phitune.modeling.tiny import ensure_tiny_phi3

    return ensure_tiny_phi3()


@pytest.fixture(scope="session")
def tiny_model_cfg(repo_root, tiny_model_dir):
    """conf/model/tiny-phi3.yaml as a ModelConfig node (shared: don't mutate)."""
    from omegaconf import OmegaConf

    from phitune.config import ModelConfig

    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(repo_root / "conf/model/tiny-phi3.yaml"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_cfg):
    from phitune.modeling.loader import load_tokenizer

    return load_tokenizer(tiny_model_cfg)


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sp_tokenizer(tiny_tokenizer):
    """A tokenizer of Phi-3's real family, built offline: SentencePiece-style BPE (Metaspace
    pre-tokenizer with `prepend_scheme="first"`, byte fallback to `<0xNN>` pieces), Phi-3's
    added specials and chat template. The tiny model's own tokenizer is byte-level BPE."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from phitune.modeling.tiny import BASE_SPECIAL_TOKENS, PHI3_ADDED_TOKENS, PHI3_CHAT_TEMPLATE, _corpus_lines

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(_corpus_lines(), trainers.BpeTrainer(
        vocab_size=1500, min_frequency=2, special_tokens=BASE_SPECIAL_TOKENS, show_progress=False))
    bpe = json.loads(trained.to_str())["model"]
    vocab = dict(bpe["vocab"])
    for i in range(256):  # byte fallback needs every byte as a piece, as Llama's and Phi-3's vocabularies have
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(PHI3_ADDED_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>", chat_template=PHI3_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server (tests/pg.py) for the session, stopped at its end.

    Fails, never skips, when PostgreSQL is not installed: the multi-worker tests are
    the proof that sweeps work on it, and .ci/run installs it."""
    from pg import start_server

    try:
        server = start_server()
    except RuntimeError as exc:
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)
    yield server
    server.stop()
