"""HTTP routes: thin functions that hand requests to the service. No logic beyond picking the dependency."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.errors import APIError, not_ready
from server.api.responses import ResponsesRequest
from server.api.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    UnloadAdapterRequest,
)
from server.api.service import CompletionService

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def runtime(request: Request):
    return request.app.state.runtime


def _check_key(request: Request) -> None:
    keys = runtime(request).settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k.encode())
                                             for k in keys):
        raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_key(request: Request) -> None:
    _check_key(request)


def require_key_for_health(request: Request) -> None:
    if runtime(request).settings.auth_health:
        _check_key(request)


def require_key_for_metrics(request: Request) -> None:
    if runtime(request).settings.auth_metrics:
        _check_key(request)


def get_service(request: Request) -> CompletionService:
    rt = runtime(request)
    if rt.draining:
        raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "5"})
    if rt.service is None:
        raise not_ready(rt.status_message())
    return rt.service


ServiceDep = Annotated[CompletionService, Depends(get_service)]

api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], tags=["OpenAI-compatible"])
tokens = APIRouter(dependencies=[Depends(require_key)], tags=["tokenizer (vLLM's)"])
ops = APIRouter(tags=["operations"])


def _arrival(request: Request) -> float:
    return request.scope.get("state", {}).get("arrival", time.monotonic())


@api.post("/chat/completions", response_model=None, responses={
    200: {"model": ChatCompletion, "description": "JSON, or `text/event-stream` chunks with stream: true",
          "content": {"text/event-stream": {}}}, **ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Response:
    return await service.chat(request, body, _arrival(request))


@api.post("/completions", response_model=None, responses={
    200: {"model": Completion, "description": "JSON, or `text/event-stream` chunks with stream: true",
          "content": {"text/event-stream": {}}}, **ERRORS})
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    return await service.completion(request, body, _arrival(request))


@api.post("/responses", response_model=None, responses={
    200: {"description": "a `response` object, or `text/event-stream` events with stream: true",
          "content": {"text/event-stream": {}}}, **ERRORS})
async def responses(body: ResponsesRequest, request: Request, service: ServiceDep) -> Response:
    return await service.responses(request, body, _arrival(request))


@api.get("/responses/{response_id}", responses=ERRORS)
async def get_response(response_id: str, service: ServiceDep) -> dict:
    return service.stored_response(response_id)


@api.delete("/responses/{response_id}", responses=ERRORS)
async def delete_response(response_id: str, service: ServiceDep) -> dict:
    return service.delete_response(response_id)


@api.post("/load_lora_adapter", responses={403: {"model": ErrorResponse}, **ERRORS}, tags=["adapters (vLLM's)"])
async def load_lora_adapter(body: LoadAdapterRequest, service: ServiceDep) -> dict:
    return await service.load_adapter(body)


@api.post("/unload_lora_adapter", responses={403: {"model": ErrorResponse}, **ERRORS}, tags=["adapters (vLLM's)"])
async def unload_lora_adapter(body: UnloadAdapterRequest, service: ServiceDep) -> dict:
    return service.unload_adapter(body)


@api.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(service: ServiceDep) -> dict:
    return service.list_models()


@api.get("/models/{model:path}", response_model=ModelCard, responses=ERRORS)
async def get_model(model: str, service: ServiceDep) -> dict:
    service.resolve_model(model)
    return next(m for m in service.list_models()["data"] if m["id"] == model)


@tokens.post("/tokenize", responses=ERRORS)
async def tokenize(body: TokenizeRequest, service: ServiceDep) -> dict:
    return await service.tokenize(body)


@tokens.post("/detokenize", responses=ERRORS)
async def detokenize(body: DetokenizeRequest, service: ServiceDep) -> dict:
    return service.detokenize(body)


@ops.get("/health", dependencies=[Depends(require_key_for_health)], summary="Liveness",
         responses={503: {"model": ErrorResponse}})
async def health(request: Request) -> JSONResponse:
    rt = runtime(request)
    engine = rt.engine
    if rt.status == "failed" or (engine is not None and getattr(engine, "failed", None)):
        return JSONResponse({"status": "failed", "detail": rt.status_message()}, status_code=503)
    return JSONResponse({"status": "ok"})


@ops.get("/ready", dependencies=[Depends(require_key_for_health)], summary="Readiness",
         responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> JSONResponse:
    rt = runtime(request)
    if rt.ready and not rt.draining:
        return JSONResponse({"status": "ready", "models": list(rt.service.model_ids)})
    status = "draining" if rt.draining else rt.status
    return JSONResponse({"status": status, "detail": rt.status_message()}, status_code=503,
                        headers={"Retry-After": "5"})


@ops.get("/metrics", dependencies=[Depends(require_key_for_metrics)], summary="Prometheus metrics",
         response_class=Response)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(runtime(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
