"""Moto S3 server in its own process, so PostgreSQL's archive_command and the tests share one S3.

Signals: SIGUSR1 closes the listener and drops open connections (simulated outage), SIGUSR2
listens again on the same port, SIGTERM/SIGINT exit. Objects survive outages because moto's
state lives in this process. `--gunicorn` serves the same app under gunicorn's threaded
keep-alive worker instead (benchmarks; no outage support). Exits when its parent dies.

Moto checks If-None-Match / If-Match and then stores, with other requests' threads in between,
so two racing conditional creates can both be acknowledged (seen in CI: `pitr init`'s
conformance test found 2 of 8). AWS evaluates the condition atomically; `atomic_conditions`
serialises conditional writes so the stand-in keeps that promise too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

SIGNALS = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}
CONDITIONS = ("HTTP_IF_NONE_MATCH", "HTTP_IF_MATCH")


def atomic_conditions(app: Any) -> Any:
    """Wrap a WSGI app so conditional PUTs/POSTs (create, multipart completion) run one at a time.

    The response is built inside moto's call (a list), so holding the lock across the call covers
    the check and the store."""
    lock = threading.Lock()

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") in ("PUT", "POST") and any(h in environ for h in CONDITIONS):
            with lock:
                return list(app(environ, start_response))
        return app(environ, start_response)

    return wrapped


def _watch_parent(parent: int) -> None:
    """Never outlive the test run that started us."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


class _Listener:
    """One ThreadedMotoServer plus the connections it accepted, so an outage can cut keep-alives."""

    def __init__(self, host: str, port: int) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(host, port, verbose=False)
        self.server.start()
        srv: Any = self.server._server
        srv.app = atomic_conditions(srv.app)
        self.conns: set[socket.socket] = set()
        lock = threading.Lock()
        process, shutdown = srv.process_request, srv.shutdown_request

        def process_request(request: socket.socket, addr: Any) -> None:
            with lock:
                self.conns.add(request)
            process(request, addr)

        def shutdown_request(request: socket.socket) -> None:
            with lock:
                self.conns.discard(request)
            shutdown(request)

        srv.process_request, srv.shutdown_request = process_request, shutdown_request

    def close(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # type: ignore[union-attr]
        for conn in list(self.conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def run_threaded(host: str, port: int) -> None:
    # Block our signals in every thread; the main thread handles them synchronously via sigwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    listener: _Listener | None = _Listener(host, port)
    while True:
        sig = signal.sigwait(SIGNALS)
        if sig == signal.SIGUSR1 and listener:
            listener.close()
            listener = None
        elif sig == signal.SIGUSR2 and not listener:
            listener = _Listener(host, port)
        elif sig in (signal.SIGTERM, signal.SIGINT):
            return


def run_gunicorn(host: str, port: int, threads: int) -> None:
    from gunicorn.app.base import BaseApplication
    from moto.server import DomainDispatcherApplication, create_backend_app

    class App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            # One worker: moto state is per process. gthread gives HTTP keep-alive.
            opts = {"bind": [f"{host}:{port}"], "workers": 1, "worker_class": "gthread",
                    "threads": threads, "keepalive": 75, "timeout": 300, "loglevel": "warning"}
            for key, value in opts.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return atomic_conditions(DomainDispatcherApplication(create_backend_app))

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    App().run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--gunicorn", action="store_true")
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    if args.gunicorn:
        run_gunicorn(args.host, args.port, args.threads)
    else:
        run_threaded(args.host, args.port)


if __name__ == "__main__":
    main()
