"""Who may read a served store: key tables, keys files, generated keys, and the loopback rule.

`pixcrawler serve` needs no key on a loopback interface (only this machine can connect), and
needs one everywhere else: `--api-key`, `--keys-file`, or `--generate-key`, which makes one and
writes it to a file readable by its owner only. A key is never printed or logged: the server
says where a generated key can be read, not what it is.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Literal

__all__ = ["Access", "generated_key", "is_loopback", "load_keys"]

Access = Literal["*"] | frozenset[str]
"""What one key may read: every job (`"*"`) or the named jobs."""

GENERATED_KEY_FILE = ".pixcrawler-api-key"


def load_keys(
    *, api_key: str | None = None, keys_file: str | os.PathLike[str] | None = None
) -> dict[str, Access]:
    """Builds the key table: `api_key` reads every job; a keys file grants what it says.

    The keys file is JSON: `{"<key>": ["job_a", "job_b"] or "*"}`.

    Raises:
        ValueError: the keys file is unreadable or malformed, or no key at all was given.
    """
    keys: dict[str, Access] = {}
    if keys_file is not None:
        try:
            table = json.loads(Path(keys_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read keys file {os.fspath(keys_file)}: {exc}") from exc
        if not isinstance(table, dict):
            raise ValueError(f'keys file {os.fspath(keys_file)} must be {{"<key>": [...] or "*"}}')
        for key, grant in table.items():
            if not key:
                raise ValueError(f"keys file {os.fspath(keys_file)} holds an empty key")
            if grant == "*":
                keys[key] = "*"
            elif isinstance(grant, list) and all(isinstance(j, str) for j in grant):
                keys[key] = frozenset(grant)
            else:
                # Name the position, not the key: keys never reach a message.
                raise ValueError(
                    f"keys file {os.fspath(keys_file)}: each value must be a list of job ids "
                    f'or "*", got {grant!r}'
                )
    if api_key:
        keys[api_key] = "*"
    if not keys:
        raise ValueError("no API key: pass --api-key, set PIXCRAWLER_API_KEY, or pass --keys-file")
    return keys


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1, localhost).

    An unresolvable name is not loopback: binding it fails anyway, with its own message.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )


def generated_key(store: str | os.PathLike[str]) -> tuple[str, Path]:
    """The key of `<store>/.pixcrawler-api-key`, made (mode 600) the first time; and that path.

    The file sits beside `jobs/`, where the server never serves from. It is written under a
    temporary name and renamed, so a reader never sees half a key; a later start reuses it,
    so clients keep working across restarts.
    """
    path = Path(store) / GENERATED_KEY_FILE
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        key = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"cannot read the generated key file {path} ({exc}); delete it to make a new key"
        ) from exc
    if key:
        return key, path
    key = secrets.token_urlsafe(24)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return key, path
