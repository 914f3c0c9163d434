"""Latency and throughput of `phitune serve` (batched and one at a time) against `mlflow models serve`.

    python bench/serve_latency.py                       # trains + registers a tiny model in a temp dir
    python bench/serve_latency.py --tracking-uri sqlite:///mlruns/mlflow.db --model models:/support-bot@champion
    python bench/serve_latency.py --clients 1 8 --content-filter off

Three servers load the same MLflow model (base.json + LoRA adapter): `phitune serve
--max-batch 8` (requests that arrive together decode together), `phitune serve
--max-batch 1` (one generation at a time, the engine before batching) and `mlflow models
serve`. All get the same requests: greedy decoding (temperature 0), `--max-tokens` per
answer, questions from data/support_valid.jsonl in turn, over loopback HTTP; phitune's
answers are streamed (so the time to the first token is real; MLflow's pyfunc server
cannot stream, its first token comes with the answer).

For each concurrency level (--clients, default 1 4 8): that many clients, each sending its
next request as soon as its previous answer is in (--arrivals closed, the default; or
--arrivals rounds: rounds of that many simultaneous requests), in blocks to one server at a
time (closed: 8 answers per client a block, --block), the servers' order rotating, until
each server has answered --requests (24) and had 2 blocks at least. Per
server and level: p50 and p95 latency (ms), p50 time to first token, and completion tokens
per second (from `usage`, over the summed wall time of the server's blocks). The ratios are batched / one-at-a-time and batched / mlflow:
latency < 1 and tokens/s > 1 mean batched is faster. Each level also counts answers that
differ from the one-at-a-time server's single-client (greedy) answer to the same question.

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
import threading
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


def call(url: str, body: dict, headers: dict) -> tuple[float, float, int, str | None]:
    """(seconds, seconds to the first token, completion tokens, text) of one plain request; text None
    (and the error kept) when it failed. Without streaming the first token arrives with the answer."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        ERRORS.setdefault(url, []).append(f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:3000]}")
        return time.perf_counter() - t0, 0.0, 0, None
    dt = time.perf_counter() - t0
    return dt, dt, int(reply["usage"]["completion_tokens"]), reply["choices"][0]["message"]["content"] or ""


