"""s3rver 3.7.1 (npm) as a child process: an independent S3 server that ignores If-None-Match.

It is the "lying store" of issue 11 defect 8: a conditional create of an existing key succeeds
and overwrites it. Installed with npm into S3RVER_DIR (scripts/setup.sh does it when npm is
there); tests skip, saying why, when node/npm or the package are not available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .pg import free_port
from .s3 import port_open

VERSION = "3.7.1"
S3RVER_DIR = Path(os.environ.get("PITR_S3RVER_DIR", "/var/tmp/pitr-s3rver"))
ACCESS_KEY = SECRET_KEY = "S3RVER"  # s3rver checks only the access key id
BUCKET = "pitr"


def script() -> Path:
    return S3RVER_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"


def ensure_installed() -> str | None:
    """Install s3rver when missing; None when ready, else why it cannot be used."""
    if script().exists():
        return None
    if not shutil.which("node") or not shutil.which("npm"):
        return "node and npm are not installed (s3rver is an npm package); scripts/setup.sh installs it when they are"
    S3RVER_DIR.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(S3RVER_DIR),
                            f"s3rver@{VERSION}"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "npm install s3rver timed out"
    if r.returncode != 0 or not script().exists():
        return f"npm install s3rver@{VERSION} failed: {r.stderr.strip()[-300:]}"
    return None


class S3rver:
    def __init__(self) -> None:
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="pitr-s3rver-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "PITR_S3_ENDPOINT": self.endpoint}

    def start(self) -> S3rver:
        self.proc = subprocess.Popen(
            ["node", str(script()), "-d", str(self.data), "-a", "127.0.0.1", "-p", str(self.port),
             "--configure-bucket", BUCKET, "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("s3rver did not start")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data, ignore_errors=True)
