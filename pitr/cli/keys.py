"""`pitr key-rotate`: re-wrap an encrypted repository's data key under a new key (docs/runbook.md)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from pitr.cli.common import settings_of
from pitr.cli.options import JsonResult
from pitr.cli.repoopen import NEW_PASSPHRASE_ENV, open_repo
from pitr.storage.base import Storage


def lost_key_warning(storage: Storage, where: str) -> None:
    """Said loudly, on stderr, when an encrypted repository is created or its key replaced."""
    import sys

    print(f"""pitr: WARNING: the repository {storage.display} is encrypted with the {where}.
pitr: WARNING: A LOST KEY IS LOST DATA: without this key no backup and no WAL file in this repository
pitr: WARNING: can ever be read again, by anyone. Copy the key (or passphrase) now to a safe place
pitr: WARNING: that does not depend on this host or this repository (docs/runbook.md, "Keys").""",
          file=sys.stderr)


def key_rotate_cmd(
    ctx: typer.Context,
    new_key_file: Annotated[str | None, typer.Option(
        "--new-key-file", help=f"The new key file (32 bytes, hex or base64; mode 600). Without it: "
                               f"the new passphrase from {NEW_PASSPHRASE_ENV}.", show_default=False)] = None,
    json_out: JsonResult = False,
) -> None:
    """Re-wrap an encrypted repository's data key under a new key (one small write); afterwards only
    the new key opens it and every backup and WAL file stays readable."""
    from pitr.cli.render import emit, emit_json
    from pitr.errors import EncryptionKeyError
    from pitr.ops.admin.keys import rotate
    from pitr.repo.keys import passphrase_source, read_key_file

    s = settings_of(ctx)
    new_pass = os.environ.get(NEW_PASSPHRASE_ENV)
    if new_key_file and new_pass is not None:
        raise EncryptionKeyError(f"both --new-key-file and {NEW_PASSPHRASE_ENV} are set",
                                 "give the new key one way only")
    if new_key_file:
        new = read_key_file(new_key_file, "--new-key-file")
    elif new_pass is not None:
        new = passphrase_source(new_pass, NEW_PASSPHRASE_ENV)
    else:
        raise EncryptionKeyError(f"key-rotate needs the new key: --new-key-file PATH or {NEW_PASSPHRASE_ENV}")
    storage = open_repo(s)
    try:
        r = rotate(storage, new)
    finally:
        storage.close()
    lost_key_warning(storage, new.where)
    if json_out:
        emit_json({"repo": storage.display, "rotated": True, "key_source": r.kind})
    else:
        emit(f"repository {storage.display}: data key re-wrapped under the new {r.kind}; "
             "only the new key opens it from now on")


def register(app: typer.Typer) -> None:
    app.command("key-rotate")(key_rotate_cmd)
