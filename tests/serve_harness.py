"""Starting `python -m serve` for a test: a subprocess on a free loopback port, its own Ray instance,
stopped (SIGTERM, then SIGKILL of its process group) when the test is done."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running service: `url`, `log` (its output so far), `stop()`."""

    def __init__(self, args: list[str], log_path: Path, ready_timeout: float = 240.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", "--port", str(self.port), *args], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"python -m serve exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            if "serving " in self.log:
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"python -m serve did not become ready in {ready_timeout} s:\n{self.log[-4000:]}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray's own processes, whatever is left of them
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()
