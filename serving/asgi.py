"""The app's ASGI-level pieces: responses in each protocol's body, and the hot path past FastAPI.

Imported by serving/app.py only; no Ray here.
"""

import re
from typing import Any

import orjson
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from serving.oip import HEADER_LENGTH
from serving.protocol import RequestError, error_body


def json_response(body: dict[str, Any]) -> Response:
    """JSON by orjson, numpy arrays encoded directly (no tolist(), no standard-library encoder)."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def error_response(exc: RequestError, input_shape: tuple[int, ...] | None) -> JSONResponse:
    return JSONResponse(error_body(exc, input_shape), status_code=exc.status, headers=exc.headers)


def v2_error_response(exc: RequestError) -> JSONResponse:
    """A refusal in the Open Inference Protocol's error body."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


V2_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": "what is wrong and the fix"}}}}
    for code, text in {400: "Malformed request.", 401: "Missing or wrong bearer token.", 404: "Unknown model or version."}.items()
}
V2_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f"A JSON inference request, optionally followed by raw tensor bytes ({HEADER_LENGTH} gives the JSON's length).",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# The TandemServer of this process (every Serve replica is a process of its own), set by
# register_replica when it is constructed.
_replica: Any = None
V2_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def route_path(scope: dict[str, Any]) -> str:
    """The request's path inside the app (the route prefix, Serve's root_path, removed)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def register_replica(server: Any) -> None:
    global _replica
    _replica = server


class HotPath:
    """ASGI middleware: POST /v1/predict and POST /v2/models/{name}[/versions/{v}]/infer go straight
    to the replica's handlers, past FastAPI's routing, dependency solving and per-route wrappers
    (py-spy under load: about a third of the replica's CPU; docs/benchmarks.md, "Serving hot path"). The same
    handlers serve FastAPI's declared routes, which every other request, and these before a
    replica is registered, still take; the OpenAPI document keeps describing them."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        server = _replica
        if server is not None and scope["type"] == "http" and scope["method"] == "POST":
            path = route_path(scope)
            response = None
            if path == "/v1/predict":
                response = await server.predict_v1(Request(scope, receive))
            elif match := V2_INFER_PATH.match(path):
                response = await server.infer_v2(Request(scope, receive), match[1], match[2])
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
