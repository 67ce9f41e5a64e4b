"""Lamina on Ray Serve: replicas of the unchanged FastAPI app, autoscaled on the engine's queue depth.

Ray Serve is the distributed engine here; this module only wraps what `lamina serve` runs:

    pip install 'lamina[ray]'
    serve run server.ray_serve:build_app experts=none min_replicas=1 max_replicas=4
    serve deploy deploy/ray/serve-config.yaml        # on a running cluster (KubeRay: RayService serveConfigV2)

Each replica builds the app with `server.app.create_app(Settings(...))` (imported lazily, on the replica) and owns
one engine, as one `lamina serve` process does: batching stays inside the replica; Serve's HTTP proxy spreads
requests across replicas and places replicas on the cluster's nodes.

- Readiness: a replica counts as started only once its model is loaded and warmed up (the app's lifespan waits
  for it), so Serve never routes to a loading replica; a failed load fails the replica start. `check_health`
  fails if the runtime failed later. Removing a replica drains it (Serve stops routing to it, in-flight
  requests finish, then the app's shutdown drains the engine).
- Autoscaling: each replica reports the engine's own counts through `record_autoscaling_stats`:
  `num_requests_waiting` (admitted, waiting for a batch slot: the `lamina:num_requests_waiting` gauge of
  /metrics) and `num_requests_running` (in the batch). `QueueDepthPolicy` turns them into a replica count;
  see its docstring for the formula and how it relates to Serve's default `target_ongoing_requests`.
- Every response carries `X-Lamina-Replica: <replica id>`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

log = logging.getLogger("lamina.ray")

DEFAULT_TARGET_WAITING = 2.0
POLICY_PATH = "server.ray_serve:QueueDepthPolicy"
# keys of `build_app` args that configure the deployment; every other key is a Settings field
DEPLOYMENT_KEYS = {"name", "num_replicas", "min_replicas", "max_replicas", "initial_replicas", "target_waiting",
                   "upscale_delay_s", "downscale_delay_s", "look_back_period_s", "num_cpus", "num_gpus",
                   "graceful_shutdown_timeout_s", "settings"}


class QueueDepthPolicy:
    """Serve autoscaling policy on the engine's queue depth (deployment-scoped, `policy_kwargs` below).

        desired = max( Σ running / max_batch ,  (Σ waiting + queued in Serve) / target_waiting )

    Σ running and Σ waiting are the replicas' `num_requests_running` / `num_requests_waiting` (averaged by Serve
    over `look_back_period_s`); "queued in Serve" is `total_queued_requests`: requests Serve holds because every
    replica already has `max_ongoing_requests`. The first term keeps enough replicas to hold the running batches;
    the second adds replicas while the queue is deeper than `target_waiting` per replica. It is what a Kubernetes
    HPA computes from two Pods metrics (`lamina_num_requests_running` with target `max_batch`,
    `lamina_num_requests_waiting` with target `target_waiting`), so both platforms scale on the same signal.

    Serve's default policy instead keeps `total ongoing requests / replicas ≈ target_ongoing_requests`, where
    "ongoing" is what Serve sees (queued at its handles + executing in a replica, including requests still in
    image fetch or the experts). For one Lamina replica, ongoing ≈ running + waiting, so its closest equivalent is
    `target_ongoing_requests = max_batch + target_waiting`; `build_app` sets that too, as the fallback. Serve
    applies min/max replicas, the up/down-scale delays and the scaling factors to what this returns.
    """

    def __init__(self, max_batch: int = 8, target_waiting: float = DEFAULT_TARGET_WAITING):
        if max_batch < 1 or target_waiting <= 0:
            raise ValueError("max_batch must be >= 1 and target_waiting > 0")
        self.max_batch = max_batch
        self.target_waiting = target_waiting
        self._logged: float | None = None

    def desired(self, running: float, waiting: float, queued: float) -> float:
        return max(running / self.max_batch, (waiting + queued) / self.target_waiting)

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        replicas = ctx.current_num_replicas
        if replicas == 0:  # scale from zero: Serve's cold-start path handles it
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        waiting_by_replica = metrics.get("num_requests_waiting") or {}
        running_by_replica = metrics.get("num_requests_running") or {}
        if not waiting_by_replica and not running_by_replica:
            return ctx.target_num_replicas, {}  # no report yet (replicas starting): hold
        queued = float(ctx.total_queued_requests or 0.0)
        running, waiting = sum(running_by_replica.values()), sum(waiting_by_replica.values())
        desired = self.desired(running, waiting, queued)
        bounded = min(max(math.ceil(desired), getattr(ctx, "capacity_adjusted_min_replicas", 0)),
                      getattr(ctx, "capacity_adjusted_max_replicas", math.inf))
        if bounded != ctx.target_num_replicas and bounded != self._logged:
            # once per new decision; runs in Serve's controller, so it lands in logs/serve/controller_*.log
            self._logged = bounded
            logging.getLogger("ray.serve").info(
                "lamina queue-depth policy: running %.1f, waiting %.1f, queued %.1f on %d replica(s) -> %.2f "
                "(%d within bounds)", running, waiting, queued, replicas, desired, bounded)
        return desired, {"last": {"running": running, "waiting": waiting, "queued": queued,
                                  "desired": desired, "replicas": replicas}}


class _ReplicaHeader:
    """ASGI middleware: `X-Lamina-Replica: <id>` on every HTTP response."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-lamina-replica", self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


