"""A real PostgreSQL server for the tests: Debian's PostgreSQL, started and stopped by the test session.

`initdb` refuses to run as root, so as root the server runs as the `postgres` user
(`su postgres -c ...`) in a fresh folder under /tmp that this user may enter; as another
user it runs as that user. Trust authentication on 127.0.0.1 and a free port; a role with
a password is made for the tests that need one (the password is still not checked: trust).
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = ("PostgreSQL is not installed: `apt-get install -y postgresql` (.ci/run does it), "
                "so that the tests can start their own server")


def find_bin_dir() -> Path:
    """The folder with initdb, pg_ctl and psql; a clear error if PostgreSQL is missing."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(INSTALL_HINT)
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bin_dir: Path
    root: Path  # the server's folder: data/, its log and its unix socket
    port: int
    as_postgres: bool  # root runs the server's tools as the `postgres` user

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["su", "postgres", "-c", shlex.join(cmd)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): {res.stdout[-2000:]} {res.stderr[-2000:]}")
        return res

    def start(self) -> None:
        self._tool("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._tool("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "start")

    def pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def stop(self) -> None:
        pid = self.pid()
        res = self._tool("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        if res.returncode != 0 and pid:  # pg_ctl could not: end the postmaster itself, by its PID
            try:
                os.kill(pid, signal.SIGQUIT)
                time.sleep(1)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, db: str = "postgres") -> str:
        res = subprocess.run([str(self.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {res.stderr.strip()}")
        return res.stdout

    def create_database(self, name: str, owner: str = "postgres") -> None:
        self.psql(f'CREATE DATABASE "{name}" OWNER "{owner}"')

    def create_role(self, name: str, password: str) -> None:
        self.psql(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")

    def url(self, db: str, user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def dump_text(self, db: str) -> str:
        """Every row of every table of `db`, as text: what a canary scan reads."""
        res = subprocess.run([str(self.bin_dir / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "--data-only", db], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"pg_dump {db}: {res.stderr.strip()}")
        return res.stdout


def start_server() -> PgServer:
    bin_dir = find_bin_dir()
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="phitune-pg-", dir="/tmp"))
    if as_postgres:
        shutil.chown(root, user="postgres")
    server = PgServer(bin_dir, root, free_port(), as_postgres)
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    return server
