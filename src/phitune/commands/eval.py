"""`phitune eval MODEL_URI --data FILE`: the same evaluation as `python eval.py`.

MODEL_URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model,
runs:/RUN_ID/checkpoints/epoch-002, or a local checkpoint/adapter/MLflow model folder.
The options map onto conf/eval.yaml; `--set KEY=VALUE` passes any other override.
Exit 0 when evaluated, 1 for bad data, a bad URI or a model that cannot be loaded.
"""
from __future__ import annotations

import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a model on held-out conversations (loss, perplexity, accuracy, EM, F1, ROUGE-L, BLEU)",
        description=__doc__.splitlines()[0])
    p.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME@ALIAS, runs:/RUN_ID/model, a checkpoint...")
    p.add_argument("--data", required=True, metavar="FILE", help="chat JSONL to evaluate on (validated first)")
    p.add_argument("--limit", type=int, metavar="N", help="first N conversations only (default: all)")
    p.add_argument("--generation-limit", type=int, metavar="N",
                   help="conversations that get a generated reply (default: 16; 0 = loss only)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per generated reply (default: 64)")
    p.add_argument("--model", metavar="NAME", help="base model (conf/model/NAME.yaml) for a bare adapter folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--experiment", help="experiment of the eval run when the model has no source run")
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    p.add_argument("--no-log", action="store_true", help="print the results only; log nothing to MLflow")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout at the end")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other conf/eval.yaml override")
    p.set_defaults(func=run)


def _quote(value) -> str:
    # Hydra override grammar: quote a value so paths and URIs with ':' '@' '=' pass unchanged.
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides_from(args) -> list[str]:
    out = [f"model_uri={_quote(args.model_uri)}", f"data.test_file={_quote(args.data)}"]
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        out.append(f"tracking.uri={_quote(uri)}")
    if args.experiment:
        out.append(f"tracking.experiment={_quote(args.experiment)}")
    if args.model:
        out.append(f"model={args.model}")
    for key, value in (("eval.limit", args.limit), ("eval.generation_limit", args.generation_limit),
                       ("eval.max_new_tokens", args.max_new_tokens), ("eval.device", args.device)):
        if value is not None:
            out.append(f"{key}={value}")
    if args.no_log:
        out.append("eval.log=false")
    return out + list(args.set)


def compose_eval_config(overrides: list[str]):
    """conf/eval.yaml composed with overrides, as `python eval.py` would see it."""
    from hydra import compose, initialize_config_dir

    import phitune.evaluation.config  # noqa: F401
    from phitune.confdir import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir().resolve()), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def run(args) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from phitune.errors import PhituneError
    from phitune.evaluation.run import evaluate_model_uri, quiet_libraries

    try:
        cfg = compose_eval_config(overrides_from(args))
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"phitune eval: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        out = evaluate_model_uri(cfg)
    except PhituneError as exc:
        print(f"phitune eval: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"run_id": out["run_id"], "source_run_id": out["source_run_id"], "metrics": out["metrics"]}))
    return 0
