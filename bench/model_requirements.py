"""Logging phitune's chat model: explicit requirements vs MLflow's inferred ones (seconds).

    python bench/model_requirements.py              # 3 repeats of each, alternated
    python bench/model_requirements.py --repeats 1

Both peers log the same model (the builtin tiny Phi-3 with an untrained LoRA adapter of
rank 8) into a fresh run of a throw-away sqlite store with phitune's log_chat_model;
the only difference is pip_requirements: phitune's explicit pins (versions read from
the installed distributions, local build labels dropped) or None, which makes MLflow
infer them by loading the model in a subprocess and recording what it imports.
Printed: the wall time of each log_model call, the medians, their ratio, and the
requirements each way produced.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _adapter(dst: Path) -> Path:
    from omegaconf import OmegaConf

    from phitune.config import ModelConfig
    from phitune.modeling.loader import apply_training_method, load_model, load_tokenizer

    root = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(root / "conf/model/tiny-phi3.yaml"))
    train = OmegaConf.create({"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "bias": "none"}})
    model = apply_training_method(load_model(cfg), train, cfg)
    model.save_pretrained(str(dst), safe_serialization=True)
    load_tokenizer(cfg).save_pretrained(str(dst))
    return cfg


def _log_once(tmp: Path, cfg, adapter: Path, explicit: bool) -> tuple[float, list[str]]:
    import mlflow

    from phitune.modeling.loader import base_reference
    from phitune.tracking import pyfunc_model

    explicit_requirements = pyfunc_model.requirements
    if not explicit:
        pyfunc_model.requirements = lambda wheel=None: None  # log_model(pip_requirements=None): MLflow infers
    try:
        with mlflow.start_run():
            ref = dict(base_reference(cfg), context_length=512, method="lora")
            t0 = time.perf_counter()
            info = pyfunc_model.log_chat_model(ref, adapter)
            seconds = time.perf_counter() - t0
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{info.model_id}",
                                                    dst_path=str(tempfile.mkdtemp(dir=tmp)))
        return seconds, (Path(local) / "requirements.txt").read_text().split()
    finally:
        pyfunc_model.requirements = explicit_requirements


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import mlflow
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("bench")
        cfg = _adapter(tmp / "adapter")
        times: dict[str, list[float]] = {"explicit": [], "inferred": []}
        reqs: dict[str, list[str]] = {}
        for i in range(args.repeats):
            for peer in (("explicit", "inferred") if i % 2 == 0 else ("inferred", "explicit")):
                seconds, reqs[peer] = _log_once(tmp, cfg, tmp / "adapter", peer == "explicit")
                times[peer].append(seconds)
                print(f"{peer:9s} repeat {i + 1}: {seconds:6.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmlflow {mlflow.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    print(f"median log_chat_model: explicit {med['explicit']:.2f} s, inferred {med['inferred']:.2f} s "
          f"-> inferred / explicit = {med['inferred'] / med['explicit']:.2f}x, saved {med['inferred'] - med['explicit']:.2f} s")
    for peer, lines in reqs.items():
        print(f"{peer} requirements.txt: {' '.join(lines)}")


if __name__ == "__main__":
    main()
