"""The published contract: every error body is :class:`ErrorResponse`, and the
OpenAPI document says so for every status a route can answer.

* A request that fails validation answers 422 with ``{"detail": "<what to fix>",
  "errors": [{"loc", "msg", "type"}]}``, never echoing the input.
* Every other error, FastAPI's and Starlette's included (an unknown route, a wrong
  method, a body that cannot be parsed), answers ``{"detail": "<message>"}``.
* The OpenAPI document lists, per operation: 422 wherever parameters or a body are
  validated, 400 and 413 wherever a body is read, 401 and 403 wherever a key is
  required; all with the :class:`ErrorResponse` schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_DESCRIPTIONS = {
    400: "Bad Request",
    401: "Missing or unknown API key",
    403: "The API key lacks the scope",
    413: "Request body too large",
    422: "Validation Error",
}


def _where(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def validation_body(errors: Sequence[Any]) -> dict[str, Any]:
    cleaned = [
        {
            "loc": [part if isinstance(part, int) else str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "invalid")),
            "type": str(error.get("type", "value_error")),
        }
        for error in errors
    ]
    summary = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in cleaned[:5])
    if len(cleaned) > 5:
        summary += f"; and {len(cleaned) - 5} more"
    return {"detail": f"the request is invalid: {summary or 'see errors'}; see /docs for the expected shape",
            "errors": cleaned}


def _http_detail(request: Request, exc: StarletteHTTPException) -> str:
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        return f"no route {request.method} {request.url.path}; see /docs for the routes"
    if exc.status_code == 405 and detail == "Method Not Allowed":
        allowed = exc.headers.get("allow") if exc.headers else None
        return f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    if isinstance(detail, str):
        return detail
    return json.dumps(detail, default=str)


def install_error_contract(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=validation_body(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            message = "the request body cannot be parsed; send JSON (or multipart/form-data for uploads)"
        else:
            message = _http_detail(request, exc)
        return JSONResponse(status_code=exc.status_code, content={"detail": message}, headers=exc.headers)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]


def _error(code: int) -> dict[str, Any]:
    return {"description": _DESCRIPTIONS.get(code, "Error"), "content": {"application/json": {"schema": ERROR_REF}}}


def _replace_validation_refs(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("$ref") == "#/components/schemas/HTTPValidationError":
            return dict(ERROR_REF)
        return {key: _replace_validation_refs(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_validation_refs(item) for item in node]
    return node


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schema = _replace_validation_refs(schema)
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            codes: list[int] = []
            if operation.get("parameters") or operation.get("requestBody"):
                codes.append(422)
            if operation.get("requestBody"):
                codes += [400, 413]
            if operation.get("security"):
                codes += [401, 403]
            for code in codes:
                responses.setdefault(str(code), _error(code))
    components = schema.get("components", {}).get("schemas", {})
    text = json.dumps(schema)
    for name in ("HTTPValidationError", "ValidationError"):
        if name in components and f'"#/components/schemas/{name}"' not in text:
            del components[name]
    app.openapi_schema = schema
    return schema
