"""Fault injection for the fault suite (tests/test_faults_*.py): kill points, a full disk, a
store that fails mid-write.

- kill_env(): environment that makes a pitr process SIGKILL itself at one exact step (the hook is
  killhook/sitecustomize.py, loaded through PYTHONPATH; pitr's code is not changed).
- tmpfs(): a small tmpfs mounted for one test (root only; skips the test when mount is refused).
- FaultProxy: a TCP proxy in front of the moto server that cuts a matching request midway or
  drops the response to it after the server acted on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.pg import as_pg_argv, pg_env

KILLHOOK = Path(__file__).with_name("killhook")
PITR = Path(sys.executable).parent / "pitr"
MARKER = "pitr-restore.incomplete"


def kill_env(target: str, when: str = "before", nth: int = 1, match: str = "",
             once: Path | None = None, fill: Path | None = None, pause: Path | None = None) -> dict[str, str]:
    """Env that SIGKILLs pitr at the nth call of target ("module:attr[.attr]"), before or after it;
    with fill=PATH it fills PATH's filesystem at that moment instead (and carries on)."""
    assert when in ("before", "after")
    env = {"PYTHONPATH": str(KILLHOOK), "FAULT_KILL": f"{target}:{when}:{nth}" + (f":{match}" if match else "")}
    if once is not None:
        env["FAULT_ONCE"] = str(once)
    if fill is not None:
        env["FAULT_FILL"] = str(fill)
    if pause is not None:  # pause at that step until the test creates PAUSE.go (it sees PAUSE.reached)
        env["FAULT_PAUSE"] = str(pause)
    return env


def run(argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str], *, as_pg: bool = True,
        cwd: str | os.PathLike[str] = "/tmp", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command with a clean environment + env (as postgres unless as_pg=False)."""
    args = [str(a) for a in argv]
    return subprocess.run(as_pg_argv(args) if as_pg else args, env=pg_env(env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def killed(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode == -9


@contextlib.contextmanager
def tmpfs(path: Path, size: str, mode: int = 0o777) -> Iterator[Path]:
    """Mount a tmpfs of `size` on path for the duration; skip the test when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:o}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()}); the disk-full tests need root")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(path: Path) -> None:
    """Append to path until its filesystem has no space left (what FAULT_FILL does inside pitr)."""
    size = 1 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if size == 512:
                    return
                size = 512
    finally:
        os.close(fd)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


class FaultProxy:
    """127.0.0.1 TCP proxy to `upstream_port` that breaks requests whose bytes contain `needle`.

    mode "cut": forward the matching request's head and the first `keep` bytes of its body, then
    close both sides (the server sees a truncated request). mode "drop-response": forward the whole request, let the
    server answer, then close the client's connection without passing the answer on (the server
    acted, the client cannot know). Each fault fires `times` times (-1: always); the rest passes.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.mode = "off"
        self.needle = b""
        self.keep = 0
        self.times = 0
        self.fired = 0
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, mode: str, needle: bytes, times: int = 1, keep: int = 512) -> None:
        with self._lock:
            self.mode, self.needle, self.times, self.keep, self.fired = mode, needle, times, keep, 0

    def _take(self, data: bytes) -> str:
        with self._lock:
            if self.mode == "off" or self.needle not in data or self.times == 0:
                return "off"
            if self.times > 0:
                self.times -= 1
            self.fired += 1
            return self.mode

    def close(self) -> None:
        self._stop = True
        self._srv.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        state: dict[str, object] = {"fault": "off"}
        cut = bytearray()  # the matching request's bytes so far (mode "cut")
        tail = b""
        done = threading.Event()

        def shut() -> None:
            for s in (client, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            done.set()

        def downstream() -> None:
            try:
                while True:
                    data = up.recv(65536)
                    if not data:
                        break
                    if state["fault"] == "drop-response":
                        break  # the server answered a request we must not let the client see
                    client.sendall(data)
            except OSError:
                pass
            shut()

        threading.Thread(target=downstream, daemon=True).start()
        try:
            while not done.is_set():
                data = client.recv(65536)
                if not data:
                    break
                if state["fault"] == "off":
                    # the needle may straddle two reads: look at the end of the previous one too
                    window = tail + data
                    tail = window[-len(self.needle):] if self.needle else b""
                    state["fault"] = self._take(window)
                    if state["fault"] == "cut":
                        start = max(0, window.index(self.needle) - (len(window) - len(data)))
                        up.sendall(data[:start])  # bytes of earlier requests on this connection
                        data = window[window.index(self.needle):]
                if state["fault"] == "cut":
                    # the head goes through whole; of the body only `keep` bytes
                    sent = len(cut)
                    cut += data
                    end = cut.find(b"\r\n\r\n")
                    limit = end + 4 + self.keep if end >= 0 else len(cut)
                    up.sendall(bytes(cut[sent:limit]))
                    if end >= 0 and len(cut) >= limit:
                        time.sleep(0.2)  # let the server read the partial body before the connection dies
                        break
                    continue
                up.sendall(data)
        except OSError:
            pass
        shut()
        client.close()
        up.close()
