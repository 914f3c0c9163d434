"""Sweep workers sharing one PostgreSQL study: wall time, trials per minute, and the storage's share.

    python bench/sweep_workers.py --workers 1,2,4 --trials 24                 # threads: cores / workers
    python bench/sweep_workers.py --workers 2 --threads default,1             # torch's default, then 1 thread

For each worker count N: a fresh Optuna database and MLflow database on one PostgreSQL
server (Debian's, started here in a temp folder on 127.0.0.1, as the tests do: tests/pg.py),
then N `python train.py -m sweep=quick hydra.sweeper.n_trials=24 ...` workers started at
once on that study, each with OMP_NUM_THREADS = cores / N (at least 1; --threads N or
`default`, torch's own: one thread per core in every worker, which oversubscribes the cores). Each is the user's command unchanged (the quick search space, its TPE
sampler and median pruner, 12 optimizer steps a trial, MLflow on the same server) run
through this script's `--worker` mode, which times every call into Optuna's RDBStorage
(outermost calls only, per thread) and writes the totals when the worker exits.

Per N: wall time (first start to last exit), trials per minute (finished trials: complete
or pruned), and the storage's share: seconds inside RDBStorage calls on the sweep's own
threads (ask, tell, reports, pruning's reads, the study's attrs; the study's creation and
the end-of-sweep reads included) over the trials' summed durations (Optuna's start to
finish: `share_of_trials`) and over the workers' summed wall time (`share_of_wall`). The heartbeat thread's calls (one every heartbeat_interval
seconds, off the trial's path) are reported apart. Target: under 2% of a trial's time.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = "bench-workers"
HEARTBEAT_THREAD = "phitune-heartbeat"  # phitune.sweep.heartbeat's thread: its calls are off the trial's path


def install_storage_timer(out: Path) -> None:
    """Wrap RDBStorage's public methods: seconds and calls per thread, outermost calls only."""
    from optuna.storages import RDBStorage

    totals: dict[str, list[float]] = {}  # thread name -> [seconds, calls]
    by_method: dict[str, list[float]] = {}  # method -> [seconds, calls], every thread
    depth = threading.local()

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if getattr(depth, "n", 0):
                return fn(*args, **kwargs)
            depth.n, t0 = 1, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth.n = 0
                dt = time.perf_counter() - t0
                for row in (totals.setdefault(threading.current_thread().name, [0.0, 0]),
                            by_method.setdefault(fn.__name__, [0.0, 0])):
                    row[0] += dt
                    row[1] += 1
        return wrapper

    for name in dir(RDBStorage):
        attr = getattr(RDBStorage, name)
        if not name.startswith("_") and callable(attr) and not isinstance(attr, type):
            setattr(RDBStorage, name, timed(attr))
    started = time.perf_counter()
    atexit.register(lambda: out.write_text(json.dumps(
        {"wall_s": time.perf_counter() - started, "threads": totals, "methods": by_method}, indent=1)))


def run_worker(out: Path, argv: list[str]) -> None:
    import runpy

    install_storage_timer(out)
    sys.argv = [str(REPO / "train.py"), *argv]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def worker_args(storage: str, tracking: str, n_trials: int, sweep_dir: Path) -> list[str]:
    return ["-m", "sweep=quick", f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={STUDY}",
            f"hydra.sweeper.n_trials={n_trials}", f"tracking.uri={tracking}", f"hydra.sweep.dir={sweep_dir}",
            f"data.train_file={REPO / 'data/support_train.jsonl'}",
            f"data.validation_file={REPO / 'data/support_valid.jsonl'}", "train.progress=false"]


def worker_threads(setting: str, n_workers: int) -> str | None:
    if setting == "default":
        return None
    return setting if setting != "auto" else str(max(1, (os.cpu_count() or 1) // n_workers))


def one_count(server, n_workers: int, n_trials: int, work: Path, threads: str) -> dict:
    db = f"w{n_workers}_t{threads}"
    for name in (f"optuna_{db}", f"mlflow_{db}"):
        server.create_database(name)
    storage, tracking = server.url(f"optuna_{db}"), server.url(f"mlflow_{db}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    n_threads = worker_threads(threads, n_workers)
    if n_threads:
        env.update(OMP_NUM_THREADS=n_threads, MKL_NUM_THREADS=n_threads)
    t0 = time.perf_counter()
    procs = []
    for i in range(n_workers):
        timing = work / f"{db}_worker{i}.json"
        cmd = [sys.executable, __file__, "--worker", str(timing), "--",
               *worker_args(storage, tracking, n_trials, work / f"{db}_sweep{i}")]
        log = open(work / f"{db}_worker{i}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT), timing, log))
    for p, _, log in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker exited {p.returncode}: see {log.name}")
        log.close()
    wall = time.perf_counter() - t0
    row = summarize(storage, [json.loads(t.read_text()) for _, t, _ in procs], wall, n_workers)
    return {"threads": n_threads or "default", **row}


def summarize(storage: str, timings: list[dict], wall: float, n_workers: int) -> dict:
    import optuna
    from optuna.trial import TrialState

    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    states = [t.state for t in trials]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    worker_s = sum(t["wall_s"] for t in timings)
    on_path = [row for t in timings for name, row in t["threads"].items() if name != HEARTBEAT_THREAD]
    main_s, main_calls = sum(r[0] for r in on_path), sum(r[1] for r in on_path)
    methods: dict[str, float] = {}
    for t in timings:
        for name, (sec, _) in t["methods"].items():
            methods[name] = methods.get(name, 0.0) + sec
    top = sorted(methods.items(), key=lambda kv: -kv[1])[:4]
    beat_s = sum(t["threads"].get(HEARTBEAT_THREAD, [0.0, 0])[0] for t in timings)
    trial_s = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete]
    return {"workers": n_workers, "wall_s": round(wall, 1), "finished": finished,
            "complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL), "trials_per_min": round(60 * finished / wall, 2),
            "mean_trial_s": round(sum(trial_s) / max(1, len(trial_s)), 2),
            "storage_s": round(main_s, 2), "storage_calls": main_calls,
            "storage_per_trial_s": round(main_s / max(1, finished), 3),
            "share_of_trials": round(main_s / max(1e-9, sum(trial_s)), 4),
            "share_of_wall": round(main_s / worker_s, 4), "heartbeat_s": round(beat_s, 2),
            "top_methods_s": {k: round(v, 2) for k, v in top}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4", help="worker counts, one study each (default 1,2,4)")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--threads", default="auto",
                    help="torch threads per worker, one sweep each in turn: auto (cores / workers), N, default")
    ap.add_argument("--keep", type=Path, help="a folder for the workers' logs and timings (default: a temp one)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from pg import start_server

    work = args.keep or Path(tempfile.mkdtemp(prefix="phitune-bench-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    server = start_server()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server is stopped below, by its PID
    try:
        for n in (int(x) for x in args.workers.split(",")):
            for threads in args.threads.split(","):
                print(json.dumps(one_count(server, n, args.trials, work, threads)), flush=True)
    finally:
        server.stop()
    print(f"logs and timings: {work}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        run_worker(Path(sys.argv[2]), sys.argv[4:])
    else:
        main()
