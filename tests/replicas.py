"""`supportbot serve` processes for the multi-replica tests and benchmarks: real processes on loopback,
each with its own data folder, sharing one database (or none), killed with SIGKILL when asked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pg_cluster import free_port

ROOT = Path(__file__).resolve().parents[1]


class Replica:
    """One `supportbot serve` process; `env` adds SUPPORTBOT_* settings to a clean serving environment."""

    def __init__(self, name: str, model: Path, data_dir: Path, env: dict[str, str], *, workers: int = 1,
                 log_dir: Path | None = None):
        self.name = name
        self.model = model
        self.data_dir = data_dir
        self.env = env
        self.workers = workers
        self.port = free_port()
        self.log_path = (log_dir or data_dir) / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTBOT_")}
        env.update({"SUPPORTBOT_DATA_DIR": str(self.data_dir), "SUPPORTBOT_RATE_LIMIT_PER_MINUTE": "0",
                    "SUPPORTBOT_ACCESS_LOG": "false", "PYTHONPATH": str(ROOT), **self.env})
        if self.workers == 1:  # several workers split the cores themselves
            env.setdefault("SUPPORTBOT_THREADS", "1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it until it exits
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supportbot.cli", "serve", "--model", str(self.model), "--port", str(self.port),
             "--workers", str(self.workers)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 180.0) -> Replica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited ({self.process.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"replica {self.name} not ready after {timeout:.0f} s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, to the whole process group (uvicorn's workers too): no shutdown code runs."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> Replica:
        self.kill()
        return self.start()

    def version(self) -> str | None:
        return httpx.get(f"{self.url}/healthz", timeout=5).json().get("model_version")
