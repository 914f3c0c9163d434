"""Latency and throughput of `phitune serve` against `mlflow models serve` on one registered model.

    python bench/serve_latency.py                       # trains + registers a tiny model in a temp dir
    python bench/serve_latency.py --tracking-uri sqlite:///mlruns/mlflow.db --model models:/support-bot@champion
    python bench/serve_latency.py --content-filter off  # phitune without its content filter

Both servers load the same MLflow model (base.json + LoRA adapter) and get the same
requests: greedy decoding (temperature 0), `--max-tokens` per answer, questions from
data/support_valid.jsonl in turn, over loopback HTTP.

  sequential   --requests requests, one after another (50)
  concurrent   --clients client threads (8), each sending --per-client requests (6)

The two servers are measured interleaved (turn by turn, see measure()), so that a
machine whose load changes during the run treats both alike.

Per server: p50 and p95 latency (ms), and generated tokens per second (completion tokens
from `usage`; sequential: summed over the time spent in requests; concurrent: over the
phase's wall time). The ratios are phitune / mlflow: latency < 1 and tokens/s > 1 mean
phitune is faster. The concurrent phase also counts answers that differ from the same
question's sequential (greedy) answer: a server must not mix up concurrent requests.

Both servers are started here and stopped by PID at the end (their process groups),
whatever happens. Nothing leaves the loopback interface.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY = "bench-" + os.urandom(8).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(n: int = 12) -> list:
    out = []
    for line in (REPO / "data/support_valid.jsonl").read_text(encoding="utf-8-sig").splitlines():
        msgs = json.loads(line)["messages"]
        out.append([m for m in msgs if m["role"] != "assistant"][:2])  # system + first user turn
        if len(out) == n:
            break
    return out


def train_and_register(tmp: Path) -> tuple[str, str]:
    """A real tiny run (24 examples, 1 epoch) registered as bench-tiny@champion."""
    from hydra import compose, initialize_config_dir

    import mlflow
    import phitune.config  # noqa: F401
    from mlflow.tracking import MlflowClient
    from phitune.recipe import run

    os.environ.setdefault("PHITUNE_ROOT", str(REPO))
    train, valid = tmp / "train.jsonl", tmp / "valid.jsonl"
    for src, dst, n in (("support_train.jsonl", train, 24), ("support_valid.jsonl", valid, 4)):
        dst.write_text("\n".join((REPO / "data" / src).read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n")
    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"data.train_file={train}", f"data.validation_file={valid}", f"tracking.uri={uri}",
            f"train.output_dir={tmp}/ckpt", "train.epochs=1", "train.eval_steps=100",
            "train.full_eval_each_epoch=false", "train.progress=false", "train.evaluate_at_end=false"])
    run(cfg)
    client = MlflowClient(uri, uri)
    (r,) = client.search_runs([client.get_experiment_by_name("phitune").experiment_id])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = mlflow.register_model(f"runs:/{r.info.run_id}/model", "bench-tiny").version
    client.set_registered_model_alias("bench-tiny", "champion", version)
    return uri, "models:/bench-tiny@champion"


class Server:
    def __init__(self, name: str, cmd: list, env: dict, ready_url: str, log: Path):
        self.name, self.ready_url = name, ready_url
        self.log = open(log, "w")
        # Own process group: mlflow starts uvicorn as a child; stopping the group stops both.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=log.parent)
        self.log_path = log

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(self.ready_url, timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:g} s") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


ERRORS: dict = {}  # server URL -> [error text, ...]


def call(url: str, body: dict, headers: dict) -> tuple[float, int, str | None]:
    """(seconds, completion tokens, text) of one request; text None (and the error kept) when it failed."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        ERRORS.setdefault(url, []).append(f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:3000]}")
        return time.perf_counter() - t0, 0, None
    dt = time.perf_counter() - t0
    return dt, int(reply["usage"]["completion_tokens"]), reply["choices"][0]["message"]["content"] or ""


def pct(values: list, q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(1, math.ceil(q / 100 * len(s))) - 1]


class Target:
    def __init__(self, name: str, url: str, headers: dict):
        self.name, self.url, self.headers = name, url, headers
        self.seq: list = []  # (seconds, tokens, text) per sequential request
        self.conc: list = []  # (question index, (seconds, tokens, text)) per concurrent request
        self.conc_wall = 0.0


