"""API keys: each maps to a tenant; a separate admin key guards the admin routes."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from protocol.errors import AuthenticationFailed, PermissionDenied
from server.settings import Settings

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    """Who is asking: the tenant that scopes memory, adapters and caches, and admin rights."""

    tenant: str
    admin: bool = False


class Authenticator:
    """Checks ``Authorization: Bearer <key>``. With no keys configured, everyone is the
    default tenant (the server then refuses non-loopback binds unless ``--insecure``)."""

    def __init__(self, settings: Settings) -> None:
        self._keys = dict(settings.api_keys)
        self._admin = settings.admin_key
        self.enabled = bool(self._keys)
        self._anonymous = Principal(DEFAULT_TENANT, admin=not self._admin)

    def authenticate(self, authorization: str | None, *, basic: bool = False) -> Principal:
        """The principal behind ``authorization``. With ``basic``, HTTP Basic credentials are
        accepted too (the key as the password): a browser asks for them by itself. Only read-only
        pages take them, since a browser sends them unasked, also from other sites' forms."""
        if not self.enabled and not self._admin:
            return self._anonymous
        key = _bearer(authorization) if not basic else _bearer(authorization) or _basic(authorization)
        if self._admin and key is not None and hmac.compare_digest(key, self._admin):
            return Principal(DEFAULT_TENANT, admin=True)
        if not self.enabled:
            return Principal(DEFAULT_TENANT)
        if key is None:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
        tenant = self._keys.get(key)
        if tenant is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return Principal(tenant)

    def require_admin(self, authorization: str | None) -> Principal:
        p = self.authenticate(authorization)
        if not p.admin:
            raise PermissionDenied("This route needs the admin key.")
        return p


def _basic(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password or None


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
