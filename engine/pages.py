"""The browser side: the engine's static assets (the JS client) and the pages apps ship.

An app ships a page by putting `index.html` next to its `manifest.json`, in the app's own
folder; the page is served at `/<slug>/` and loads the client from `/static/realtime.js`.
Nothing else in the app's folder is served.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/static"
PAGE_FILE = "index.html"
MANIFEST_FILE = "manifest.json"

# Development pages may carry a token in their URL: never send it on as a Referer.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def page_of(manifest_path: str | Path) -> Path | None:
    """The page shipped next to a `<app>/manifest.json`, if there is one."""
    path = Path(manifest_path)
    if path.name != MANIFEST_FILE:
        return None
    page = path.parent / PAGE_FILE
    return page if page.is_file() else None


def add_app_page(app: FastAPI, app_slug: str, page: Path) -> str:
    """Serve `page` at `/<slug>/`; the mounted path (`/<slug>` redirects to it)."""
    page = page.resolve()

    async def serve_page() -> FileResponse:
        return FileResponse(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    path = f"/{app_slug}/"
    app.add_api_route(
        path, serve_page, methods=["GET"], name=f"{app_slug}:page", include_in_schema=False
    )
    return path


def mount_static(app: FastAPI) -> None:
    """Serve `engine/static/` (the browser client) at `/static/`. Mount it after the apps'
    routes, so that an app's own routes always win."""
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")
