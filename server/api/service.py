"""The API's one object: the validate stage (server/api/plans.py) and the rest of the pipeline
(server/api/pipeline.py), with a formatter per API shape. Routes call one method each."""

from __future__ import annotations

import time
from concurrent.futures import Executor
from typing import Any

from fastapi import Request

from server.api.formatters import ChatFormat, CompletionFormat
from server.api.images import ImageLoader
from server.api.metrics import Metrics
from server.api.pipeline import EngineClient, Pipeline
from server.api.plans import Planner
from server.api.prompting import PromptBuilder
from server.api.responses import ResponsesFormat, ResponsesRequest, ResponseStore
from server.api.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.settings import Settings

CHAT, COMPLETION = ChatFormat(), CompletionFormat()


class CompletionService:
    def __init__(self, settings: Settings, engine: EngineClient, builder: PromptBuilder, images: ImageLoader,
                 metrics: Metrics, experts: Any | None = None, executor: Executor | None = None):
        self.engine, self.builder = engine, builder
        self.plans = Planner(settings, engine, builder, experts, executor)
        self.pipeline = Pipeline(settings, engine, builder, images, metrics, experts, executor)
        self.adapters, self.model_ids = self.plans.adapters, self.plans.model_ids
        self.store = ResponseStore(settings.response_store)
        self.responses_format = ResponsesFormat(self.store)
        self.created = int(time.time())

    @property
    def experts(self) -> Any | None:
        return self.pipeline.experts

    @experts.setter
    def experts(self, registry: Any | None) -> None:  # built after the engine (the caption expert needs it)
        self.plans.experts = self.pipeline.experts = registry

    async def chat(self, http: Request, req: ChatCompletionRequest, arrival: float):
        return await self.pipeline.handle(http, await self.plans.chat(req), CHAT, arrival)

    async def completion(self, http: Request, req: CompletionRequest, arrival: float):
        return await self.pipeline.handle(http, await self.plans.completion(req), COMPLETION, arrival)

    async def responses(self, http: Request, req: ResponsesRequest, arrival: float):
        plan = await self.plans.responses(req, self.store)
        return await self.pipeline.handle(http, plan, self.responses_format, arrival)

    def stored_response(self, response_id: str) -> dict:
        return self.store.get(response_id)[0]

    def delete_response(self, response_id: str) -> dict:
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def list_models(self) -> dict:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": self.created, "owned_by": "lamina",
             "max_model_len": self.engine.max_context} for m in self.model_ids]}

    def resolve_model(self, model: str) -> str | None:
        return self.plans.resolve_model(model)

    async def tokenize(self, req: TokenizeRequest) -> dict:
        return await self.plans.tokenize(req)

    def detokenize(self, req: DetokenizeRequest) -> dict:
        return self.plans.detokenize(req)

    def caption_function(self, loop, adapter: str, timeout: float):
        return self.pipeline.caption_function(loop, adapter, timeout)
