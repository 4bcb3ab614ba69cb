"""The layer rule (cli -> ops -> repo -> storage, pg -> errors), read from the imports themselves,
and the start-up promise of the archive_command path: no typer, rich or boto3 for a local repo.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.support.walgen import fs_repo, segment

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pitr"
UI = ("pitr.cli", "typer", "rich", "click")
AWS = ("boto3", "botocore", "s3transfer")


@dataclass(frozen=True)
class Import:
    module: str  # importing module, e.g. "pitr.storage.fs"
    target: str  # imported module, e.g. "pitr.errors"
    top_level: bool  # executed at import time (not inside a function body)
    line: int


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package, up level-1 steps
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from pitr import x` may import the submodule pitr.x
    return [base] + [f"{base}.{a.name}" for a in node.names]


def imports() -> list[Import]:
    out: list[Import] = []
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mod = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), str(path))
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                in_function.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for t in _targets(node, package):
                    out.append(Import(mod, t, id(node) not in in_function, node.lineno))
    return out


ALL = imports()


def in_pkg(name: str, *pkgs: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in pkgs)


def violations(source: tuple[str, ...], forbidden: tuple[str, ...], top_level_only: bool = False) -> list[str]:
    return [f"{i.module}:{i.line} imports {i.target}" for i in ALL
            if in_pkg(i.module, *source) and in_pkg(i.target, *forbidden) and (i.top_level or not top_level_only)]


def test_the_parser_sees_imports() -> None:
    """Guard against a vacuous pass: known edges must be found."""
    edges = {(i.module, i.target) for i in ALL}
    assert ("pitr.storage.fs", "pitr.errors") in edges
    assert ("pitr.storage.s3", "boto3") in edges
    assert ("pitr.cli.app", "typer") in edges


def test_library_layers_never_import_the_cli_or_ui() -> None:
    assert violations(("pitr.ops", "pitr.repo", "pitr.storage", "pitr.pg", "pitr.errors", "pitr.config"), UI) == []


def test_nothing_imports_upward() -> None:
    assert violations(("pitr.storage",), ("pitr.ops", "pitr.repo")) == []
    assert violations(("pitr.repo",), ("pitr.ops",)) == []
    assert violations(("pitr.pg",), ("pitr.ops", "pitr.repo", "pitr.storage")) == []
    assert violations(("pitr.errors",), ("pitr",)) == []
    assert [v for v in violations(("pitr.config",), ("pitr",)) if "pitr.errors" not in v] == []


def test_boto3_only_inside_functions_of_the_s3_backend() -> None:
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in ALL if in_pkg(i.target, *AWS)
           and (i.module != "pitr.storage.s3" or i.top_level)]
    assert bad == []


def test_library_layers_do_not_print_or_exit() -> None:
    """Only the CLI talks to the terminal and ends the process."""
    bad: list[str] = []
    for sub in ("ops", "repo", "storage", "pg"):
        for path in sorted((PKG / sub).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f"{getattr(f.value, 'id', '')}.{f.attr}" \
                    if isinstance(f, ast.Attribute) else ""
                if name in ("print", "exit", "quit", "sys.exit", "os._exit"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {name}")
    assert bad == []


def test_every_module_has_a_docstring() -> None:
    missing = [str(p.relative_to(ROOT)) for p in sorted(PKG.rglob("*.py"))
               if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


# --------------------------------------------------------------------------- fast start-up

PROBE = """
import json, sys
from pitr.cli.fast import try_fast
rc = try_fast(sys.argv[1:])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'typer', 'rich', 'click', 'boto3', 'botocore'})
print(json.dumps({'rc': rc, 'heavy': heavy, 'app': 'pitr.cli.app' in sys.modules}))
"""


def probe(args: list[str], env: dict[str, str]) -> dict[str, object]:
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "PITR_CONFIG": "/dev/null"}
    r = subprocess.run([sys.executable, "-c", PROBE, *args], env=base | env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_wal_push_and_fetch_on_a_local_repo_import_nothing_heavy(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    name = "000000010000000000000003"
    (tmp_path / name).write_bytes(segment(name))
    env = {"PITR_REPO": str(repo.root)}
    assert probe(["wal-push", str(tmp_path / name)], env) == {"rc": 0, "heavy": [], "app": False}
    assert probe(["wal-fetch", name, str(tmp_path / "out")], env) == {"rc": 0, "heavy": [], "app": False}
    assert (tmp_path / "out").read_bytes() == (tmp_path / name).read_bytes()
    assert probe(["wal-fetch", "000000010000000000000009", str(tmp_path / "x")], env)["rc"] == 1


def test_the_async_wal_quick_path_imports_no_hash_or_codec_library() -> None:
    """asyncwal and the spool answer PostgreSQL from markers: standard library only (the stage's
    NAME.meta records the envelope's digest, but nothing on this path hashes with it)."""
    code = ("import sys, json\nimport pitr.cli.asyncwal, pitr.ops.wal.spool\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'blake3', 'zstandard', 'numpy'})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


@pytest.mark.usefixtures("s3_bucket")
def test_wal_push_on_s3_loads_boto3_but_no_ui(moto_server, s3_bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same probe sees boto3 when it is really used, so the local-repo check above can fail."""
    env = moto_server.env() | {"PITR_REPO": f"s3://{s3_bucket}/x"}
    r = probe(["wal-fetch", "000000010000000000000009", str(tmp_path / "x")], env)
    assert r["rc"] == 128  # not initialized: a hard failure for restore_command
    heavy = cast("list[str]", r["heavy"])
    assert "boto3" in heavy and not {"typer", "rich", "click"} & set(heavy)
