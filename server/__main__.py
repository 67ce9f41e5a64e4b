"""`lamina serve [flags]`: run the server (one uvicorn worker) on the configured model.

Every `Settings` field is a flag: `--field-name` ↔ `LAMINA_FIELD_NAME`; flags win over the environment.
Repeatable flags: `--adapter NAME=PATH`, `--api-key KEY`, `--cors-origin ORIGIN`. Lists otherwise take
comma-separated values (`--experts ocr,caption`, `--experts none`).

SIGTERM/SIGINT drains: readiness and new requests get 503, in-flight requests finish (up to
--drain-timeout), then the process exits 0. A second signal exits at once. Startup failures (a missing or
corrupt checkpoint) exit 1 with the loader's message.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import types
import typing
from typing import Any

import uvicorn
from pydantic import ValidationError

from server.settings import Settings

log = logging.getLogger("lamina.server")

# field → (flag, metavar) where the flag is not simply --field-name; "append" flags repeat
REPEATED = {"adapters": ("--adapter", "NAME=PATH"), "api_keys": ("--api-key", "KEY"),
            "cors_origins": ("--cors-origin", "ORIGIN")}
METAVARS = {"experts": "NAMES|none", "clip_model": "NAME_OR_JSON", "llama_dir": "DIR", "tokenizer": "PATH",
            "clip_weights": "PATH", "gguf": "PATH", "kv_cache_bytes": "BYTES", "image_max_bytes": "BYTES",
            "image_formats": "FORMATS", "image_allowed_hosts": "HOSTS", "max_body_bytes": "BYTES"}


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina", description="Lamina: an OpenAI-compatible server for "
                                     "multimodal LLaMA-Adapter V2 models, with vision experts.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP server",
                           description="Run the server. With no model flags it serves the embedded "
                           "SmolLM2-135M-Instruct with the OCR, detection and caption experts. Every flag also "
                           "reads LAMINA_<FLAG> from the environment (e.g. --max-context ↔ LAMINA_MAX_CONTEXT).",
                           )
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        if isinstance(default, dict) or default in (None, "", []):
            shown = "none"
        env = f"LAMINA_{name.upper()}"
        help_text = f"{info.description + '; ' if info.description else ''}default {shown}; env {env}"
        if name in REPEATED:
            flag, metavar = REPEATED[name]
            serve.add_argument(flag, dest=name, action="append", metavar=metavar,
                               help=f"{help_text} (repeatable)", default=argparse.SUPPRESS)
            continue
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        if _is_bool(annotation):
            serve.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text,
                               default=argparse.SUPPRESS)
        else:
            serve.add_argument(flag, dest=name, metavar=METAVARS.get(name), choices=_choices(annotation),
                               help=help_text, default=argparse.SUPPRESS)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {k: v for k, v in vars(args).items() if k != "command"}
    return Settings(**values)


def _format_validation(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if not isinstance(p, int))
        flag = f"--{where.replace('_', '-')}" if where else "settings"
        lines.append(f"  {flag}: {e.get('msg', '').removeprefix('Value error, ')}")
    return "invalid settings:\n" + "\n".join(lines)


def serve(settings: Settings) -> int:
    from server.api.middleware import configure_logging
    from server.app import create_app

    configure_logging(settings.log_level, settings.json_logs)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, log_config=None,
                            timeout_graceful_shutdown=5, lifespan="on", server_header=False)
    server = DrainingServer(config, app.state.runtime, settings.drain_timeout)
    app.state.runtime.on_fatal = server.fail
    server.run()
    return server.exit_code


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before uvicorn's own shutdown."""

    def __init__(self, config, runtime, drain_timeout: float):
        super().__init__(config)
        self.runtime, self.drain_timeout = runtime, drain_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def fail(self, message: str) -> None:
        self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        if self._draining or self._loop is None or self.should_exit:
            self.should_exit = True  # a second signal: stop now
            self.force_exit = self.force_exit or self._draining
            return
        self._draining = True
        log.info("signal %d: draining (up to %.0f s); send it again to stop at once", sig, self.drain_timeout)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.runtime.drain(self.drain_timeout)
        finally:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"lamina: {_format_validation(e)}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
