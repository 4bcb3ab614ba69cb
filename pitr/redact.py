"""Hide credentials in text pitr shows: archive_command values, error messages, log lines.

Anything that looks like a secret becomes `***`, keeping what names it so the reader still sees
where it was: `AWS_SECRET_ACCESS_KEY=***`, `password=***`, `--password ***`,
`https://user:***@host`, `Bearer ***`, and well-known token shapes (AWS access key IDs, GitHub and
Slack tokens). Imports nothing of pitr: every layer and the fast wal-push path may use it.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# names of things that hold secrets (environment variables, conninfo keys, JSON keys, flags)
_SECRETISH = (r"[A-Za-z0-9_\-]*(?:secret|passw(?:or)?d|passphrase|token|credential|api[_\-]?key|access[_\-]?key"
              r"|private[_\-]?key|auth)[A-Za-z0-9_\-]*")
_VALUE = r"""(?:'[^']*'|"[^"]*"|[^\s'";&|]+)"""

_NOT_SECRET = re.compile(r"[_\-](?:file|path|dir|command|cmd)\W*$", re.I)  # names a file or program, not the secret


def _keep_name(m: re.Match[str]) -> str:
    pre = m.group("pre")
    if _NOT_SECRET.search(pre.rstrip("=: \t\"'")):
        return m.group(0)
    quote = '"' if m.group(0)[len(pre):].startswith('"') else ""
    return f"{pre}{quote}{MASK}{quote}"


_RULES: list[tuple[re.Pattern[str], Any]] = [
    # URLs with user:password@ (postgresql://u:p@h, https://u:p@minio)
    (re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]+:)[^\s@/]+(?=@)"), rf"\g<pre>{MASK}"),
    # --password VALUE, --password=VALUE, --api-key=VALUE
    (re.compile(rf"(?P<pre>--{_SECRETISH}(?:=|\s+))(?!-){_VALUE}", re.I), _keep_name),
    # "password": "x" (JSON)
    (re.compile(rf"""(?P<pre>["']{_SECRETISH}["']\s*:\s*)(?:"[^"]*"|'[^']*'|[^\s,}}]+)""", re.I), _keep_name),
    # NAME=VALUE, NAME = VALUE (environment assignments, libpq conninfo keywords)
    (re.compile(rf"(?P<pre>(?<![A-Za-z0-9_\-]){_SECRETISH}\s*=\s*){_VALUE}", re.I), _keep_name),
    # Authorization: Bearer/Basic …
    (re.compile(r"(?P<pre>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=\-]{8,}"), rf"\g<pre>{MASK}"),
    # well-known token shapes, wherever they stand
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), MASK),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}\b"), MASK),
]


def redact(text: str) -> str:
    """text with every credential-looking value replaced by ***."""
    if not text:
        return text
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text
