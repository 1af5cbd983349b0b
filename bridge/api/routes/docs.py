"""The API's documentation pages (Swagger UI at /docs, ReDoc at /redoc), their scripts served by the bridge.

FastAPI's own pages load Swagger UI and ReDoc from a public CDN, which many hospital networks cannot
reach: the page stays blank. The same files ship in the ``fastapi-offline`` package (a dependency);
the bridge serves them under ``/docs/assets``, beside the pages, public like the pages and the schema
(they hold no patient data).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS = "/docs"
REDOC = "/redoc"
ASSETS = "/docs/assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def assets_dir() -> Path:
    """Where the installed ``fastapi-offline`` keeps swagger-ui-bundle.js, swagger-ui.css and ReDoc."""
    return Path(str(files("fastapi_offline") / "static"))


def install(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets; the app is made with ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS, StaticFiles(directory=assets_dir()), name="docs-assets")

    def prefix(request: Request) -> str:
        # Behind a proxy that strips a path prefix (uvicorn --root-path), URLs in the page need it back.
        return str(request.scope.get("root_path", "")).rstrip("/")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
        )

    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,  # another public host the page would wait for
        )

    app.add_api_route(DOCS, swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route(OAUTH2_REDIRECT, oauth2_redirect, methods=["GET"], include_in_schema=False)
    app.add_api_route(REDOC, redoc, methods=["GET"], include_in_schema=False)