def call_stream(url: str, body: dict, headers: dict) -> tuple[float, float, int, str | None]:
    """The same, streamed (server-sent events, usage in the last chunk): the first token's time is real."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    t0, first, tokens, parts = time.perf_counter(), None, 0, []
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(json.dumps(obj)[:3000])
                for choice in obj.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        parts.append(choice["delta"]["content"])
                if obj.get("usage"):
                    tokens = int(obj["usage"]["completion_tokens"])
    except (urllib.error.HTTPError, RuntimeError) as exc:
        detail = f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:3000]}" if isinstance(
            exc, urllib.error.HTTPError) else str(exc)
        ERRORS.setdefault(url, []).append(detail)
        return time.perf_counter() - t0, 0.0, 0, None
    dt = time.perf_counter() - t0
    return dt, (first or time.perf_counter()) - t0, tokens, "".join(parts)


def pct(values: list, q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(1, math.ceil(q / 100 * len(s))) - 1]


class Target:
    def __init__(self, name: str, url: str, headers: dict, stream: bool):
        self.name, self.url, self.headers = name, url, headers
        self.call = call_stream if stream else call
        self.results: dict = {}  # clients -> [(question index, (seconds, ttft, tokens, text)), ...]
        self.wall: dict = {}  # clients -> summed wall seconds of its rounds


def measure(targets: list, qs: list, args) -> None:
    """Per concurrency level (1, 4, 8 by default), blocks of requests to one server at a time, the
    servers' order rotating block by block, so that all see the same machine: this one is shared,
    and its load moves by the minute. tokens/s is over the summed wall time of a server's blocks.
    --arrivals rounds: a block is `clients` simultaneous requests, and ends with its longest answer.
    --arrivals closed: `clients` clients each send their next request as soon as their previous answer
    is in (as vLLM's benchmark_serving --max-concurrency does), --block answers a block (default 8 per
    client: a block ends with its last answers decoding alone, and this keeps that tail small)."""
    def body(i):
        return {"messages": qs[i % len(qs)], "max_tokens": args.max_tokens, "temperature": 0.0}

    for t in targets:
        for i in range(3):  # warm-up
            t.call(t.url, body(i), t.headers)
    with ThreadPoolExecutor(max(args.clients)) as pool:
        for n in args.clients:
            size = n if args.arrivals == "rounds" else (args.block or max(8 * n, args.requests // 2))
            blocks = max(2, -(-args.requests // size))  # at least --requests answers and 2 blocks per server
            for r in range(blocks):
                k = r % len(targets)
                for t in targets[k:] + targets[:k]:
                    t0 = time.perf_counter()
                    t.results.setdefault(n, []).extend(_block(t, pool, n, range(r * size, (r + 1) * size), body))
                    t.wall[n] = t.wall.get(n, 0.0) + time.perf_counter() - t0
            print(f"  {n} client(s): done", file=sys.stderr, flush=True)


def _block(t, pool, n: int, ids: range, body) -> list:
    """The answers to requests `ids` from `n` clients, each sending its next as soon as its last is in."""
    todo, lock = iter(ids), threading.Lock()

    def client():
        out = []
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return out
            out.append((i, t.call(t.url, body(i), t.headers)))

    return [row for rows in pool.map(lambda _: client(), range(n)) for row in rows]


def summary(t: Target, n: int, expected: dict, n_questions: int) -> dict:
    rows = t.results[n]
    lat = [dt for _, (dt, _, _, _) in rows]
    return {
        "server": t.name, "clients": n,
        "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * pct(lat, 95),
        "ttft_p50_ms": 1000 * statistics.median(ft for _, (_, ft, _, _) in rows),
        "tok_s": sum(k for _, (_, _, k, _) in rows) / t.wall[n],
        "mean_tokens": statistics.mean(k for _, (_, _, k, _) in rows),
        "differ": sum(1 for i, (*_, text) in rows if text is not None and text != expected[i % n_questions]),
        "failed": sum(1 for _, (*_, text) in rows if text is None),
        "requests": len(rows),
        "errors": ERRORS.get(t.url, [])[:3],
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


def phitune_server(name: str, model: str, uri: str, port: int, max_batch: int, args, env, tmp: Path) -> Server:
    return Server(name, [str(BIN / "phitune"), "serve", model, "--host", "127.0.0.1", "--port", str(port),
                         "--tracking-uri", uri, "--log-level", "warning", "--content-filter", args.content_filter,
                         "--timeout", "600", "--max-queue", "64", "--max-batch", str(max_batch)],
                  env, f"http://127.0.0.1:{port}/health", tmp / f"phitune-{max_batch}.log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", help="an existing store (with --model); default: train a tiny model in a temp dir")
    p.add_argument("--model", help="registered model URI, e.g. models:/support-bot@champion")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels (default: 1 4 8)")
    p.add_argument("--requests", type=int, default=24, help="answers per server and level, at least (default: 24)")
    p.add_argument("--block", type=int, help="--arrivals closed: answers per block (default: 8 per client)")
    p.add_argument("--arrivals", default="closed", choices=["closed", "rounds"],
                   help="closed: each client sends again as soon as answered (default); rounds: simultaneous rounds")
    p.add_argument("--max-batch", type=int, default=8, help="phitune serve --max-batch of the batched server")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--content-filter", default="local", choices=["local", "off"], help="phitune serve's filter")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per server, set for all through OMP_NUM_THREADS (default 1: a tiny model "
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
    bp, op, mp = free_port(), free_port(), free_port()
    auth = {"Authorization": f"Bearer {KEY}"}
    servers = []
    try:
        for s in (phitune_server("phitune batched", model, uri, bp, args.max_batch, args, env, tmp),
                  phitune_server("phitune one-at-a-time", model, uri, op, 1, args, env, tmp),
                  Server("mlflow models serve", [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager",
                                                 "local", "-h", "127.0.0.1", "-p", str(mp), "-w", "1"],
                         env, f"http://127.0.0.1:{mp}/ping", tmp / "mlflow.log")):
            servers.append(s)
            s.wait_ready()
        qs = questions()
        print(f"measuring: {args.clients} clients, >= {args.requests} answers each, max_tokens {args.max_tokens}",
              file=sys.stderr, flush=True)
        targets = [Target(f"phitune --max-batch {args.max_batch}", f"http://127.0.0.1:{bp}/v1/chat/completions", auth, True),
                   Target("phitune --max-batch 1", f"http://127.0.0.1:{op}/v1/chat/completions", auth, True),
                   Target("mlflow models serve", f"http://127.0.0.1:{mp}/invocations", {}, False)]
        measure(targets, qs, args)
        # reference: the one-at-a-time server's answers with one client (greedy: one answer per question)
        expected = {i % len(qs): text for i, (*_, text) in targets[1].results[args.clients[0]]}
        table = [[summary(t, n, expected, len(qs)) for t in targets] for n in args.clients]
    finally:
        for s in servers:
            s.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    where += f"; load average at the end {os.getloadavg()[0]:.1f}"
    mean = statistics.mean(r["mean_tokens"] for row in table for r in row)
    print(f"\n{model}, greedy, max_tokens {args.max_tokens} (mean {mean:.1f} tokens per answer), "
          f"{args.threads} torch thread(s) per server, phitune answers streamed, {args.arrivals} arrivals\n{where}\n")
    names = [r["server"] for r in table[0]]
    print("| clients | figure | " + " | ".join(names) + " | batched / one-at-a-time | batched / mlflow |")
    print("|---:|---|" + "---:|" * (len(names) + 2))
    for row in table:
        b, o, m = row
        for label, key in (("p50 latency (ms)", "p50_ms"), ("p95 latency (ms)", "p95_ms"),
                           ("time to first token p50 (ms)", "ttft_p50_ms"), ("completion tokens/s", "tok_s")):
            print(f"| {b['clients']} | {label} | " + " | ".join(f"{r[key]:.1f}" for r in row)
                  + f" | {b[key] / o[key]:.2f} | {b[key] / m[key]:.2f} |")
        print(f"| {b['clients']} | answers unlike the one-at-a-time greedy answer | "
              + " | ".join(f"{r['differ']}/{r['requests']}" for r in row) + " | | |")
        if any(r["failed"] for r in row):
            print(f"| {b['clients']} | failed requests | " + " | ".join(f"{r['failed']}/{r['requests']}" for r in row)
                  + " | | |")
    for r in table[-1]:
        for err in r["errors"]:
            print(f"  {r['server']}: {err[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "model": model, "args": vars(args),
                                               "results": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
