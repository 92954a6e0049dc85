"""The ASGI application: routes to the protocol modules, the API key, the request-body limit, health, metrics,
and the served models' lifetime (closed, in-flight work drained, when the server shuts down).

Starlette rather than FastAPI: the protocol modules validate requests themselves so that each error names the
field the way OpenAI's and KServe's clients expect, and the binary-tensor extension reads the raw body, so
FastAPI's pydantic layer would add a dependency and a second error format without doing the work.

``--api-key``: every route but the health probes (``/health``, ``/v2/health/*``) needs
``Authorization: Bearer <key>``, compared in constant time (``hmac.compare_digest``); otherwise 401. A body
longer than ``max_body_bytes`` is refused with 413 before it is read (declared length) or while it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from importlib import metadata as importlib_metadata

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from engines.serve import kserve, openai_api
from engines.serve.errors import ApiError
from engines.serve.metrics import exposition, registry
from engines.serve.models import Served

OPEN_PATHS = ("/health", "/v2/health/live", "/v2/health/ready")
MAX_BODY_BYTES = 64 << 20


def create_app(models: dict[str, Served], api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
               ) -> Starlette:
    """The application over loaded ``models`` (``engines.serve.models.open_models``), which it closes on
    shutdown."""
    state = {"ready": True}
    metrics = registry(models)
    version = _version()

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"the request body is over the server's limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await read_body(request))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def v1(chat: bool):
        async def handler(request: Request) -> Response:
            try:
                return await openai_api.completions(request, models, await json_body(request), chat)
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status and a message
                return openai_api.error_response(exc)
        return handler

    async def v1_models(request: Request) -> Response:
        return openai_api.models_list(models)

    async def v2_infer(request: Request) -> Response:
        try:
            served = kserve.model(models, request.path_params["name"])
            return await kserve.infer(served, await read_body(request), request)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status and a message
            return kserve.error_response(exc)

    async def v2_model(request: Request) -> Response:
        try:
            return kserve.metadata(kserve.model(models, request.path_params["name"]))
        except ApiError as exc:
            return kserve.error_response(exc)

    async def v2_model_ready(request: Request) -> Response:
        try:
            kserve.model(models, request.path_params["name"])
        except ApiError as exc:
            return kserve.error_response(exc)
        return Response(status_code=200 if state["ready"] else 503)

    async def v2_server(request: Request) -> Response:
        return kserve.server_metadata(version)

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if state["ready"] else 503)

    async def metrics_route(request: Request) -> Response:
        body = await asyncio.to_thread(exposition, metrics)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state["ready"] = False
        # uvicorn has waited for in-flight requests; what a generation server still holds finishes here
        await asyncio.to_thread(lambda: [m.close(drain=True) for m in models.values()])

    model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    routes = [
        Route("/v1/completions", v1(False), methods=["POST"]),
        Route("/v1/chat/completions", v1(True), methods=["POST"]),
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v2", v2_server, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/health", ready, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        *(Route(p, v2_model, methods=["GET"]) for p in model_paths),
        *(Route(p + "/ready", v2_model_ready, methods=["GET"]) for p in model_paths),
        *(Route(p + "/infer", v2_infer, methods=["POST"]) for p in model_paths),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    return _Guard(app, api_key, max_body_bytes)


class _Guard:
    """ASGI middleware: the API key and the declared body length, answered before the app sees the request."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = dict(scope["headers"])
        path = scope["path"]
        if self.expected is not None and path not in OPEN_PATHS:
            if not hmac.compare_digest(head.get(b"authorization", b""), self.expected):
                return await _refuse(scope, receive, send, 401, "a valid API key is needed: send the header "
                                     "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
        length = head.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _refuse(scope, receive, send, 413, f"the request body ({int(length)} bytes) is over the "
                                 f"server's limit of {self.max_body_bytes} bytes")
        return await self.app(scope, receive, send)


async def _refuse(scope, receive, send, status: int, message: str, extra: dict | None = None) -> None:
    if scope["path"].startswith("/v1"):
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        response = JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                                status_code=status, headers=extra)
    elif scope["path"].startswith("/v2"):
        response = JSONResponse({"error": message}, status_code=status, headers=extra)
    else:
        response = PlainTextResponse(message, status_code=status, headers=extra)
    await response(scope, receive, send)


def _version() -> str:
    try:
        return importlib_metadata.version("planforge")
    except importlib_metadata.PackageNotFoundError:
        return "0"
