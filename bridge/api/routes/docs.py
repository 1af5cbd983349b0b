"""The API's documentation (/docs, /redoc, /openapi.json): assets from the package, behind the auth.

FastAPI's own pages load Swagger UI and ReDoc from a public CDN, which many hospital networks cannot
reach: the page stays blank. The same files ship in the ``fastapi-offline`` package (a dependency);
the bridge serves them under ``/docs/assets`` (public: they hold no patient data). With
authentication configured, the pages and the schema are served to authenticated callers only,
unless BRIDGE_API_DOCS_AUTH=false opens them (exposure.needs_auth).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from bridge.api.auth.caller import caller
from bridge.api.services import mount_path

DOCS = "/docs"
REDOC = "/redoc"
OPENAPI = "/openapi.json"
ASSETS = "/docs/assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def assets_dir() -> Path:
    """Where the installed ``fastapi-offline`` keeps swagger-ui-bundle.js, swagger-ui.css and ReDoc."""
    return Path(str(files("fastapi_offline") / "static"))


async def _openapi(request: Request) -> JSONResponse:
    """The OpenAPI schema, as FastAPI builds it (served here when it needs authentication)."""
    return JSONResponse(request.app.openapi())


async def _swagger_ui(request: Request) -> HTMLResponse:
    root = mount_path(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{OPENAPI}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
    )


async def _oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


async def _redoc(request: Request) -> HTMLResponse:
    root = mount_path(request)
    return get_redoc_html(
        openapi_url=f"{root}{OPENAPI}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
        with_google_fonts=False,  # another public host the page would wait for
    )


def router_for(protect: bool) -> APIRouter:
    """/docs, /redoc and their assets (the app is made with ``docs_url=redoc_url=None``).

    ``protect``: the pages and the schema need the API's authentication (the app is then made with
    ``openapi_url=None`` too, and the schema is served here).
    """
    dependencies: list[Any] = [Depends(caller)] if protect else []
    router = APIRouter(include_in_schema=False, dependencies=dependencies)
    router.mount(ASSETS, StaticFiles(directory=assets_dir()), name="docs-assets")
    router.add_api_route(DOCS, _swagger_ui, methods=["GET"])
    router.add_api_route(OAUTH2_REDIRECT, _oauth2_redirect, methods=["GET"])
    router.add_api_route(REDOC, _redoc, methods=["GET"])
    if protect:
        router.add_api_route(OPENAPI, _openapi, methods=["GET"])
    return router
