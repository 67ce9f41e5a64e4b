"""The real Dockerfile and docker-compose.yml, built and run on this machine (slow: minutes).

A private dockerd (scripts/local-docker.sh: Debian's docker.io, data root under /var/cache/lamina-docker so
layers are reused between runs) builds the image on a debootstrapped bookworm base (no image registry here),
with the pinned torch wheels passed in through deploy/wheels/. Then:
- the image alone, with no network at all: healthy (HEALTHCHECK on /ready), one streamed chat with a photo
  answered by the embedded model and the baked-in detector, then `docker stop` drains and exits 0;
- the compose `scale` profile: 2 replicas behind nginx, streamed answers through the balancer, from both.
Runs are serialised with a lock file; a daemon this test started is stopped at the end.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "local-docker.sh"
CACHE = Path(os.environ.get("LAMINA_DOCKER_ROOT", "/var/cache/lamina-docker"))
BASE = os.environ.get("LAMINA_BASE_IMAGE", "lamina-base:bookworm")
IMAGE, LB_IMAGE = "lamina:test", "lamina-nginx:test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGES = ROOT / "tests" / "data" / "images"
MODEL = "SmolLM2-135M-Instruct"
TIMINGS: dict[str, float] = {}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


class Docker:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.bin = env["DOCKER"]

    def run(self, *args: str, check: bool = True, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run([self.bin, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def compose(self, *args: str, env: dict[str, str], check: bool = True, timeout: float = 900):
        result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *args],
                                env={**self.env, **env}, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def wait_healthy(self, container: str, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            state = json.loads(self.run("inspect", "-f", "{{json .State}}", container).stdout)
            if not state["Running"]:
                raise AssertionError(f"{container} exited ({state['ExitCode']}):\n{self.logs(container)}")
            if state.get("Health", {}).get("Status") == "healthy":
                return time.monotonic() - t0
            time.sleep(1)
        raise AssertionError(f"{container} not healthy after {timeout} s:\n{self.logs(container)}")

    def logs(self, container: str) -> str:
        result = self.run("logs", container, check=False)
        return (result.stdout + result.stderr)[-6000:]


def _step(name: str, t0: float) -> None:
    TIMINGS[name] = round(time.monotonic() - t0, 1)
    print(f"[deploy-test] {name}: {TIMINGS[name]} s", flush=True)


def _local_docker(command: str) -> str:
    result = subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"local-docker.sh {command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout



@pytest.fixture(scope="module")
def docker():
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one deploy test at a time on this machine
        t0 = time.monotonic()
        was_running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
        out = _local_docker("start")  # installs docker.io/docker-compose/debootstrap first if missing
        env = dict(os.environ)
        for line in out.splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export "):].partition("=")
                env[key] = value
        docker = Docker(env)
        # leftovers of an interrupted run (their restart policy would bring them back with the daemon)
        for pattern in ("laminatest", "lamina-test-"):
            stale = docker.run("ps", "-aq", "--filter", f"name={pattern}").stdout.split()
            if stale:
                docker.run("rm", "-f", *stale, check=False)
        docker.run("network", "prune", "-f", check=False)
        _step("dockerd", t0)
        try:
            yield docker
        finally:
            if not was_running:
                _local_docker("stop")
            (CACHE / "last-deploy-test-timings.json").write_text(json.dumps(TIMINGS, indent=1))


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    t0 = time.monotonic()
    _local_docker("base")  # debootstrap bookworm once (cached as a tarball), docker import
    _step("base image", t0)
    t0 = time.monotonic()
    _local_docker("wheels")  # the pinned torch/torchvision (+ deps) from this machine's wheel dirs
    _step("wheels", t0)
    t0 = time.monotonic()
    _prune(docker)  # what earlier runs left (other clones' build contexts, replaced images) before adding more
    _step("prune", t0)
    t0 = time.monotonic()
    args = ["build", "-t", IMAGE, "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", "TORCH_INDEX_URL=none"]
    if CA_BUNDLE.is_file():
        args += ["--secret", f"id=cacert,src={CA_BUNDLE}"]
    result = docker.run(*args, "--progress=plain", str(ROOT), timeout=2400)
    (CACHE / "last-build.log").write_text(result.stderr)
    _step("docker build", t0)
    size = int(docker.run("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    print(f"[deploy-test] image size {size / 2**30:.2f} GiB", flush=True)
    yield IMAGE
    _prune(docker)


def _prune(docker: Docker) -> None:
    """Keep the private daemon's disk use bounded on a shared machine: every build sends the context (with ~3 GB of
    wheels) again from wherever the repository was cloned, and each tag replaced leaves an image behind. The layer
    cache of the dependency stage (what makes the next build fast) is kept up to a limit."""
    docker.run("image", "prune", "-f", check=False)
    docker.run("builder", "prune", "-f", "--filter", "type=source.local", check=False)
    docker.run("builder", "prune", "-f", "--keep-storage", os.environ.get("LAMINA_DOCKER_KEEP", "12GB"), check=False)


CLIENT = r'''
import json, sys, time, urllib.request
port, body = sys.argv[1], sys.stdin.read()
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                                 {"Content-Type": "application/json"})
out = {"events": []}
with urllib.request.urlopen(request, timeout=300) as r:
    out["status"], out["headers"] = r.status, dict(r.headers)
    for raw in r:
        line = raw.decode().strip()
        if line.startswith("data: "):
            out["events"].append([time.monotonic(), line[6:]])
print(json.dumps(out))
'''


def _chat_body(image: str, question: str, max_tokens: int = 48) -> str:
    data = base64.b64encode((IMAGES / image).read_bytes()).decode()
    suffix = "jpeg" if image.endswith(".jpg") else "png"
    return json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": [
                           {"type": "text", "text": question},
                           {"type": "image_url", "image_url": {"url": f"data:image/{suffix};base64,{data}"}}]}]})


def _check_stream(result: dict) -> tuple[str, list[float]]:
    """An OpenAI SSE stream: role first, same id throughout, finish_reason at the end, then [DONE]."""
    assert result["status"] == 200
    headers = {k.lower(): v for k, v in result["headers"].items()}
    assert headers["content-type"].startswith("text/event-stream")
    events = result["events"]
    assert events and events[-1][1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for _, e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text, times = "", []
    for (t, _), chunk in zip(events, chunks, strict=False):
        for choice in chunk["choices"]:
            if choice["delta"].get("content"):
                text += choice["delta"]["content"]
                times.append(t)
    assert text.strip(), "empty answer"
    return text, times


def test_image_serves_out_of_the_box_offline(docker: Docker, image: str):
    """No network at all (--network none), read-only root, no capabilities: the image still serves a photo."""
    name = f"lamina-test-{os.getpid()}"
    docker.run("rm", "-f", name, check=False)
    t0 = time.monotonic()
    docker.run("run", "-d", "--name", name, "--network", "none", "--read-only", "--tmpfs", "/tmp",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--memory", "4g", image)
    try:
        assert docker.run("inspect", "-f", "{{.Config.User}}", name).stdout.strip() == "10001:10001"
        ready = docker.wait_healthy(name)
        _step("container healthy", t0)
        print(f"[deploy-test] healthy after {ready:.1f} s", flush=True)

        t0 = time.monotonic()
        result = docker.run("exec", "-i", name, "python", "-c", CLIENT, "8000",
                            input=_chat_body("dog.jpg", "What is in this picture?"))
        text, _ = _check_stream(json.loads(result.stdout))
        _step("streamed chat with an image", t0)
        print(f"[deploy-test] answer: {text!r}", flush=True)
        # the experts that were prepared at build time ran, offline
        metrics = docker.run("exec", name, "python", "-c",
                             "import urllib.request; print(urllib.request.urlopen("
                             "'http://127.0.0.1:8000/metrics').read().decode())").stdout
        for expert in ("detection", "ocr"):
            count = re.search(rf'lamina:stage_latency_seconds_count{{stage="expert:{expert}"}} ([0-9.]+)', metrics)
            assert count and float(count.group(1)) >= 1, f"the {expert} expert did not run"

        t0 = time.monotonic()
        docker.run("stop", "-t", "45", name)
        _step("docker stop (drain)", t0)
        assert docker.run("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        assert "drained" in docker.logs(name)
    finally:
        docker.run("rm", "-f", name, check=False)


def test_compose_replicas_behind_nginx(docker: Docker, image: str):
    import httpx

    t0 = time.monotonic()
    docker.run("build", "-t", LB_IMAGE, "--build-arg", f"BASE_IMAGE={BASE}", str(ROOT / "deploy" / "nginx"))
    _step("nginx image", t0)
    port = free_port()
    env = {"COMPOSE_PROJECT_NAME": f"laminatest{os.getpid()}", "LAMINA_IMAGE": image, "LAMINA_LB_IMAGE": LB_IMAGE,
           "LAMINA_LB_PORT": str(port), "LAMINA_HOST_PORT": str(free_port()), "LAMINA_REPLICAS": "2",
           "LAMINA_CPUS": "1", "LAMINA_MEMORY": "4g"}
    t0 = time.monotonic()
    try:
        docker.compose("--profile", "scale", "up", "-d", "lb", env=env)  # waits for healthy replicas
        _step("compose up (2 replicas healthy + nginx)", t0)
        ps = docker.compose("--profile", "scale", "ps", "-q", env=env).stdout.split()
        names = [docker.run("inspect", "-f", "{{.Name}}", c).stdout.strip().lstrip("/") for c in ps]
        replicas = sorted(n for n in names if "_replica_" in n)
        assert len(replicas) == 2 and not any("_lamina_" in n for n in names), names

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the balancer never reported ready"
            time.sleep(1)

        t0 = time.monotonic()
        answers = []
        for i in range(6):
            events, started = [], time.monotonic()
            body = _chat_body("horses.jpg" if i == 0 else "text.png", "Describe the picture in detail.", 64)
            with httpx.stream("POST", f"{url}/v1/chat/completions", content=body,
                              headers={"Content-Type": "application/json"}, timeout=300) as r:
                headers = dict(r.headers)
                status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append([time.monotonic(), line[6:]])
            text, times = _check_stream({"status": status, "headers": headers, "events": events})
            answers.append((text, times[0] - started, times[-1] - times[0], len(times)))
        _step("6 streamed chats through nginx", t0)
        # streamed, not buffered by the proxy: tokens arrive spread over the generation
        assert any(spread > 0.2 and n >= 8 for _, _, spread, n in answers), answers

        served = {name: docker.logs(name).count("POST /v1/chat/completions") for name in replicas}
        print(f"[deploy-test] requests per replica: {served}", flush=True)
        assert all(count >= 1 for count in served.values()), served
    finally:
        t0 = time.monotonic()
        down = docker.compose("--profile", "scale", "down", "-v", "--timeout", "45", env=env, check=False)
        _step("compose down", t0)
        assert down.returncode == 0, down.stderr


def test_docker_tools_present():
    """What the tests above used is installed (by scripts/local-docker.sh) rather than assumed."""
    for tool in ("dockerd", "docker-compose", "debootstrap"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), tool
