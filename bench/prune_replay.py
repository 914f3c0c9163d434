"""Replay a pruner offline on the unpruned sweeps that bench/sweep_pruning.py kept.

    python bench/prune_replay.py DIR                         # every candidate below, every seed in DIR
    python bench/prune_replay.py DIR --only sh03_rf3_f70,sh09_rf3

An unpruned reference sweep (`none`) reports each trial's loss on the 16 fixed validation
examples every 0.1 epoch. This script feeds those reports, trial by trial in the sweep's
order, to phitune's own pruner (phitune.sweep.pruning, the code a real sweep runs) in an
in-memory study, and counts what the sweep would have trained: a pruned trial's tokens up
to its last report, a complete trial's real tokens. The sampler is not replayed: a real
pruned sweep's TPE sees the pruned trials and suggests other points after the start-up
trials, so these are screening figures; only bench/sweep_pruning.py's real sweeps count.

Report points: a candidate's report every m x 0.1 epoch (m whole) falls on the reference's
grid exactly: the reference labels a step with floor(tokens / K) x K (K = 0.1 epoch), and the
candidate's point floor(tokens / mK) x mK is floor(label / mK) x mK. A pruned trial's tokens
are its last label + K/2 (the step that crossed it trained somewhere in [label, label + K)).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from phitune.sweep.axis import PLANNED_ATTR, REPORT_TOKENS_ATTR, ReportPoints
from phitune.sweep.pruning import build_pruner, pruner_spec
from phitune.sweep.settings import PrunerConf

REF_EVERY = 0.1  # of an epoch: the reference sweeps' report interval (sweep_pruning.py's `none`)

# name -> hydra.sweeper.pruner settings (on PrunerConf's defaults, as sweeps/default.yaml gives them).
CANDIDATES = {
    "sh09_rf3": dict(name="successive_halving", report_every=0.9, reduction_factor=3),  # the shipped default before
}
for every in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
    for rf in (2, 3, 4):
        for finish in (1.0, 0.8, 0.7, 0.5):
            tag = f"sh{round(every * 10):02d}_rf{rf}" + ("" if finish == 1.0 else f"_f{round(finish * 100)}")
            CANDIDATES[tag] = dict(name="successive_halving", report_every=every, reduction_factor=rf, finish_from=finish)
for every in (0.1, 0.2, 0.3):
    for rf in (3, 4):
        CANDIDATES[f"hb{round(every * 10):02d}_rf{rf}"] = dict(name="hyperband", report_every=every, reduction_factor=rf)
        CANDIDATES[f"hb{round(every * 10):02d}_rf{rf}_f70"] = dict(name="hyperband", report_every=every,
                                                                    reduction_factor=rf, finish_from=0.7)
for pct in (25.0, 50.0, 75.0):
    for warm in (0.1, 0.2, 0.3):
        CANDIDATES[f"pct{int(pct)}_w{round(warm * 10)}"] = dict(name="percentile", percentile=pct, warmup=warm,
                                                               report_every=0.1, n_startup_trials=3)

# The same, each trial compared only with trials of its own planned length (pruner.same_length).
for name in [n for n, c in CANDIDATES.items() if c["name"] in ("successive_halving", "percentile")]:
    CANDIDATES[name + "_sl"] = dict(CANDIDATES[name], same_length=True)
# Explicit, so that bench/sweep_pruning.py (on top of sweeps/default.yaml) runs what is replayed here.
for c in CANDIDATES.values():
    c.setdefault("finish_from", 1.0)
    c.setdefault("same_length", False)


def load_reference(db: Path) -> list:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{db}")
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def replay(reference: list, settings: dict) -> dict:
    conf = OmegaConf.merge(OmegaConf.structured(PrunerConf), settings)
    spec = pruner_spec(conf)
    study = optuna.create_study(pruner=build_pruner(spec))
    m = round(float(spec["report_every"]) / REF_EVERY)
    if abs(m * REF_EVERY - float(spec["report_every"])) > 1e-9:
        raise SystemExit(f"report_every={spec['report_every']}: expected a multiple of {REF_EVERY}")
    tokens, pruned, values = 0, [], {}
    for ref in reference:
        k = int(ref.user_attrs[REPORT_TOKENS_ATTR])
        trial = study.ask()
        trial.set_user_attr(PLANNED_ATTR, int(ref.user_attrs[PLANNED_ATTR]))
        trial.set_user_attr(REPORT_TOKENS_ATTR, m * k)
        points, stopped_at = ReportPoints(m * k), None
        for label in sorted(ref.intermediate_values):
            point = points.crossed(label)
            if point is None:
                continue
            trial.report(ref.intermediate_values[label], point)
            if trial.should_prune():
                stopped_at = label
                break
        if stopped_at is None:
            study.tell(trial, ref.value)
            tokens += int(ref.user_attrs["train_tokens"])
            values[ref.number] = ref.value
        else:
            study.tell(trial, state=TrialState.PRUNED)
            tokens += stopped_at + k // 2
            pruned.append((ref.number, round(stopped_at / (10 * k), 1)))  # epochs at the pruning report
    full_tokens = sum(int(t.user_attrs["train_tokens"]) for t in reference)
    full_best = min(t.value for t in reference)
    best = min(values.values()) if values else float("inf")
    return {"tokens_ratio": tokens / full_tokens, "best_gap": (best - full_best) / full_best, "pruned": pruned}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="bench/sweep_pruning.py's --keep folder")
    p.add_argument("--only", default="", help="comma-separated candidate names")
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--verbose", action="store_true", help="which trials each candidate prunes, at which epoch")
    args = p.parse_args()
    dbs = sorted(args.root.glob(f"seed*-{args.sampler}/none/optuna.db"), key=lambda d: int(d.parts[-3][4:].split("-")[0]))
    dbs = [d for d in dbs if (d.parent / "result.json").exists()]
    if not dbs:
        sys.exit(f"{args.root}: no finished unpruned sweep (seed*-{args.sampler}/none/result.json)")
    refs = {d.parts[-3]: load_reference(d) for d in dbs}
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    rows = []
    for name in names:
        res = {seed: replay(ref, CANDIDATES[name]) for seed, ref in refs.items()}
        ratios = sorted(r["tokens_ratio"] for r in res.values())
        gaps = [r["best_gap"] for r in res.values()]
        med = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1:][:2]) / 2
        ok = med <= 0.40 and max(ratios) <= 0.50 and max(gaps) <= 0.02
        rows.append((not ok, med, name, res, max(ratios), max(gaps)))
    print(f"{'candidate':18} {'med tok':>7} {'worst':>6} {'worst gap':>9}  per seed (tokens ratio / gap)")
    for bad, med, name, res, worst, gap in sorted(rows, key=lambda r: (r[0], r[1])):
        per = "  ".join(f"{s}: {r['tokens_ratio']:.2f}/{r['best_gap']:+.1%}" for s, r in res.items())
        print(f"{name:18} {med:7.2f} {worst:6.2f} {gap:+9.2%} {'ok ' if not bad else '   '} {per}")
        if args.verbose:
            for s, r in res.items():
                print(f"    {s}: pruned (trial, epoch) {r['pruned']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
