"""The API's one object: the validate stage (server/api/plans.py) and the rest of the pipeline
(server/api/pipeline.py), with a formatter per API shape. Routes call one method each."""

from __future__ import annotations

import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from fastapi import Request

from models.loading import read_runtime_adapter
from server.api.errors import APIError, bad_request
from server.api.formatters import ChatFormat, CompletionFormat
from server.api.images import ImageLoader
from server.api.metrics import Metrics
from server.api.pipeline import EngineClient, Pipeline
from server.api.plans import Planner
from server.api.prompting import PromptBuilder
from server.api.responses import ResponsesFormat, ResponsesRequest, ResponseStore
from server.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    TokenizeRequest,
    UnloadAdapterRequest,
)
from server.settings import Settings

CHAT, COMPLETION = ChatFormat(), CompletionFormat()


class CompletionService:
    def __init__(self, settings: Settings, engine: EngineClient, builder: PromptBuilder, images: ImageLoader,
                 metrics: Metrics, experts: Any | None = None, executor: Executor | None = None):
        self.settings, self.engine, self.builder = settings, engine, builder
        self.plans = Planner(settings, engine, builder, experts, executor)
        self.pipeline = Pipeline(settings, engine, builder, images, metrics, experts, executor)
        self.store = ResponseStore(settings.response_store)
        self.responses_format = ResponsesFormat(self.store)
        self.created = int(time.time())

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.plans.adapters

    @property
    def model_ids(self) -> tuple[str, ...]:
        return self.plans.model_ids

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

    # ------------------------------------------------------------------------------- runtime adapters
    def _runtime_adapters(self) -> None:
        if not self.settings.allow_runtime_adapters:
            raise APIError(403, "this server does not load adapters at run time: start it with "
                           "--allow-runtime-adapters", code="runtime_adapters_disabled")

    def _adapter_file(self, given: str) -> Path:
        """The file `lora_path` names: inside --adapter-dir when there is one (symlinks resolved first)."""
        path, root = Path(given), self.settings.adapter_dir
        if root is not None:
            root = root.resolve()
            path = (root / path).resolve()
            if not path.is_relative_to(root):
                raise APIError(403, f"lora_path must be inside the adapter folder ({root})", param="lora_path",
                               code="path_not_allowed")
        if not path.is_file():
            raise bad_request(f"no adapter file at {given}", "lora_path", "adapter_not_found")
        return path

    async def load_adapter(self, req: LoadAdapterRequest) -> dict:
        self._runtime_adapters()
        path = self._adapter_file(req.lora_path)
        model, clip = self.engine.loaded.model, self.settings.clip_model
        try:
            await self.engine.load_adapter(req.lora_name, path,
                                           lambda: read_runtime_adapter(model, req.lora_name, path, clip))
        except ValueError as e:  # CheckpointError (the loader's message) or a name / capacity refusal
            param = "lora_name" if type(e) is ValueError else "lora_path"
            raise bad_request(str(e), param, "invalid_adapter") from None
        except OSError as e:
            raise bad_request(f"{req.lora_path}: {e.strerror or e}", "lora_path", "invalid_adapter") from None
        return {"object": "adapter", "id": req.lora_name, "status": "loaded"}

    def unload_adapter(self, req: UnloadAdapterRequest) -> dict:
        self._runtime_adapters()
        try:
            self.engine.unload_adapter(req.lora_name)  # UnknownAdapterError → 404
        except ValueError as e:
            raise bad_request(str(e), "lora_name") from None
        return {"object": "adapter", "id": req.lora_name, "status": "unloaded"}

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
