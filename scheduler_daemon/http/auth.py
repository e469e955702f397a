"""Admin authentication: where the token comes from, and who may be served without one.

Every ``/api/v1`` route needs ``Authorization: Bearer <token>`` when a token is
configured (``[http] admin_token_file`` or the systemd credential
``admin-token``), compared in constant time. Without a token the daemon only
binds loopback addresses (see :func:`check_bind_allowed`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Scope

from scheduler_daemon.settings import HttpSettings, SettingsError

#: Largest token file read (a token is a few dozen bytes).
MAX_TOKEN_BYTES = 4096
#: systemd credential name (``LoadCredential=admin-token:…``).
CREDENTIAL_NAME = "admin-token"

#: Returns the current admin token (``None``: no token configured, API open on loopback).
TokenSource = Callable[[], "str | None"]

_bearer = HTTPBearer(auto_error=False, description="The admin token ([http] admin_token_file)")


def token_path(http: HttpSettings) -> Path | None:
    """Where the admin token comes from: the setting, else the systemd credential if present."""
    if http.admin_token_file is not None:
        return http.admin_token_file
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        candidate = Path(creds) / CREDENTIAL_NAME
        if candidate.exists():
            return candidate
    return None


def load_admin_token(http: HttpSettings) -> str | None:
    """Read the admin token (surrounding whitespace stripped); ``None`` if none is configured.

    Raises :class:`~scheduler_daemon.settings.SettingsError` naming the file
    when it is configured but missing, unreadable, empty or absurdly large.
    """
    path = token_path(http)
    if path is None:
        return None
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        raise SettingsError(f"http.admin_token_file: {path}: file not found") from None
    except PermissionError:
        raise SettingsError(f"http.admin_token_file: {path}: permission denied") from None
    except OSError as exc:
        raise SettingsError(f"http.admin_token_file: {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise SettingsError(f"http.admin_token_file: {path}: larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SettingsError(f"http.admin_token_file: {path}: not valid UTF-8") from None
    if not token:
        raise SettingsError(f"http.admin_token_file: {path}: file is empty")
    if any(c.isspace() for c in token):
        raise SettingsError(f"http.admin_token_file: {path}: token must be one line without spaces")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_allowed(http: HttpSettings, token: str | None) -> None:
    """Refuse to expose an unauthenticated admin API beyond loopback."""
    if token is None and not is_loopback(http.bind):
        raise SettingsError(
            f"http.bind: {http.bind} is not a loopback address and no admin token is configured "
            "(set http.admin_token_file or the systemd credential admin-token)"
        )


#: The answer to a request without the right token.
UNAUTHORIZED = "missing or invalid bearer token"


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """FastAPI dependency: 401 unless the bearer token matches the app's current token."""
    expected = request.app.state.token()
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not _matches(given, expected):
        raise HTTPException(401, detail=UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def carries_token(scope: Scope, token: TokenSource) -> bool:
    """Whether an ASGI request carries the current token (as :func:`require_token` reads it), before routing."""
    expected = token()
    if expected is None:
        return True
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, given = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and _matches(given, expected)
    return False
