"""The classifier: the base model with a classification head on each example's last token.

transformers' *ForSequenceClassification (Phi3ForSequenceClassification for Phi-3) loads
the causal LM's weights into its backbone and adds `score`, a [hidden, classes] linear
head (initialised fresh: transformers says so once). Its own forward pools the last
non-pad token of each padded row; phitune's packed rows hold several examples, so
PackedClassifier runs the backbone on the row and applies the head at each example's last
position (phitune.classify.encode.pack records them): no compute on padding.

LoRA (train.method=lora): adapters on the backbone, the head trained whole through peft's
`modules_to_save`; train.method=full trains everything. save_pretrained writes what
peft or transformers write (adapter or whole model, safetensors) plus labels.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from phitune.classify.labels import load_labels, save_labels
from phitune.errors import PhituneError

HEAD = "score"  # the head's attribute on transformers' decoder-only *ForSequenceClassification


class PackedClassifier(torch.nn.Module):
    def __init__(self, model, labels: list[str]):
        super().__init__()
        self.model = model  # a *ForSequenceClassification, or a peft model around one
        self.labels = list(labels)

    def parts(self):
        """(backbone, head), through a peft wrapper: LoRA layers and the head's trained copy live in them."""
        m = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(m, m.base_model_prefix), getattr(m, HEAD)

    def get_decoder(self):
        """The backbone, whose `layers` train.compile=true compiles (phitune.modeling.loader.compile_layers),
        as it does a causal LM's."""
        return self.parts()[0]

    def forward(self, input_ids, last, position_ids=None, attention_mask=None):
        """[examples, classes] logits. A packed row: input_ids [1, T], `last` [B] positions in it;
        padded rows: input_ids [B, L] with attention_mask, `last` [B] the last real token per row."""
        backbone, head = self.parts()
        # use_cache=False: with a cache, packed position_ids are not read as sequence starts
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state
        rows = torch.zeros_like(last) if hidden.size(0) == 1 else torch.arange(hidden.size(0), device=last.device)
        return head(hidden[rows, last])

    # train.gradient_checkpointing (phitune.train.memory): the decoder layers of the wrapped model
    def activation_checkpointing_enable(self, **kwargs) -> None:
        inner = self.model
        (getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable)(
            **{("gradient_checkpointing_kwargs" if not hasattr(inner, "activation_checkpointing_enable") else k): v
               for k, v in kwargs.items()})

    def save_pretrained(self, folder, **kwargs) -> None:
        self.model.save_pretrained(str(folder), **kwargs)
        save_labels(folder, self.labels)


def _configure(model, labels: list[str], pad_id) -> None:
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.config.pad_token_id = pad_id


def build_classifier(model_cfg, train_cfg, labels: list[str], pad_id, device="cpu") -> PackedClassifier:
    """The trainable classifier for a run: base weights, a fresh head, LoRA or full."""
    from transformers import AutoModelForSequenceClassification

    from phitune.modeling.loader import apply_training_method, load_model

    model = load_model(model_cfg, device=device, auto_class=AutoModelForSequenceClassification,
                       num_labels=len(labels), pad_token_id=pad_id)
    _configure(model, labels, pad_id)
    if not hasattr(model, HEAD):
        raise PhituneError(f"{type(model).__name__} has no `{HEAD}` head; phitune's classification task supports "
                           "decoder-only models (Phi-3, Llama, Mistral, Qwen...)")
    model = apply_training_method(model, train_cfg, model_cfg, task_type="SEQ_CLS", modules_to_save=[HEAD])
    return PackedClassifier(model, labels)


def load_classifier(base_ref: dict, folder: str, device="cpu") -> tuple[PackedClassifier, object]:
    """(classifier in eval mode, tokenizer) from a folder save_pretrained wrote (adapter or whole model)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from phitune.modeling.loader import _model_cfg_from_ref, _tokenizer_from, load_model, load_tokenizer

    labels = load_labels(folder)
    if labels is None:
        raise PhituneError(f"{folder}: no labels.json; not a phitune classifier")
    model_cfg = _model_cfg_from_ref(base_ref)
    adapter = Path(folder)
    full = not (adapter / "adapter_config.json").is_file()
    if full:
        model_cfg.path = str(adapter)
    if model_cfg.attn_implementation == "packed_sdpa":
        model_cfg.attn_implementation = "sdpa"  # served requests are padded rows, never packed
    tokenizer = (_tokenizer_from(str(adapter), {"trust_remote_code": bool(model_cfg.trust_remote_code)})
                 if (adapter / "tokenizer_config.json").is_file() else load_tokenizer(model_cfg))
    model = load_model(model_cfg, device=device, auto_class=AutoModelForSequenceClassification,
                       num_labels=len(labels), pad_token_id=tokenizer.pad_token_id)
    _configure(model, labels, tokenizer.pad_token_id)
    if not full:
        model = PeftModel.from_pretrained(model, str(adapter)).to(device)
    clf = PackedClassifier(model, labels).eval()
    return clf, tokenizer
