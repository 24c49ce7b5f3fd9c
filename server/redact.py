"""What the server shows of what it was given or holds: URLs without their credentials (/ready,
logs, messages), and client-supplied values clipped before they are echoed in an error."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """``url`` without what may carry a credential (user info, query, fragment)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def clip(value: str, limit: int = 64) -> str:
    """``value`` cut to ``limit`` characters (marked), for echoing a client's id or name."""
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"
