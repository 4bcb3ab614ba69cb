"""Test-only kill point: SIGKILL this process at an exact step of pitr (tests/support/faults.py).

Put this directory on PYTHONPATH and set FAULT_KILL="module:attr[.attr]:before|after:N[:substr]":
the N-th call of that function whose arguments' repr contains substr kills the process with
SIGKILL just before the call or just after it returned. FAULT_FILL=PATH fills the filesystem of
PATH at that moment instead of killing (a disk that becomes full mid-command). FAULT_PAUSE=PATH
pauses there instead: it creates PATH.reached and waits (up to 300 s) until PATH.go exists, so a test
acts on the world at that exact step (e.g. promotes a standby mid-backup) and then lets pitr carry on.
FAULT_ONCE=PATH kills only while PATH does not exist (it is created first), so a restarted helper
process runs through. Every Python
process started with this environment gets the hook, including pitr's detached helpers.
Nothing here is part of pitr; without FAULT_KILL this module does nothing.
"""

from __future__ import annotations

import os

_SPEC = os.environ.get("FAULT_KILL")


def _install(spec: str) -> None:
    import importlib
    import inspect
    import signal
    import threading
    from typing import Any

    module_name, attr_path, when, nth, *rest = spec.split(":", 4)
    want = int(nth)
    match = rest[0] if rest else ""
    once = os.environ.get("FAULT_ONCE")
    fill = os.environ.get("FAULT_FILL")
    pause = os.environ.get("FAULT_PAUSE")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    raw = inspect.getattr_static(owner, name)
    is_static = isinstance(raw, staticmethod)
    original = getattr(owner, name)
    lock = threading.Lock()
    count = [0]

    def die() -> None:
        if pause:
            _pause(pause)
            return
        if fill:
            _fill(fill)
            return
        if once:
            try:
                fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def hit(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if match and not any(match in str(a) for a in (*args, *kwargs.values()) if isinstance(a, str | os.PathLike)):
            return False
        with lock:
            count[0] += 1
            return count[0] == want

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        fire = hit(args, kwargs)
        if fire and when == "before":
            die()
        result = original(*args, **kwargs)
        if fire and when == "after":
            die()
        return result

    setattr(owner, name, staticmethod(wrapper) if is_static else wrapper)


def _pause(path: str) -> None:
    """Announce the step (PATH.reached) and wait until the test says go (PATH.go)."""
    import time

    with open(path + ".reached", "w"):
        pass
    deadline = time.monotonic() + 300
    while not os.path.exists(path + ".go") and time.monotonic() < deadline:
        time.sleep(0.05)


def _fill(path: str) -> None:
    """Fill the filesystem holding path until it is full (ENOSPC), then carry on."""
    import errno

    size = 1 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        while True:
            try:
                os.write(fd, b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if size == 512:
                    break
                size = 512  # top up the last free blocks
    finally:
        os.close(fd)


if _SPEC:
    try:
        _install(_SPEC)
    except Exception as exc:  # a kill point that cannot be installed must not pass silently
        import sys

        print(f"killhook: cannot install FAULT_KILL={_SPEC}: {exc!r}", file=sys.stderr)
        os._exit(99)
