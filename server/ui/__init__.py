"""The chat page: `GET /` serves a small self-contained web UI, its assets live under `/ui/`.

Plain HTML + one vanilla JS file + one CSS file, no build step and nothing fetched from elsewhere (a strict
Content-Security-Policy keeps it that way). The page talks to the server's own OpenAI-compatible API:
`GET /v1/models`, then `POST /v1/chat/completions` with `stream: true`; stopping a generation aborts the fetch,
which disconnects and so cancels the request on the server. The page itself holds no secret and needs no key;
the API key a user types is kept in the browser's localStorage and sent as `Authorization: Bearer ...`.

Wire it into an app with `app.include_router(server.ui.router)`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"

# Only these files are served, with their content types (nothing else under static/ is reachable).
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag / Last-Modified) so an upgraded server serves the new page
}

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=FileResponse)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/{name}", response_class=FileResponse)
async def asset(name: str) -> FileResponse:
    media = ASSETS.get(name)
    if media is None:
        raise HTTPException(404, f"no such UI asset: {name}")
    return FileResponse(STATIC / name, media_type=media, headers=HEADERS)
