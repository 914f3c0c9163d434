"""Export a fine-tuned model for other runtimes: `phitune export MODEL_URI --out DIR [--merged]`.

    adapter (default)  DIR/adapter_config.json, adapter_model.safetensors   the peft adapter as peft saves it
                       DIR/tokenizer files (chat template included), README.md (model card)
    --merged           DIR/config.json, model*.safetensors, generation_config.json   the base with the adapter
                       merged in, loadable by plain transformers (AutoModelForCausalLM.from_pretrained(DIR))
                       DIR/tokenizer files (chat template included), README.md

The adapter folder is what vLLM's `--enable-lora --lora-modules NAME=DIR` and llama.cpp's
`convert_lora_to_gguf.py DIR --base BASE` take; the merged folder is what `vllm serve DIR`
and llama.cpp's `convert_hf_to_gguf.py DIR` take.

The export is written to a temporary sibling folder, then checked: the greedy answer
of the exported model (reloaded from disk the way another runtime would) must equal
the served model's on a few prompts (phitune.modeling.generate, the same decoding as
`phitune serve`). Only then is it renamed to DIR, so DIR is either a checked export or
absent.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from phitune.errors import PhituneError

CHECK_PROMPTS = (
    [{"role": "user", "content": "Hello! What can you help me with?"}],
    [{"role": "system", "content": "You are a helpful support assistant."},
     {"role": "user", "content": "How do I reset my password?"}],
    [{"role": "user", "content": "Summarise what you do in one sentence."}],
)
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ExportResult:
    out: Path
    merged: bool
    dtype: str
    checks: list = field(default_factory=list)  # [{"messages", "served", "exported"}]

    @property
    def matched(self) -> bool:
        return all(c["served"] == c["exported"] for c in self.checks)


def check_out_dir(out) -> Path:
    """DIR must be new or empty: an export never mixes with other files (checked before loading anything)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PhituneError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    if not out.parent.is_dir():
        raise PhituneError(f"--out {out}: its parent folder {out.parent} does not exist")
    return out


def _dtype(name: str, loaded):
    import torch

    if name not in DTYPES:
        raise PhituneError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    return loaded if name == "auto" else getattr(torch, name)


def greedy_answers(generator, prompts, max_tokens: int) -> list[str]:
    return [generator.generate(list(m), max_tokens=max_tokens, temperature=0.0)["text"] for m in prompts]


def _reload(folder: Path, source, merged: bool, dtype):
    """The export as another runtime reads it: plain transformers (merged), or the base with
    peft's PeftModel.from_pretrained(DIR) and the tokenizer saved in DIR (adapter)."""
    from phitune.modeling.generate import ChatGenerator

    if merged:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        from packaging.version import Version
        from transformers import __version__ as tf_version

        key = "dtype" if Version(tf_version) >= Version("4.56") else "torch_dtype"  # renamed in 4.56
        model = AutoModelForCausalLM.from_pretrained(str(folder), **{key: dtype})
        model.eval()
    else:
        from phitune.modeling.loader import load_for_inference

        model, tokenizer = load_for_inference(source.base_ref, str(folder))
    return ChatGenerator(model, tokenizer, source.context_length or model.config.max_position_embeddings)


