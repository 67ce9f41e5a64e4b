"""Ray Serve scale-out (`server/ray_serve.py`): the autoscaling policy's arithmetic, the application it builds,
and a live local Ray cluster where the unchanged app runs as replicas behind Serve's HTTP proxy.

The live test starts Ray on this machine (num_cpus=2, no dashboard), deploys the embedded SmolLM2 with only the
OCR expert (so a photo is answered), 1 replica that may grow to 2 on the engine's queue depth (max_batch=1 so a
burst queues), sends a streamed chat with an image through the proxy, then a burst: the replicas' reported
`num_requests_waiting` rises, Serve scales to 2 replicas, and responses come from both (X-Lamina-Replica).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.net import free_port

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"


def ctx(replicas: int, running: dict | None, waiting: dict | None, queued: float = 0.0, target: int | None = None):
    metrics = {}
    if running is not None:
        metrics["num_requests_running"] = running
    if waiting is not None:
        metrics["num_requests_waiting"] = waiting
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=target or replicas,
                           aggregated_metrics=metrics, total_queued_requests=queued)


def test_policy_scales_on_queue_depth_and_keeps_running_batches():
    from server.ray_serve import QueueDepthPolicy

    policy = QueueDepthPolicy(max_batch=8, target_waiting=2)
    # idle: desired 0 (Serve clamps to min_replicas)
    assert policy(ctx(2, {"a": 0, "b": 0}, {"a": 0, "b": 0}))[0] == 0
    # full batches, no queue: keep the replicas that hold them (16 running / 8 slots = 2)
    assert policy(ctx(2, {"a": 8, "b": 8}, {"a": 0, "b": 0}))[0] == 2
    # queue deeper than the target: 2 replicas x 6 waiting / 2 per replica = 6
    assert policy(ctx(2, {"a": 8, "b": 8}, {"a": 6, "b": 6}))[0] == 6
    # requests Serve holds back (every replica at max_ongoing_requests) count as waiting
    assert policy(ctx(1, {"a": 8}, {"a": 2}, queued=4))[0] == 3
    # no report yet (replicas starting): hold the current target
    assert policy(ctx(3, None, None, target=3))[0] == 3
    # scale from zero is left to Serve's cold-start path
    assert policy(ctx(0, None, None, target=1))[0] == 1
    with pytest.raises(ValueError):
        QueueDepthPolicy(max_batch=0)


def test_policy_under_serve_context_type():
    """The policy reads Serve's real AutoscalingContext (attribute names checked against the installed Ray)."""
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from server.ray_serve import QueueDepthPolicy

    context = AutoscalingContext(
        deployment_id=None, deployment_name="lamina", app_name="lamina", current_num_replicas=2,
        target_num_replicas=2, running_replicas=[], total_num_requests=20.0, total_queued_requests=2.0,
        aggregated_metrics={"num_requests_running": {"r1": 8.0, "r2": 8.0},
                            "num_requests_waiting": {"r1": 1.0, "r2": 1.0}},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=AutoscalingConfig(min_replicas=1, max_replicas=4))
    desired, state = QueueDepthPolicy(max_batch=8, target_waiting=2)(context)
    assert desired == 2  # max(16/8, (2 + 2)/2)
    assert state["last"]["queued"] == 2.0


def test_build_app_deployment_options():
    from ray.serve.config import AutoscalingConfig

    from server.ray_serve import POLICY_PATH, build_app

    app = build_app({"experts": "none", "max_batch": "4", "max_waiting": "12", "min_replicas": "1",
                     "max_replicas": "3", "target_waiting": "3", "num_cpus": "1"})
    deployment = app._bound_deployment
    config = deployment._deployment_config
    auto = config.autoscaling_config
    assert isinstance(auto, AutoscalingConfig)
    assert (auto.min_replicas, auto.max_replicas) == (1, 3)
    assert auto.policy.policy_function == POLICY_PATH
    assert auto.policy.policy_kwargs == {"max_batch": 4, "target_waiting": 3.0}
    assert auto.target_ongoing_requests == 7  # fallback: max_batch + target_waiting
    assert config.max_ongoing_requests == 16  # what one engine admits: batch + waiting queue
    assert deployment.ray_actor_options["num_cpus"] == 1
    assert app._bound_deployment.init_args == ({"experts": "none", "max_batch": "4", "max_waiting": "12"},)

    fixed = build_app({"experts": "none", "num_replicas": 2})._bound_deployment._deployment_config
    assert fixed.num_replicas == 2 and fixed.autoscaling_config is None

    with pytest.raises(Exception, match="max_batch"):
        build_app({"max_batch": 0})  # Settings are checked before anything is deployed


