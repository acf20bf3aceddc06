"""The HTTP routes (FastAPI) over a :class:`~serve.service.Service`; no Ray here.

Every error body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``, unknown routes
and unexpected failures included: a bad request never takes the replica down.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import CONTENT_TYPE
from .protocol import APIError, parse_chat, parse_completion, parse_json_body

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
#: Request bodies larger than this get 413 (a full 8k-token context is well under 1 MiB).
MAX_BODY_BYTES = 8 * 1024 * 1024


async def read_body(request: Request) -> bytes:
    too_big = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(part)
    return b"".join(chunks)


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status in (429, 503):
        headers = {"Retry-After": "1"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def build_app(service) -> FastAPI:
    app = FastAPI(title="ffnskip", description="OpenAI-compatible completions with adaptive FFN skipping",
                  docs_url=None, redoc_url=None, openapi_url=None)

    def record(endpoint: str, status) -> None:
        service.metrics.requests.labels(endpoint, str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        record(request.url.path, exc.status)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, msg, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(APIError(422, str(first.get("msg", "invalid request")), param=param))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        record(request.url.path, 500)
        # No exception text in the body (it may carry paths, prompts or keys): it is in the log.
        return error_response(APIError(500, "internal server error (logged on the server)", type="server_error",
                                       code="internal_error"))

    async def generate(request: Request, endpoint: str):
        service.check_api_key(request.headers.get("authorization"))
        body = parse_json_body(await read_body(request))
        req = parse_chat(body) if endpoint == CHAT else parse_completion(body)
        if req.logprobs is not None:  # echo + logprobs: prompt scoring (lm-eval's loglikelihood)
            out = await service.score(req)
            record(endpoint, 200)
            return JSONResponse(out)
        greq, meta = await service.submit_async(req)  # tokenisation and chat templating off the event loop
        if req.stream:
            return StreamingResponse(service.stream(greq, meta, lambda s: record(endpoint, s)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            out = await service.complete(greq, meta)
        except asyncio.CancelledError:
            record(endpoint, "cancelled")
            raise
        record(endpoint, 200)
        return JSONResponse(out)

    @app.post(CHAT)
    async def chat_completions(request: Request):
        return await generate(request, CHAT)

    @app.post(COMPLETIONS)
    async def completions(request: Request):
        return await generate(request, COMPLETIONS)

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_api_key(request.headers.get("authorization"))
        return service.models()

    @app.get("/v1/policy")
    async def get_policy(request: Request):
        service.check_api_key(request.headers.get("authorization"))
        return service.policy_view()

    @app.put("/v1/policy")
    async def put_policy(request: Request):
        service.check_admin_key(request.headers.get("authorization"))
        body = parse_json_body(await read_body(request))
        out = await service.swap_policy(body)
        record("/v1/policy", 200)
        return out

    # lm-evaluation-harness's remote tokenizer (so it needs no local tokenizer)
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        service.check_api_key(request.headers.get("authorization"))
        return service.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        service.check_api_key(request.headers.get("authorization"))
        body = parse_json_body(await read_body(request))
        return await asyncio.to_thread(service.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        service.check_api_key(request.headers.get("authorization"))
        body = parse_json_body(await read_body(request))
        return await asyncio.to_thread(service.detokenize, body)

    @app.get("/healthz")
    async def healthz():
        return service.health()

    @app.get("/metrics")
    async def metrics():
        return Response(service.render_metrics(), media_type=CONTENT_TYPE)

    return app
