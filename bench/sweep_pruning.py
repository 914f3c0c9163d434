"""Sweep pruning: a 16-trial sweep with the median pruner against the same sweep without.

    python bench/sweep_pruning.py                       # 2 sweeps x 16 trials on the tiny Phi-3
    python bench/sweep_pruning.py --trials 6 --max-steps 6     (a quick look)
    python bench/sweep_pruning.py --keep /tmp/pruning          (keep the stores to inspect)

Both sweeps run `python train.py -m` (phitune's sweeper, Hydra's basic launcher) with
the same search space, sampler and seed; only hydra.sweeper.pruner differs:

- model: the builtin tiny Phi-3; data: data/support_train.jsonl / support_valid.jsonl;
- space: train.learning_rate_multiplier = tag(log, interval(0.1, 10)),
  train.lora.rank = choice(4, 8, 16); fixed: 1 epoch capped at --max-steps optimizer
  steps of 8 examples (batch_size_multiplier 1), valid_loss reported every
  --eval-steps steps;
- sampler: TPE (--sampler random for pure exploration), seed --seed, 5 random
  start-up trials;
- pruned: median pruner, no pruning before 4 trials completed, a trial can be pruned
  from its first report on; unpruned: pruner none.

Measured per sweep: training tokens processed (the sum of every trial's
`train_tokens`, which the job reports to its trial), wall time of the command, and
the best full_valid_loss (the objective: the final full validation loss of a
trial). Tokens and losses are deterministic for a seed; wall time depends on the
machine's load (printed with it), so CPU seconds of the sweep's processes are shown
too, with one torch thread per trial (--threads) so that they count work, not spinning.

Target: the pruned best within 2% of the unpruned best, for at most 60% of
the unpruned sweep's training tokens.
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
SPACE = ["train.learning_rate_multiplier=tag(log, interval(0.1, 10.0))", "train.lora.rank=choice(4, 8, 16)"]
PRUNERS = {
    "median": ["hydra.sweeper.pruner.name=median", "hydra.sweeper.pruner.n_startup_trials=4",
               "hydra.sweeper.pruner.n_warmup_steps=0"],
    "none": ["hydra.sweeper.pruner.name=none"],
}


def sweep(label: str, pruner: list[str], args, root: Path) -> dict:
    work = root / label
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work}/optuna.db"
    cmd = [sys.executable, str(REPO / "train.py"), "-m",
           f"hydra.sweeper.storage={storage}", f"tracking.uri=sqlite:///{work}/mlruns/mlflow.db",
           f"hydra.sweep.dir={work}/multirun", "hydra.sweeper.study_name=bench",
           f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.sampler.seed={args.seed}",
           f"hydra.sweeper.sampler.name={args.sampler}", "hydra.sweeper.sampler.n_startup_trials=5",
           "hydra.sweeper.plots=false",
           *pruner, *SPACE,
           "train.batch_size_multiplier=1", "train.epochs=1", f"train.max_steps={args.max_steps}",
           f"train.eval_steps={args.eval_steps}", "train.progress=false", "tracking.log_model=false",
           f"data.train_file={REPO}/data/support_train.jsonl", f"data.validation_file={REPO}/data/support_valid.jsonl"]
    # One torch thread, as bench/train_throughput.py: on a shared 2-core machine two OpenMP
    # threads spin while waiting for each other, which inflates CPU seconds as well as wall time.
    env = dict(os.environ, PYTHONUNBUFFERED="1", PHITUNE_ROOT=str(REPO), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    log = work / "sweep.log"
    print(f"[{label}] python train.py -m ... (log: {log})", flush=True)
    t0, cpu0 = time.perf_counter(), _children_cpu()
    with open(log, "w", buffering=1) as f:  # line-buffered: the log can be followed while it runs
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("trial ", "  trial ")):
                print(f"[{label}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if rc != 0:
        sys.exit(f"[{label}] the sweep failed (exit {rc}); see {log}")
    return dict(summarize(storage), wall_s=wall, cpu_s=cpu, label=label)


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
        "best": best.value, "best_trial": best.number, "best_params": best.params,
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "steps": sum(t.last_step or 0 for t in trials),
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "last_step": t.last_step, "tokens": t.user_attrs.get("train_tokens"),
                    "duration_s": t.duration.total_seconds() if t.duration else None} for t in trials],
    }


def same_environment(pruned: dict, full: dict) -> bool:
    """Trials both sweeps completed with the same params must have the same value (the
    first ones, before any pruning): otherwise the model or code changed in between."""
    ref = {json.dumps(t["params"], sort_keys=True): t["value"] for t in full["trials"] if t["state"] == "COMPLETE"}
    common = [(ref[k], t["value"]) for t in pruned["trials"] if t["state"] == "COMPLETE"
              and (k := json.dumps(t["params"], sort_keys=True)) in ref]
    return bool(common) and all(abs(a - b) <= 1e-6 * abs(a) for a, b in common)


def report(pruned: dict, full: dict, args) -> dict:
    tokens_ratio = pruned["tokens"] / full["tokens"]
    gap = (pruned["best"] - full["best"]) / full["best"]  # > 0: the pruned sweep's best is worse
    wall_ratio = pruned["wall_s"] / full["wall_s"]
    cpu_ratio = pruned["cpu_s"] / full["cpu_s"] if full.get("cpu_s") else float("nan")
    spread = max(t["value"] for t in full["trials"] if t["state"] == "COMPLETE") - full["best"]
    print()
    print(f"{args.trials} trials, {args.sampler} sampler, {args.max_steps} steps max, valid_loss every {args.eval_steps} "
          f"steps, seed {args.seed}, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"{'':10} {'tokens':>10} {'wall s':>8} {'CPU s':>8} {'best full_valid_loss':>21} {'complete':>9} {'pruned':>7}")
    for r in (full, pruned):
        print(f"{r['label']:10} {r['tokens']:>10,} {r['wall_s']:>8.0f} {r.get('cpu_s') or float('nan'):>8.0f} "
              f"{r['best']:>21.4f} {r['complete']:>9} {r['pruned']:>7}")
    print(f"pruned / unpruned: tokens {tokens_ratio:.2f}, CPU {cpu_ratio:.2f}, wall {wall_ratio:.2f}, best {gap:+.2%} "
          f"(unpruned trials spread {spread:.3f} = {spread / full['best']:.1%} above the best)")
    median = {r["label"]: _median([t["duration_s"] for t in r["trials"] if t["state"] == "COMPLETE"]) for r in (full, pruned)}
    pruned_s = _median([t["duration_s"] for t in pruned["trials"] if t["state"] == "PRUNED"])
    print(f"median trial: complete {median['unpruned']:.0f} s (unpruned sweep), {median['median']:.0f} s (median sweep)"
          + (f", pruned {pruned_s:.0f} s" if pruned_s else ""))
    consistent = same_environment(pruned, full)
    if not consistent:
        print("WARNING: trials with the same params gave different values in the two sweeps: "
              "the model or the code changed between them; rerun")
    ok = tokens_ratio <= 0.60 and gap <= 0.02
    print(f"target (best within 2% for at most 60% of the tokens): {'met' if ok else 'NOT met'}")
    return {"tokens_ratio": tokens_ratio, "cpu_ratio": cpu_ratio, "wall_ratio": wall_ratio, "best_gap": gap, "target_met": ok,
            "same_environment": consistent}


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=12, help="optimizer steps per trial (8 examples each)")
    p.add_argument("--eval-steps", type=int, default=3, help="valid_loss report interval, in optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    p.add_argument("--threads", type=int, default=1, help="torch (OpenMP) threads per trial")
    p.add_argument("--keep", type=Path, default=None, help="folder for the stores and logs (default: a temp dir)")
    p.add_argument("--report", type=Path, default=None, help="only summarize the stores a --keep run left there")
    args = p.parse_args()
    if args.report:
        saved = json.loads((args.report / "results.json").read_text())
        for k, v in saved.get("args", {}).items():  # the settings of the run being summarized
            if k in ("trials", "max_steps", "eval_steps", "seed", "threads"):
                setattr(args, k, int(v))
            elif k == "sampler":
                args.sampler = v
        runs = {}
        for label in ("unpruned", "median"):
            runs[label] = dict(summarize(f"sqlite:///{args.report / label}/optuna.db"), label=label,
                               wall_s=saved[label]["wall_s"], cpu_s=saved[label].get("cpu_s"))
        report(runs["median"], runs["unpruned"], args)
        return 0
    root = args.keep or Path(tempfile.mkdtemp(prefix="phitune-bench-pruning-"))
    try:
        full = sweep("unpruned", PRUNERS["none"], args, root)
        pruned = sweep("median", PRUNERS["median"], args, root)
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "unpruned": full, "median": pruned,
               **report(pruned, full, args)}
        (root / "results.json").write_text(json.dumps(out, indent=1, default=str))
        print(f"results: {root / 'results.json'}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
