"""Docker cannot run on CI's machine, so check what can be checked without it: docker/compose.yaml
parses and wires PostgreSQL's archive_command to pitr against MinIO, the image installs pitr
with the very `pip install` the tests use (scripts/setup.sh), and README documents the commands
— the compose ones, and every command and setting pitr has."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "compose.yaml has no services"
    return doc


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _settings(service: dict[str, Any]) -> dict[str, str]:
    """The `-c name=value` server settings of a postgres service's command."""
    cmd = _command(service)
    out = {}
    for flag, value in zip(cmd, cmd[1:], strict=False):
        if flag == "-c":
            name, _, val = value.partition("=")
            out[name.strip()] = val.strip()
    return out


def test_compose_runs_postgres_archiving_with_pitr_into_minio(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"minio", "createbucket", "postgres"} <= set(services)
    assert str(services["minio"]["image"]).startswith("minio/minio")
    assert str(services["createbucket"]["image"]).startswith("minio/mc")
    pg = services["postgres"]
    assert pg["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / pg["build"]["context"] / pg["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"

    conf = _settings(pg)
    assert conf.get("archive_mode") == "on"
    assert conf.get("wal_level") in ("replica", "logical")
    argv = shlex.split(conf.get("archive_command", ""))
    assert argv[-2:] == ["wal-push", "%p"] and Path(argv[0]).name == "pitr", conf.get("archive_command")

    env = pg["environment"]
    m = re.fullmatch(r"s3://([a-z0-9.-]+)/\S+", env["PITR_REPO"])
    assert m, env["PITR_REPO"]
    assert re.fullmatch(r"http://minio:\d+", env["PITR_S3_ENDPOINT"])
    assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]

    # the bucket the repo names is the one the init container creates, before postgres starts
    bucket_cmd = " ".join(_command(services["createbucket"]))
    assert f"mc mb --ignore-existing local/{m[1]}" in bucket_cmd
    assert pg["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"
    assert services["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_pitr_tool_shares_the_cluster_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    tool, pg = services["pitr"], services["postgres"]
    assert tool["image"] == pg["image"]
    assert tool["volumes"] == pg["volumes"]
    assert tool["environment"]["PITR_REPO"] == pg["environment"]["PITR_REPO"]
    assert tool.get("user") == "postgres"
    assert set(compose["volumes"]) == {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}


def _setup_install() -> tuple[list[str], str]:
    """(pip flags, extras) of scripts/setup.sh's non-editable install."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    m = re.search(r"^pipq=\((.*)\)$", text, re.M)
    assert m, "scripts/setup.sh no longer defines pipq=(... pip install ...)"
    words = shlex.split(m[1])
    assert words[1] == "install", words
    flags = words[2:]
    m = re.search(r'^\s*"\$\{pipq\[@\]\}" "\$ROOT(\[[^\]]*\])" >&2$', text, re.M)
    assert m, "scripts/setup.sh no longer installs \"$ROOT[extras]\" non-editably"
    return flags, m[1]


def _docker_install() -> tuple[list[str], str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.startswith("RUN") and "pip install" in line]
    assert len(runs) == 1, "the Dockerfile should install pitr with exactly one pip install"
    cmd = next(part for part in runs[0][3:].split("&&") if "pip install" in part)
    words = shlex.split(cmd)
    i = words.index("install")
    assert Path(words[i - 1]).name == "pip"
    flags, target = words[i + 1:-1], words[-1]
    m = re.fullmatch(r"/src(\[[^\]]*\])", target)
    assert m, f"unexpected install target {target!r}"
    return flags, m[1]


def test_image_installs_pitr_with_the_same_pip_install_as_the_tests() -> None:
    setup_flags, setup_extras = _setup_install()
    docker_flags, docker_extras = _docker_install()
    assert docker_flags == setup_flags
    assert docker_extras == setup_extras
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all(e in extras for e in setup_extras.strip("[]").split(","))


def test_dockerfile_copies_what_it_uses_and_links_pitr() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG PG_MAJOR=15$", text, re.M) and "FROM postgres:${PG_MAJOR}" in text
    for m in re.finditer(r"^COPY (.+) (\S+)$", text, re.M):
        for src in m[1].split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    init = DOCKER / "initdb-pitr.sh"
    assert init.stat().st_mode & 0o111, "docker/initdb-pitr.sh must be executable"
    assert re.search(r"^pitr init$", init.read_text(), re.M)
    assert "ln -s /opt/pitr/bin/pitr /usr/local/bin/pitr" in text  # archive_command calls plain `pitr`


def test_readme_documents_the_compose_backup_and_restore() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in ("docker compose -f docker/compose.yaml up -d --build",
                 "docker compose -f docker/compose.yaml exec -u postgres postgres pitr backup",
                 "docker compose -f docker/compose.yaml run --rm pitr restore"):
        assert line in readme, f"README.md does not show `{line}`"


def test_readme_tables_cover_every_command_and_setting() -> None:
    from dataclasses import fields

    from pitr.cli.app import app
    from pitr.config import Settings

    readme = (ROOT / "README.md").read_text()
    commands = [c.name for c in app.registered_commands if c.name]
    assert {"init", "wal-push", "wal-fetch", "backup", "restore", "info"} <= set(commands)
    missing = [c for c in commands if f"`pitr {c}" not in readme]
    assert not missing, f"README's commands table lacks {missing}"
    keys = [f.name for f in fields(Settings) if f.name != "extra"]
    missing = [k for k in keys if f"`{k}`" not in readme and f"`--{k.replace('_', '-')}" not in readme]
    assert not missing, f"README's configuration tables lack {missing}"
