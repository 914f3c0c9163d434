"""Sweep pruning: the default sweep pruned against the same sweep unpruned, per seed.

    python bench/sweep_pruning.py --keep DIR --seeds 0              # unpruned + the shipped pruner, seed 0
    python bench/sweep_pruning.py --keep DIR --seeds 1,2 --pruners default,hyperband
    python bench/sweep_pruning.py --keep DIR --seeds 0 --sampler random
    python bench/sweep_pruning.py --report DIR                      # the table over every seed run so far

Each sweep is `python train.py -m` (phitune's sweeper, Hydra's basic launcher) with the
default search space and settings of sweeps/default.yaml (learning-rate multiplier
log 0.2-5, batch-size multiplier 1/2/4, epochs 1-3; TPE with 5 random start-up trials),
shortened only in trial length: the training file is the first --train-examples
conversations of data/support_train.jsonl (an epoch of 48 is 6 optimizer steps of 8
examples, or 2 of 32). Validation: data/support_valid.jsonl (48). Only the pruner
differs between the sweeps of a seed:

    none        pruner.name=none
    default     sweeps/default.yaml's pruner, unchanged (what `python train.py -m` gets)
    median, percentile, successive_halving, hyperband, wilcoxon: see PRUNERS below
    sh04_rf3, sh03_rf3_f80, ...: any candidate of bench/prune_replay.py (screened offline there)

A seed's sweeps run in one invocation, peers alternated (the unpruned sweep first on
even seeds, last on odd ones); a sweep already in DIR is reused, so a pruner can be
added later against the same unpruned sweep. Invocations of about 10 minutes: split
by seed and pruner.

Per sweep: training tokens (the sum of every trial's `train_tokens`, which the job
reports to its trial: pruned trials count what they trained), CPU seconds of the
sweep's processes (one torch thread per trial, so they count work, not spinning),
wall time, and the best full_valid_loss (the objective). Per seed, pruned / unpruned:
tokens ratio, CPU ratio, best gap. Target: median tokens ratio <= 0.40 over the
seeds, no seed above 0.50, best within 2% on every seed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# On top of sweeps/default.yaml (the `default` label uses it unchanged; same_length and
# finish_from come from there unless a preset sets them).
PRUNERS = {
    # Reports every 0.1 epoch without pruning: the curves bench/prune_replay.py replays offline
    # (the extra evaluations on 16 examples cost CPU seconds, not training tokens).
    "none": ["hydra.sweeper.pruner.name=none", "hydra.sweeper.pruner.report_every=0.1"],
    "default": [],
    "median": ["hydra.sweeper.pruner.name=median", "hydra.sweeper.pruner.n_startup_trials=3",
               "hydra.sweeper.pruner.warmup=0.1"],
    "percentile": ["hydra.sweeper.pruner.name=percentile", "hydra.sweeper.pruner.percentile=25",
                   "hydra.sweeper.pruner.n_startup_trials=3", "hydra.sweeper.pruner.warmup=0.1"],
    "successive_halving": ["hydra.sweeper.pruner.name=successive_halving", "hydra.sweeper.pruner.reduction_factor=3"],
    "hyperband": ["hydra.sweeper.pruner.name=hyperband", "hydra.sweeper.pruner.reduction_factor=3"],
    # Successive halving from 0.9 epoch on (sweeps/default.yaml before same_length): rungs at 0.9
    # and 2.7 epochs, every trial against every trial.
    "sh_late": ["hydra.sweeper.pruner.name=successive_halving", "hydra.sweeper.pruner.reduction_factor=3",
                "hydra.sweeper.pruner.report_every=0.9", "hydra.sweeper.pruner.same_length=false",
                "hydra.sweeper.pruner.finish_from=1.0"],
    "wilcoxon": ["hydra.sweeper.pruner.name=wilcoxon", "hydra.sweeper.pruner.p_threshold=0.1",
                 "hydra.sweeper.pruner.warmup=0.1"],
}
TARGET_MEDIAN, TARGET_WORST, TARGET_GAP = 0.40, 0.50, 0.02


def pruner_overrides(label: str) -> list:
    """A preset above, or any candidate of bench/prune_replay.py (e.g. sh04_rf3_f70), as overrides."""
    if label in PRUNERS:
        return PRUNERS[label]
    from prune_replay import CANDIDATES

    if label not in CANDIDATES:
        sys.exit(f"--pruners: unknown {label}; expected one of {', '.join(k for k in PRUNERS if k != 'none')} "
                 "or a candidate of bench/prune_replay.py")
    return [f"hydra.sweeper.pruner.{k}={v}" for k, v in CANDIDATES[label].items()]


def subset(n: int, folder: Path) -> Path:
    lines = (REPO / "data/support_train.jsonl").read_text(encoding="utf-8-sig").splitlines()[:n]
    path = folder / f"train{n}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sweep(work: Path, label: str, seed: int, args, train_file: Path) -> dict:
    if work.exists():  # a sweep cut short (no result.json): start it again, or its CPU seconds would miss a part
        shutil.rmtree(work)
    work.mkdir(parents=True)
    storage = f"sqlite:///{work}/optuna.db"
    cmd = [sys.executable, str(REPO / "train.py"), "-m",
           f"hydra.sweeper.storage={storage}", f"tracking.uri=sqlite:///{work}/mlruns/mlflow.db",
           f"hydra.sweep.dir={work}/multirun", "hydra.sweeper.study_name=bench",
           f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.sampler.seed={seed}",
           f"hydra.sweeper.sampler.name={args.sampler}", "hydra.sweeper.plots=false", *pruner_overrides(label),
           "train.progress=false", "tracking.log_model=false",
           f"data.train_file={train_file}", f"data.validation_file={REPO}/data/support_valid.jsonl"]
    # One torch thread, as bench/train_throughput.py: on a shared 2-core machine two OpenMP
    # threads spin while waiting for each other, which inflates CPU seconds as well as wall time.
    env = dict(os.environ, PYTHONUNBUFFERED="1", PHITUNE_ROOT=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    log = work / "sweep.log"
    print(f"[seed {seed} {label}] python train.py -m ... (log: {log})", flush=True)
    t0, cpu0 = time.perf_counter(), _children_cpu()
    with open(log, "w", buffering=1) as f:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("trial ", "  trial ")):
                print(f"[seed {seed} {label}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if rc != 0:
        sys.exit(f"[seed {seed} {label}] the sweep failed (exit {rc}); see {log}")
    out = dict(summarize(storage), wall_s=wall, cpu_s=cpu, label=label, seed=seed, load=os.getloadavg()[0],
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (work / "result.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes: steadier than wall time
    on a shared machine, where other processes take turns on the same cores."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def summarize(storage: str) -> dict:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=storage)
    trials = study.get_trials(deepcopy=False)
    best = study.best_trial
    return {
        "tokens": sum(int(t.user_attrs.get("train_tokens") or 0) for t in trials),
        "unpruned_equivalent": sum(max(int(t.user_attrs.get("train_tokens") or 0), int(t.user_attrs.get("planned_tokens") or 0))
                                   if t.state == TrialState.PRUNED else int(t.user_attrs.get("train_tokens") or 0)
                                   for t in trials),
        "best": best.value, "best_trial": best.number, "best_params": best.params,
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "last_step": t.last_step, "tokens": t.user_attrs.get("train_tokens"),
                    "planned": t.user_attrs.get("planned_tokens"),
                    "duration_s": t.duration.total_seconds() if t.duration else None} for t in trials],
    }


def same_environment(pruned: dict, full: dict) -> bool:
    """Trials both sweeps completed with the same params must have the same value (the
    random start-up trials at least): otherwise the model or code changed in between."""
    ref = {json.dumps(t["params"], sort_keys=True): t["value"] for t in full["trials"] if t["state"] == "COMPLETE"}
    common = [(ref[k], t["value"]) for t in pruned["trials"] if t["state"] == "COMPLETE"
              and (k := json.dumps(t["params"], sort_keys=True)) in ref]
    return bool(common) and all(abs(a - b) <= 1e-6 * abs(a) for a, b in common)


def compare(pruned: dict, full: dict) -> dict:
    return {"tokens_ratio": pruned["tokens"] / full["tokens"], "cpu_ratio": pruned["cpu_s"] / full["cpu_s"],
            "wall_ratio": pruned["wall_s"] / full["wall_s"],
            "best_gap": (pruned["best"] - full["best"]) / full["best"],  # > 0: the pruned sweep's best is worse
            "same_environment": same_environment(pruned, full)}


def _median(xs: list) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def report(root: Path) -> int:
    """The table: one row per (sampler, pruner, seed) against that seed's unpruned sweep, then the medians."""
    results = {}
    for path in sorted(root.glob("*/*/result.json")):
        r = json.loads(path.read_text())
        results[(path.parent.parent.name, r["label"])] = r
    groups: dict = {}
    for (seed_dir, label), r in sorted(results.items()):
        if label == "none" or (seed_dir, "none") not in results:
            continue
        sampler = seed_dir.split("-", 1)[1]
        groups.setdefault((sampler, label), []).append((r["seed"], r, results[(seed_dir, "none")]))
    print(f"{'sampler':8} {'pruner':19} {'seed':>4} {'tokens none -> pruned':>23} {'tok ratio':>9} {'CPU s':>13} "
          f"{'CPU ratio':>9} {'best none -> pruned':>21} {'gap':>7} {'pruned':>7}")
    for (sampler, label), rows in sorted(groups.items()):
        ratios, gaps = [], []
        for seed, r, full in sorted(rows, key=lambda x: x[0]):
            c = compare(r, full)
            ratios.append(c["tokens_ratio"])
            gaps.append(c["best_gap"])
            warn = "" if c["same_environment"] else "  WARNING: equal params gave different values (code changed?)"
            print(f"{sampler:8} {label:19} {seed:>4} {full['tokens']:>10,} -> {r['tokens']:>9,} {c['tokens_ratio']:>9.2f} "
                  f"{full['cpu_s']:>5.0f} -> {r['cpu_s']:>4.0f} {c['cpu_ratio']:>9.2f} {full['best']:>9.4f} -> {r['best']:.4f} "
                  f"{c['best_gap']:>+7.2%} {r['pruned']:>3}/{len(r['trials'])}{warn}")
        cpu = [compare(r, full)["cpu_ratio"] for _, r, full in rows]
        ok = _median(ratios) <= TARGET_MEDIAN and max(ratios) <= TARGET_WORST and max(gaps) <= TARGET_GAP
        print(f"{sampler:8} {label:19} {'med':>4} {'':>23} {_median(ratios):>9.2f} {'':>13} {_median(cpu):>9.2f} {'':>21} "
              f"{_median(gaps):>+7.2%}  worst tokens {max(ratios):.2f}, worst gap {max(gaps):+.2%} over {len(rows)} seed(s): "
              f"target {'met' if ok else 'NOT met'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated sampler seeds")
    p.add_argument("--pruners", default="default", help=f"comma-separated, of: {', '.join(k for k in PRUNERS if k != 'none')}")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--train-examples", type=int, default=48)
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    p.add_argument("--keep", type=Path, default=None, help="folder for the sweeps (default: a temp dir); reused")
    p.add_argument("--report", type=Path, default=None, help="only print the table of the sweeps in this folder")
    args = p.parse_args()
    if args.report:
        return report(args.report)
    root = args.keep or Path(tempfile.mkdtemp(prefix="phitune-bench-pruning-"))
    root.mkdir(parents=True, exist_ok=True)
    train_file = subset(args.train_examples, root)
    pruners = [x for x in args.pruners.split(",") if x]
    for label in pruners:
        if label == "none":
            sys.exit("--pruners: `none` is every seed's reference and always runs")
        pruner_overrides(label)  # an unknown name fails before any sweep starts
    for seed in [int(s) for s in args.seeds.split(",")]:
        folder = root / f"seed{seed}-{args.sampler}"
        labels = ["none", *pruners] if seed % 2 == 0 else [*pruners, "none"]  # peers alternated
        for label in labels:
            if not (folder / label / "result.json").exists():
                sweep(folder / label, label, seed, args, train_file)
    return report(root)


if __name__ == "__main__":
    sys.exit(main())
