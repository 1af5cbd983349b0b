"""The API's own documentation (/docs, /redoc, /openapi.json) behind its authentication.

FastAPI serves these anonymously; with authentication configured the bridge serves them itself,
to authenticated callers only, unless BRIDGE_API_DOCS_AUTH=false opens them (exposure.needs_auth).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from bridge.api.deps import caller, mount_path

DOCS, REDOC, OPENAPI = "/docs", "/redoc", "/openapi.json"

router = APIRouter(include_in_schema=False, dependencies=[Depends(caller)])


@router.get(OPENAPI)
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI schema, as FastAPI builds it."""
    return JSONResponse(request.app.openapi())


@router.get(DOCS)
async def swagger(request: Request) -> HTMLResponse:
    """Swagger UI over the schema (the browser sends its session cookie for the schema too)."""
    return get_swagger_ui_html(openapi_url=mount_path(request) + OPENAPI, title=request.app.title)


@router.get(REDOC)
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc over the schema."""
    return get_redoc_html(openapi_url=mount_path(request) + OPENAPI, title=request.app.title)
