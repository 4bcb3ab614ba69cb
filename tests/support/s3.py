"""Moto S3 server as a child process (see moto_proc.py) with outage injection."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .pg import free_port

ACCESS_KEY = SECRET_KEY = "testing"
REGION = "us-east-1"
_PROC_SCRIPT = Path(__file__).with_name("moto_proc.py")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class MotoServer:
    """S3 endpoint on 127.0.0.1 that PostgreSQL's archive_command (another process) can reach.

    keepalive=True serves moto under gunicorn's threaded keep-alive worker (benchmarks);
    outage()/recover() need the default ThreadedMotoServer mode.
    """

    def __init__(self, keepalive: bool = False, threads: int = 16) -> None:
        self.keepalive = keepalive
        self.threads = threads
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.up = False
        fd, name = tempfile.mkstemp(prefix="pitr-moto-", suffix=".log", dir="/tmp")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def _wait_port(self, want_open: bool, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while port_open(self.port) != want_open:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited\n{self.log_tail()}")
            if time.monotonic() > deadline:
                state = "open" if want_open else "closed"
                raise TimeoutError(f"moto port {self.port} not {state} after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self) -> MotoServer:
        self.port = free_port()
        argv = [sys.executable, str(_PROC_SCRIPT), "--port", str(self.port)]
        if self.keepalive:
            argv += ["--gunicorn", "--threads", str(self.threads)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_port(True)
        self.up = True
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.up = False
        if os.environ.get("KEEP") != "1":
            self.log_path.unlink(missing_ok=True)

    def _signal(self, sig: int) -> None:
        if self.keepalive:
            raise NotImplementedError("outage/recover need the ThreadedMotoServer mode")
        assert self.proc is not None, "start() first"
        self.proc.send_signal(sig)

    def outage(self) -> None:
        """Close the listener and cut open connections; objects are kept."""
        self._signal(signal.SIGUSR1)
        self._wait_port(False)
        self.up = False

    def recover(self) -> None:
        """Listen again on the same port."""
        self._signal(signal.SIGUSR2)
        self._wait_port(True)
        self.up = True

    def env(self) -> dict[str, str]:
        """Environment for `pitr` (and PostgreSQL running its archive/restore commands)."""
        return {"PITR_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    def client(self, **config: Any) -> Any:
        """boto3 S3 client for checking what the product wrote; config overrides botocore Config."""
        import boto3
        from botocore.config import Config

        cfg = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 2, "mode": "standard"},
               "connect_timeout": 5, "read_timeout": 60} | config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION, config=Config(**cfg))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
