"""The status page routes (thin; the summary is built by ``server.status``).

``GET /ui`` is a static page (HTML, JS, CSS and an SVG icon shipped in ``server/static``, no CDN)
that polls ``GET /ui/api/summary``. Every route here needs a key, as a bearer token or as the
password of HTTP Basic credentials, which a browser asks for on the 401. A tenant key sees its
own tenant's data. The page's roll back button calls the existing admin route with the admin key
typed into the page (never ambient credentials, so another site cannot trigger it).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from protocol.errors import AuthenticationFailed, NotFound
from server.auth import Principal
from server.services import Services

router = APIRouter(prefix="/ui", include_in_schema=False)

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_ASSETS = frozenset({"ui.js", "ui.css", "icon.svg"})
# Everything the page loads comes from sharpen itself; nothing inline, nothing from elsewhere.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


_CHALLENGE = 'Basic realm="sharpen", charset="UTF-8"'  # a browser then asks for the key (as the password)


def _viewer(request: Request) -> tuple[Services, Principal]:
    s: Services = request.app.state.services
    try:
        return s, s.auth.authenticate(request.headers.get("authorization"), basic=True)
    except AuthenticationFailed as exc:
        raise AuthenticationFailed(exc.message + " The status page takes the key as a bearer token or as "
                                   "the password of HTTP Basic credentials.", challenge=_CHALLENGE) from None


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _asset(name: str) -> Response:
    return Response(_read(name), media_type=_TYPES[Path(name).suffix], headers=_HEADERS)


@router.get("")
async def page(request: Request) -> Response:
    _viewer(request)
    return _asset("ui.html")


@router.get("/static/{name}")
async def static(request: Request, name: str) -> Response:
    _viewer(request)
    if name not in _ASSETS:
        raise NotFound(f"No asset '{name}'.")
    return _asset(name)


@router.get("/api/summary")
async def summary(request: Request) -> dict[str, Any]:
    s, who = _viewer(request)
    return await s.status.summary(who)


@router.get("/evals/{name}")
async def eval_plot(request: Request, name: str) -> Response:
    s, _ = _viewer(request)
    path = s.status.evals.plot(name)
    if path is None:
        raise NotFound(f"The latest eval report has no plot '{name}'.")
    return FileResponse(path, media_type="image/png", headers=_HEADERS)
