"""A throwaway PostgreSQL cluster for the tests and benchmarks: real `initdb` and `pg_ctl`, never a mock.

The cluster lives in a fresh temporary folder, listens on a free loopback port (its unix socket
stays in that folder) and is removed afterwards. PostgreSQL refuses to run as root, so under root
the folder is handed to the `postgres` system user (Debian's `postgresql` package creates it) and
the binaries run as that user through `runuser`; as any other user they run directly.

The binaries are looked up under /usr/lib/postgresql/*/bin (Debian), then on PATH. When they are
missing, `PostgresCluster.start()` raises with the command that installs them: the tests FAIL
rather than skip, because a skipped database test proves nothing (.ci/run installs the package).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

INSTALL_HINT = "PostgreSQL is not installed: apt-get install -y postgresql (Debian), or put initdb and pg_ctl on PATH"


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl (the newest Debian version first); RuntimeError when none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]),
                        reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """`with PostgresCluster() as pg: pg.url` -> postgresql://supportbot@127.0.0.1:PORT/supportbot."""

    def __init__(self, *, user: str = "supportbot", database: str = "supportbot"):
        self.user = user
        self.database = database
        self.port = 0
        self.folder: Path | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> PostgresCluster:
        bindir = find_bindir()
        self.folder = Path(tempfile.mkdtemp(prefix="supportbot-pg-"))
        data = self.folder / "data"
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        try:
            self._run(str(bindir / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
            for attempt in range(5):
                self.port = free_port()
                options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off "
                           "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
                started = self._run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "log"),
                                    "-o", options, "-w", "-t", "60", "start", check=False)
                if started.returncode == 0:
                    break
                if attempt == 4:
                    raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip() or started.stdout.strip()}")
            self._run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                      self.database)
        except subprocess.CalledProcessError as exc:
            self.stop()
            raise RuntimeError(f"{exc.cmd[-1] if exc.cmd else 'initdb'} failed: {exc.stderr.strip()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def create_database(self, name: str) -> str:
        """Another empty database in this cluster; its URL."""
        self._run(str(find_bindir() / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def pg_ctl(self, action: str) -> None:
        """stop / start the server (for outage tests), keeping its port and data."""
        assert self.folder is not None
        data = self.folder / "data"
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        args = ["-m", "fast"] if action == "stop" else ["-o", options]
        self._run(str(find_bindir() / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "log"), "-w", "-t", "60",
                  *args, action)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every server process stopped (SIGSTOP) for the block: the database hangs without refusing
        anything, as behind a network partition or on a stuck host; SIGCONT afterwards."""
        assert self.folder is not None
        postmaster = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        pids = [postmaster, *map(int, children)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.folder is None:
            return
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run(str(find_bindir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop", check=False)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        for _ in range(50):  # the server may take a moment to let go of its files
            shutil.rmtree(self.folder, ignore_errors=True)
            if not self.folder.exists():
                break
            time.sleep(0.1)
        self.folder = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