def test_serve_config_file_is_valid():
    """deploy/ray/serve-config.yaml against Serve's own config schema, and its args against build_app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.ray_serve import build_app

    path = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve-config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (application,) = config.applications
    assert application.import_path == "server.ray_serve:build_app"
    build_app(dict(application.args))


# ------------------------------------------------------------------------------------------- live cluster

@pytest.fixture(scope="module")
def serve_url():
    import ray
    from ray import serve

    # replicas push their stats every second (Serve's default is 10 s) so the test scales within seconds;
    # the local cluster's processes inherit this process's environment
    fast = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    saved = {k: os.environ.get(k) for k in fast}
    os.environ.update(fast)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             namespace="lamina-test", configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _chat(url: str, content, max_tokens: int, experts=None) -> tuple[str, str, list[float]]:
    """A streamed chat completion: (text, replica id, arrival times of the content chunks)."""
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}
    if experts is not None:
        body["experts"] = experts
    text, times = "", []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        replica = r.headers["x-lamina-replica"]
        done = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    text += choice["delta"]["content"]
                    times.append(time.monotonic())
        assert done, "the stream did not end with [DONE]"
    return text, replica, times


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_replicas_behind_serve_proxy_scaled_on_queue_depth(serve_url):
    from ray import serve

    from server.ray_serve import build_app

    app = build_app({"experts": "ocr", "max_batch": 1, "max_waiting": 16, "max_context": 512,
                     "min_replicas": 1, "max_replicas": 2, "target_waiting": 1, "upscale_delay_s": 0,
                     "look_back_period_s": 12, "num_cpus": 1})
    t0 = time.monotonic()
    serve.run(app, name="lamina", route_prefix="/")
    print(f"first replica ready in {time.monotonic() - t0:.1f} s")

    r = httpx.get(f"{serve_url}/ready", timeout=30)
    assert r.status_code == 200 and r.json()["models"] == ["SmolLM2-135M-Instruct"]

    # one chat with an image (the OCR expert reads it), streamed through Serve's proxy
    image = base64.b64encode((IMAGES / "text.png").read_bytes()).decode()
    content = [{"type": "text", "text": "What does the text in this image say?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    text, first_replica, _ = _chat(serve_url, content, max_tokens=32)
    assert text.strip(), "empty answer"

    # a burst that queues in the engine (max_batch=1): the queue-depth policy adds the second replica
    handle = serve.get_deployment_handle("lamina", app_name="lamina")
    seen_waiting = 0.0
    replicas_seen = {first_replica}
    deadline = time.monotonic() + 600
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        pending = set()
        while time.monotonic() < deadline:
            while len(pending) < 6:
                pending.add(pool.submit(_chat, serve_url, "Count from one to twenty in words.", 48))
            done, pending = concurrent.futures.wait(pending, timeout=1.0,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                replicas_seen.add(future.result()[1])
            stats = handle.record_autoscaling_stats.remote().result(timeout_s=30)
            seen_waiting = max(seen_waiting, stats["num_requests_waiting"])
            running = _running_replicas()
            if running >= 2 and len(replicas_seen) >= 2:
                break
        for future in concurrent.futures.as_completed(pending, timeout=300):
            replicas_seen.add(future.result()[1])
    print(f"max waiting reported: {seen_waiting}; replicas that answered: {sorted(replicas_seen)}; "
          f"{time.monotonic() - t0:.1f} s in all")
    assert seen_waiting >= 1, "the replicas never reported a queue"
    assert _running_replicas() == 2, "Serve did not scale to 2 replicas on the queue depth"
    assert len(replicas_seen) == 2, f"only {replicas_seen} answered"
    # the scale-up was our policy's decision, on the replicas' reported queue (not Serve's default policy)
    decisions = _controller_log_lines("lamina queue-depth policy")
    assert any("-> " in line and "on 1 replica(s)" in line for line in decisions), decisions
    serve.delete("lamina")


def _controller_log_lines(marker: str) -> list[str]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [line for path in sorted((session / "logs" / "serve").glob("controller_*.log"))
            for line in path.read_text(errors="replace").splitlines() if marker in line]


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["lamina"].deployments["lamina"]
    return int(status.replica_states.get("RUNNING", 0))