def export_model(source, out, merged: bool = False, dtype: str = "auto", check: bool = True,
                 max_tokens: int = 24, prompts=CHECK_PROMPTS) -> ExportResult:
    """Write `source` (a phitune.models.uri.ModelSource) to `out`; see the module doc."""
    from phitune.modeling.generate import load_generator

    out = check_out_dir(out)
    adapter = Path(source.adapter_dir) if source.adapter_dir else None
    is_peft = adapter is not None and (adapter / "adapter_config.json").is_file()
    if not merged and not is_peft:
        what = "the base model alone" if adapter is None else "a fully fine-tuned model"
        raise PhituneError(f"{source.uri}: {what}, not a LoRA adapter; export it with --merged")
    served = load_generator(source)
    model, tokenizer = served.model, served.tokenizer
    loaded_dtype = next(model.parameters()).dtype
    target = _dtype(dtype, loaded_dtype)
    reference = greedy_answers(served, prompts, max_tokens) if check else []

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if merged:
            if is_peft:
                model = model.merge_and_unload()
            model = model.to(target)
            model.config.use_cache = True
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)  # peft: adapter_config + adapter_model
        tokenizer.save_pretrained(str(tmp))
        result = ExportResult(out, merged, str(target).replace("torch.", ""))
        if check:
            exported = greedy_answers(_reload(tmp, source, merged, loaded_dtype), prompts, max_tokens)
            result.checks = [{"messages": list(m), "served": a, "exported": b}
                             for m, a, b in zip(prompts, reference, exported)]
        (tmp / "README.md").write_text(model_card(source, result, _lora_config(tmp if not merged else adapter)),
                                       encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if check and not result.matched:
        bad = next(c for c in result.checks if c["served"] != c["exported"])
        cast = f" (cast from {str(loaded_dtype).replace('torch.', '')} to {result.dtype})" \
            if target != loaded_dtype else ""
        raise PhituneError(f"the export{cast} answers differently from the served model: for "
                           f"{bad['messages'][-1]['content']!r} served {bad['served']!r}, exported "
                           f"{bad['exported']!r}; the unchecked export is in {tmp}")
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return result


def _lora_config(folder) -> dict:
    path = Path(folder) / "adapter_config.json" if folder else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def _base_name(ref: dict) -> str:
    return ref.get("hub_id") or ref.get("path") or (f"phitune built-in {ref['builtin']}" if ref.get("builtin")
                                                    else ref.get("name") or "?")


def model_card(source, result: ExportResult, lora: dict) -> str:
    """README.md of the export: what it is, where it came from, how to load and serve it."""
    base = _base_name(source.base_ref)
    hub_base = source.base_ref.get("hub_id")
    library = "transformers" if result.merged else "peft"
    front = ["---", f"library_name: {library}", "pipeline_tag: text-generation", "tags: [phitune, lora, chat]"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front.append("---")
    name = source.model_name or source.served_name
    origin = [f"- source: `{source.uri}`" + (f" (pinned: `{source.resolved_uri}`)" if source.resolved_uri != source.uri
                                              else "")]
    if source.model_name:
        origin.append(f"- registered model: {source.model_name} version {source.model_version}")
    if source.run_id:
        origin.append(f"- MLflow run: {source.run_id}")
    if source.checkpoint:
        origin.append(f"- checkpoint: {source.checkpoint}")
    origin.append(f"- base model: {base}")
    if lora:
        origin.append(f"- LoRA: rank {lora.get('r')}, alpha {lora.get('lora_alpha')}, "
                      f"target modules {', '.join(sorted(lora.get('target_modules') or []))}")
    origin.append(f"- dtype: {result.dtype}; context length: {source.context_length or 'as the base model'} tokens")
    if result.merged:
        what = "the base model with the LoRA adapter merged into its weights"
        use = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("DIR")
tokenizer = AutoTokenizer.from_pretrained("DIR")   # its chat template is the one training used
```

- vLLM: `vllm serve DIR`
- llama.cpp: `python convert_hf_to_gguf.py DIR --outfile {name}.gguf`"""
    else:
        what = "a LoRA adapter as peft saves it (adapter_config.json, adapter_model.safetensors)"
        use = f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("BASE"), "DIR")
tokenizer = AutoTokenizer.from_pretrained("DIR")
```

- vLLM: `vllm serve BASE --enable-lora --lora-modules {name}=DIR`
- llama.cpp: `python convert_lora_to_gguf.py DIR --base BASE`

BASE is the base model above ({base})."""
    checks = ""
    if result.checks:
        def cell(text: str) -> str:  # one table cell: no line breaks, no column separators
            return " ".join(text.split()).replace("|", "\\|")

        rows = "\n".join(f"| {cell(c['messages'][-1]['content'])} | {cell(repr(c['served']))} | "
                         f"{'yes' if c['served'] == c['exported'] else 'NO'} |" for c in result.checks)
        checks = f"""
## Check

Greedy answers of this export (reloaded from disk) against the served model, same decoding as `phitune serve`:

| prompt | answer | equal |
|---|---|---|
{rows}
"""
    return "\n".join(front) + f"""

# {name}

Exported by `phitune export`: {what}. Fine-tuned with phitune on chat JSONL data; prompt it
with the chat template saved with the tokenizer here (the one training and `phitune serve` used).

{chr(10).join(origin)}

## Use

{use}
{checks}"""
