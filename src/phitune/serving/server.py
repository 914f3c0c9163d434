"""Running the app: `phitune serve` in the foreground (with a deployment record), or a
server thread in this process (`phitune chat MODEL_URI`, tests).

The socket is bound before the deployment is recorded, so a record always points
at a port that was really listening (and `--port 0` picks a free one).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from phitune.errors import PhituneError

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PhituneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = LOOPBACK if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def process_start_time(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, from /proc), to tell a pid
    from a later process that reuses it. None where /proc is not available."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _uvicorn_config(app, log_level: str = "info", access_log: bool = True) -> uvicorn.Config:
    # One worker process, one event loop: the model lives in this process.
    return uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                          timeout_keep_alive=30, server_header=False)


def serve_forever(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers: graceful stop)."""
    server = uvicorn.Server(_uvicorn_config(app, log_level))
    server.run(sockets=[sock])


class ThreadedServer:
    """The app on a loopback port in a background thread of this process.

        with ThreadedServer(app) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key=key)
    """

    def __init__(self, app, host: str = LOOPBACK, port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> "ThreadedServer":
        sock = bind(self.host, self.port)
        self.url = url_for(sock, self.host)
        self.server = uvicorn.Server(_uvicorn_config(self.app, self.log_level, access_log=False))
        # Signal handlers belong to the main thread; uvicorn skips them in other threads.
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="phitune-server")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PhituneError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        self._sock = sock
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def warn_if_exposed(host: str) -> None:
    if not is_loopback(host):
        print(f"warning: listening on {host}: the endpoint is reachable from other machines, over plain HTTP. "
              "Keep the API key secret, and put TLS in front of it for anything beyond a trusted network.",
              file=sys.stderr)


def record_local_deployment(source, url: str, tracking_uri: str, content_filter: str,
                            models: list | None = None) -> dict:
    """source: the (first) model served; models: every version held (phitune.serving.models.ModelSet.records)."""
    from phitune.deployments import record_deployment

    pid = os.getpid()
    extra = {"models": models} if models else {}
    return record_deployment(source.uri, source.model_name, source.model_version, "local", url,
                             tracking_uri=tracking_uri, pid=pid, host=socket.gethostname(),
                             pid_started=process_start_time(pid), served_model=source.served_name,
                             resolved_uri=source.resolved_uri, run_id=source.run_id, content_filter=content_filter,
                             **extra)
