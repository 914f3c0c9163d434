"""`phitune export MODEL_URI --out DIR [--merged]`: the model as a folder other runtimes load.

    phitune export models:/support-bot@champion --out exports/support-bot-lora           # peft adapter + tokenizer
    phitune export models:/support-bot@champion --out exports/support-bot --merged       # merged safetensors model
    phitune export runs:/<RUN_ID>/model --out exports/x --merged --dtype bfloat16
"""
from __future__ import annotations

import sys

from phitune.errors import PhituneError


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model as a peft adapter folder or a merged transformers model",
                              description=" ".join(__doc__.split("\n\n")[0].split()),
                              epilog="The adapter folder is what vLLM's --enable-lora and llama.cpp's "
                                     "convert_lora_to_gguf.py take; the merged folder is what `vllm serve DIR`, "
                                     "llama.cpp's convert_hf_to_gguf.py and transformers' from_pretrained take.")
    p.add_argument("model_uri", metavar="MODEL_URI",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder to write")
    p.add_argument("--merged", action="store_true",
                   help="merge the adapter into the base and write the whole model (safetensors)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype with --merged (default auto: the dtype the model is served in)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check that the export's greedy answers equal the served model's")
    p.add_argument("--check-tokens", type=int, default=24, metavar="N",
                   help="tokens per check answer (default: 24)")
    p.add_argument("--model", metavar="NAME",
                   help="base model config (conf/model/NAME.yaml) for a bare adapter folder that does not name its base")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    try:
        return _run(args)
    except PhituneError as exc:
        print(f"phitune export: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args) -> int:
    from phitune.export import check_out_dir, export_model
    from phitune.models.uri import resolve

    check_out_dir(args.out)  # before any download or load
    if args.dtype != "auto" and not args.merged:
        raise PhituneError(f"--dtype {args.dtype}: only with --merged (an adapter keeps the dtype it was trained in)")
    if args.check_tokens < 1:
        raise PhituneError(f"--check-tokens {args.check_tokens}: must be at least 1")
    model_cfg = None
    if args.model:
        from phitune.confdir import load_model_config

        model_cfg = load_model_config(args.model)
    print(f"loading {args.model_uri} ...", file=sys.stderr, flush=True)
    source = resolve(args.model_uri, args.tracking_uri, model_cfg=model_cfg)
    result = export_model(source, args.out, merged=args.merged, dtype=args.dtype, check=not args.no_check,
                          max_tokens=args.check_tokens)
    kind = "merged model" if result.merged else "LoRA adapter"
    print(f"exported {source.describe()} as a {kind} ({result.dtype}) to {result.out}")
    if result.checks:
        print(f"  check: the export's greedy answers equal the served model's on {len(result.checks)} prompts "
              f"({args.check_tokens} tokens each)")
    if result.merged:
        print(f"  load: AutoModelForCausalLM.from_pretrained('{result.out}'); vLLM: vllm serve {result.out}; "
              f"llama.cpp: convert_hf_to_gguf.py {result.out}")
    else:
        print(f"  load: PeftModel.from_pretrained(base, '{result.out}'); vLLM: --enable-lora --lora-modules "
              f"NAME={result.out}; llama.cpp: convert_lora_to_gguf.py {result.out} --base BASE")
    print(f"  model card: {result.out / 'README.md'}")
    return 0