def measure(targets: list, qs: list, args) -> None:
    """Interleaved, so that both servers see the same machine: this one is shared, and its
    load moves by the minute. Sequential: the servers take turns request by request (who goes
    first alternates). Concurrent: rounds of `clients` simultaneous requests, one server per
    round, alternating; tokens/s is over the summed wall time of a server's rounds."""
    def body(i):
        return {"messages": qs[i % len(qs)], "max_tokens": args.max_tokens, "temperature": 0.0}

    for t in targets:
        for i in range(3):  # warm-up
            call(t.url, body(i), t.headers)
    for i in range(args.requests):
        for t in (targets if i % 2 == 0 else targets[::-1]):
            t.seq.append(call(t.url, body(i), t.headers))
    print("  sequential: done", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(args.clients) as pool:
        for r in range(args.per_client):
            for t in (targets if r % 2 == 0 else targets[::-1]):
                ids = range(r * args.clients, (r + 1) * args.clients)
                t0 = time.perf_counter()
                t.conc.extend(pool.map(lambda i, t=t: (i, call(t.url, body(i), t.headers)), ids))
                t.conc_wall += time.perf_counter() - t0
    print("  concurrent: done", file=sys.stderr, flush=True)


def summary(t: Target, n_questions: int) -> dict:
    expected = {i % n_questions: text for i, (_, _, text) in enumerate(t.seq)}
    seq_lat = [dt for dt, _, _ in t.seq]
    conc_lat = [dt for _, (dt, _, _) in t.conc]
    return {
        "server": t.name,
        "seq_p50_ms": 1000 * statistics.median(seq_lat), "seq_p95_ms": 1000 * pct(seq_lat, 95),
        "seq_tok_s": sum(n for _, n, _ in t.seq) / sum(seq_lat),
        "conc_p50_ms": 1000 * statistics.median(conc_lat), "conc_p95_ms": 1000 * pct(conc_lat, 95),
        "conc_tok_s": sum(n for _, (_, n, _) in t.conc) / t.conc_wall,
        "mean_tokens": statistics.mean(n for _, n, _ in t.seq),
        "mixed_up": sum(1 for i, (_, _, text) in t.conc if text is not None and text != expected[i % n_questions]),
        "failed": sum(1 for _, _, text in t.seq if text is None) + sum(1 for _, (_, _, text) in t.conc if text is None),
        "errors": ERRORS.get(t.url, [])[:3],
        "concurrent_requests": len(t.conc),
    }


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return (f"{cpu or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", help="an existing store (with --model); default: train a tiny model in a temp dir")
    p.add_argument("--model", help="registered model URI, e.g. models:/support-bot@champion")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--content-filter", default="local", choices=["local", "off"], help="phitune serve's filter")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per server, set for both through OMP_NUM_THREADS (default 1: a tiny model "
                        "gains nothing from more, and on a busy machine 2+ OpenMP threads per process stall each other)")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model store, server logs)")
    args = p.parse_args()
    if bool(args.tracking_uri) != bool(args.model):
        p.error("--tracking-uri and --model go together")

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    os.environ.setdefault("PHITUNE_CACHE", str(tmp / "cache"))  # the tiny base model, built offline
    where = machine()
    if args.model:
        uri, model = args.tracking_uri, args.model
    else:
        print("training and registering a tiny model ...", file=sys.stderr, flush=True)
        uri, model = train_and_register(tmp)

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PHITUNE_API_KEY": KEY, "PHITUNE_DEPLOYMENTS_DIR": str(tmp / "deployments"),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    pp, mp = free_port(), free_port()
    servers = []
    try:
        phitune = Server("phitune serve", [str(BIN / "phitune"), "serve", model, "--host", "127.0.0.1", "--port", str(pp),
                                           "--tracking-uri", uri, "--log-level", "warning", "--content-filter",
                                           args.content_filter, "--timeout", "600", "--max-queue", "64"],
                         env, f"http://127.0.0.1:{pp}/health", tmp / "phitune.log")
        servers.append(phitune)
        phitune.wait_ready()
        mlflow_srv = Server("mlflow models serve", [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager",
                                                    "local", "-h", "127.0.0.1", "-p", str(mp), "-w", "1"],
                            env, f"http://127.0.0.1:{mp}/ping", tmp / "mlflow.log")
        servers.append(mlflow_srv)
        mlflow_srv.wait_ready()
        qs = questions()
        print(f"measuring: {args.requests} sequential, {args.clients} clients x {args.per_client} concurrent, "
              f"max_tokens {args.max_tokens}", file=sys.stderr, flush=True)
        targets = [Target(f"phitune serve (filter {args.content_filter})", f"http://127.0.0.1:{pp}/v1/chat/completions",
                          {"Authorization": f"Bearer {KEY}"}),
                   Target("mlflow models serve", f"http://127.0.0.1:{mp}/invocations", {})]
        measure(targets, qs, args)
        a, b = (summary(t, len(qs)) for t in targets)
    finally:
        for s in servers:
            s.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [("sequential p50 latency (ms)", "seq_p50_ms"), ("sequential p95 latency (ms)", "seq_p95_ms"),
            ("sequential tokens/s", "seq_tok_s"), (f"{args.clients} clients p50 latency (ms)", "conc_p50_ms"),
            (f"{args.clients} clients p95 latency (ms)", "conc_p95_ms"), (f"{args.clients} clients tokens/s", "conc_tok_s")]
    where += f"; load average at the end {os.getloadavg()[0]:.1f}"
    print(f"\n{model}, greedy, max_tokens {args.max_tokens} (mean {a['mean_tokens']:.1f} tokens per answer), "
          f"{args.threads} torch thread(s) per server\n{where}\n")
    print(f"| | {a['server']} | {b['server']} | ratio phitune/mlflow |\n|---|---:|---:|---:|")
    for label, key in rows:
        print(f"| {label} | {a[key]:.1f} | {b[key]:.1f} | {a[key] / b[key]:.2f} |")
    print(f"| concurrent answers that differ from the sequential greedy answer | {a['mixed_up']}/{a['concurrent_requests']} "
          f"| {b['mixed_up']}/{b['concurrent_requests']} | |")
    n_all = args.requests + a["concurrent_requests"]
    print(f"| failed requests | {a['failed']}/{n_all} | {b['failed']}/{n_all} | |")
    for r in (a, b):
        for err in r["errors"]:
            print(f"  {r['server']}: {err[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "model": model, "args": vars(args),
                                               "results": [a, b]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