@serve.ingress()
class LaminaServer:
    """One replica: one Lamina app (one engine, one model). `settings` are `Settings` fields (LAMINA_* names
    without the prefix, lower case); the replica's environment supplies the rest, as for `lamina serve`."""

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = dict(settings or {})
        self.runtime = None
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests)
            self.replica = "local"
        self._gauges = None

    def __serve_build_asgi_app__(self):
        from server.app import create_app  # lazily: only replicas load torch and the model
        from server.settings import Settings

        app = create_app(Settings(**self.settings))
        self.runtime = runtime = app.state.runtime
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan_until_ready(a):
            # Serve starts routing to a replica once its ASGI startup completes: complete it only when ready
            async with inner(a) as state:
                await runtime.wait_ready()
                if not runtime.ready:
                    raise RuntimeError(f"replica {self.replica}: {runtime.status_message()}")
                log.info("replica %s ready", self.replica)
                yield state

        app.router.lifespan_context = lifespan_until_ready
        app.add_middleware(_ReplicaHeader, replica=self.replica)
        return app

    async def check_health(self) -> None:
        if self.runtime is not None and self.runtime.status == "failed":
            raise RuntimeError(self.runtime.status_message())

    def _engine_counts(self) -> tuple[float, float]:
        engine = getattr(self.runtime, "engine", None)
        if engine is None or not hasattr(engine, "stats"):
            return 0.0, 0.0
        stats = engine.stats()
        return float(stats.running), float(stats.waiting)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        running, waiting = await asyncio.to_thread(self._engine_counts)
        self._export(running, waiting)
        return {"num_requests_running": running, "num_requests_waiting": waiting}

    def _export(self, running: float, waiting: float) -> None:
        """The same numbers as Ray metrics (Ray's Prometheus endpoint), tagged by replica."""
        try:
            if self._gauges is None:
                from ray.util.metrics import Gauge

                tags = ("replica",)
                self._gauges = (
                    Gauge("lamina_num_requests_running", "Requests in the engine's batch", tag_keys=tags),
                    Gauge("lamina_num_requests_waiting", "Admitted requests waiting for a slot", tag_keys=tags),
                )
            self._gauges[0].set(running, tags={"replica": self.replica})
            self._gauges[1].set(waiting, tags={"replica": self.replica})
        except Exception:  # metrics are best effort
            log.debug("could not export Ray metrics", exc_info=True)


def _number(value: Any, kind=float):
    return None if value is None or value == "" else kind(value)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder (`serve run server.ray_serve:build_app key=value ...`, or `import_path` with
    `args` in a Serve config file).

    args: any `Settings` field (e.g. `experts: none`, `max_batch: 8`, `llama_dir: /models/7B`), or a `settings`
    mapping of them; and for the deployment: `num_replicas` (fixed; turns autoscaling off), else `min_replicas`
    (1), `max_replicas` (4), `initial_replicas`, `target_waiting` (2), `upscale_delay_s` (10),
    `downscale_delay_s` (300), `look_back_period_s` (30); `num_cpus` (2) and `num_gpus` (0) per replica;
    `graceful_shutdown_timeout_s` (the drain timeout + 5 s); `name` (lamina).
    """
    from server.settings import Settings

    args = dict(args or {})
    settings = {**dict(args.pop("settings", None) or {}),
                **{k: v for k, v in args.items() if k not in DEPLOYMENT_KEYS}}
    checked = Settings(**settings)  # fail here, with pydantic's message, rather than on every replica
    max_batch, target_waiting = checked.max_batch, float(args.get("target_waiting") or DEFAULT_TARGET_WAITING)

    options: dict[str, Any] = {
        "name": args.get("name") or "lamina",
        # what one engine admits (batch + its waiting queue); more would be refused with 429 by the replica
        "max_ongoing_requests": max_batch + max(checked.max_waiting, 1),
        "ray_actor_options": {"num_cpus": _number(args.get("num_cpus")) or 2.0,
                              "num_gpus": _number(args.get("num_gpus")) or 0.0},
        "graceful_shutdown_timeout_s": _number(args.get("graceful_shutdown_timeout_s"))
        or checked.drain_timeout + 5.0,
        "graceful_shutdown_wait_loop_s": 2.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if args.get("num_replicas") not in (None, ""):
        options["num_replicas"] = int(args["num_replicas"])
    else:
        min_replicas = _number(args.get("min_replicas"), int)
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=1 if min_replicas is None else min_replicas,
            max_replicas=_number(args.get("max_replicas"), int) or 4,
            initial_replicas=_number(args.get("initial_replicas"), int),
            target_ongoing_requests=max_batch + target_waiting,  # the default policy's closest equivalent
            upscale_delay_s=_number(args.get("upscale_delay_s")) if args.get("upscale_delay_s") is not None
            else 10.0,
            downscale_delay_s=_number(args.get("downscale_delay_s")) if args.get("downscale_delay_s") is not None
            else 300.0,
            look_back_period_s=_number(args.get("look_back_period_s")) or 30.0,
            policy=AutoscalingPolicy(policy_function=POLICY_PATH,
                                     policy_kwargs={"max_batch": max_batch, "target_waiting": target_waiting}),
        )
    deployment = serve.deployment(LaminaServer).options(**options)
    return deployment.bind(settings)

