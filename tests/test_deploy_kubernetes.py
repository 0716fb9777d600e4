"""deploy/kubernetes/: schema-valid manifests with the fields that matter, checked offline.

Schema: ``kubernetes-validate --strict`` (PyPI; it bundles the Kubernetes JSON schemas, so no
cluster and no network beyond the package index are needed). Then every YAML document is
parsed (PyYAML, in the same tools venv) and the fields this deployment depends on are checked:
the relay DaemonSet's host networking or the UDP LoadBalancer alternative, the transceivers'
lack of any public or host port, probes, non-root security contexts, the route keys Secret
mounted where the image looks for the credential, /dev/shm as a memory emptyDir with a size
limit that fits the table, and configs that load with the real loaders.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from tool_venv import tools_venv, yaml_documents

from daemon.config_file import ConfigError, load_config
from relay.config import RelayConfig
from transceiver.service import TransceiverConfig

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
TOOLS = ("kubernetes-validate==1.37.0", "PyYAML==6.0.3")
KUBERNETES_VERSION = "1.30.0"
SLOT_BYTES = 128


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document of every file, parsed by PyYAML (in the tools venv), by file name."""
    loaded = yaml_documents([*manifest_files(), K8S / "kustomization.yaml"], TOOLS)
    return {Path(k).name: v for k, v in loaded.items()}


def one(docs: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    found = [d for ds in docs.values() for d in ds if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def test_manifests_pass_strict_schema_validation() -> None:
    tool = tools_venv(TOOLS) / "bin" / "kubernetes-validate"
    files = [str(p) for p in manifest_files()]
    result = subprocess.run([str(tool), "--strict", "-k", KUBERNETES_VERSION, *files], capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") >= len(files), result.stdout


def test_kustomization_lists_existing_files(docs: dict[str, list[dict[str, Any]]]) -> None:
    [kustomization] = docs["kustomization.yaml"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists(), resource
    # The Secret example is never applied: real keys are created with kubectl from a file.
    assert "route-keys-secret.example.yaml" not in kustomization["resources"]


def test_every_namespaced_object_is_in_the_rtcrelay_namespace(docs: dict[str, list[dict[str, Any]]]) -> None:
    for name, ds in docs.items():
        for d in ds:
            if d.get("kind") not in (None, "Namespace", "Kustomization"):
                assert d["metadata"].get("namespace") == "rtcrelay", f"{name}: {d['kind']}/{d['metadata']['name']}"


def check_container_security(spec: dict[str, Any], where: str) -> None:
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
    assert pod.get("runAsUser", 0) != 0, f"{where}: runAsUser"
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile"
    assert spec.get("automountServiceAccountToken") is False, f"{where}: no API token is needed"
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["runAsNonRoot"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
        assert "privileged" not in sc or sc["privileged"] is False, where
        assert container["resources"]["limits"]["memory"], where


def check_route_keys_mount(spec: dict[str, Any], where: str,
                           extra_secrets: dict[str, list[dict[str, str]]] | None = None) -> None:
    extra_secrets = extra_secrets or {}
    volumes = {v["name"]: v for v in spec["volumes"]}
    [container] = spec["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts["/run/secrets"]  # the image's CREDENTIALS_DIRECTORY
    volume = volumes[mount["name"]]
    # One Secret, or several projected into the one directory: {Secret name: its items}.
    sources = {v["secret"].get("secretName", v["secret"].get("name")): v["secret"]["items"]
               for v in ([volume] if "secret" in volume else volume["projected"]["sources"])}
    assert sources["rtcrelay-route-keys"] == [{"key": "route-keys", "path": "route-keys"}], where
    for name, items in extra_secrets.items():
        assert sources[name] == items, where
    assert mount.get("readOnly") is True, where
    env_names = {e["name"] for e in container.get("env", [])}
    assert not any("SECRET" in n or "ROUTE_KEYS" in n for n in env_names), f"{where}: keys only as a file"


def config_from(docs: dict[str, list[dict[str, Any]]], name: str, key: str, struct: type, prefix: str) -> Any:
    return config_text(one(docs, "ConfigMap", name)["data"][key], f"ConfigMap {name} {key}", struct, prefix)


def config_text(text: str, where: str, struct: type, prefix: str) -> Any:
    """A config file's text loaded by the real loader (no environment)."""
    path = Path("/dev/shm") / f"rtcrelay-deploy-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text)
    try:
        return load_config(struct, str(path), env_prefix=prefix, environ={})
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc}")
    finally:
        path.unlink()


def test_relay_daemonset(docs: dict[str, list[dict[str, Any]]]) -> None:
    ds = one(docs, "DaemonSet", "rtcrelay-relay")
    spec = pod_spec(ds)
    check_container_security(spec, "relay")
    check_route_keys_mount(spec, "relay")
    [container] = spec["containers"]
    assert container["args"][:1] == ["relay"]
    assert "--config" in container["args"]
    # Host networking: the client's real address, replies from the node's address.
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"containerPort": 3478, "protocol": "UDP", "name": "webrtc-udp"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, probe
    assert "/readyz" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert "/healthz" in " ".join(container["livenessProbe"]["exec"]["command"])
    # The tunnel address: the node's IP from the downward API.
    env = {e["name"]: e for e in container["env"]}
    assert env["RTCRELAY_RELAY_TUNNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    # /dev/shm: an emptyDir in memory with a size limit that holds the table.
    volumes = {v["name"]: v for v in spec["volumes"]}
    shm_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    shm = volumes[shm_mount["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"].endswith("Mi")
    cfg: RelayConfig = config_from(docs, "rtcrelay-relay", "relay.toml", RelayConfig, "RTCRELAY_RELAY_")
    assert cfg.table_dir == "/dev/shm" and cfg.workers > 0, "explicit workers: cpu_count() ignores the pod's CPU limit"
    table_bytes = cfg.workers * (cfg.flow_capacity + cfg.session_capacity) * SLOT_BYTES
    assert int(shm["sizeLimit"][:-2]) * 2**20 >= 1.5 * table_bytes, f"sizeLimit {shm['sizeLimit']} for a {table_bytes / 2**20:.1f} MiB table"
    cpu = container["resources"]["limits"]["cpu"]
    assert int(cpu) >= cfg.workers, f"{cfg.workers} workers with a CPU limit of {cpu}"
    # Enough grace for the supervisor to stop its workers (5 s).
    assert spec["terminationGracePeriodSeconds"] >= 10


def test_relay_loadbalancer_alternative(docs: dict[str, list[dict[str, Any]]]) -> None:
    svc = one(docs, "Service", "rtcrelay-relay-public")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"  # keeps the client's source address
    assert svc["spec"]["ports"] == [{"name": "webrtc-udp", "port": 3478, "targetPort": 3478, "protocol": "UDP"}]
    ds = one(docs, "DaemonSet", "rtcrelay-relay")
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_transceiver_deployment_has_no_public_ports(docs: dict[str, list[dict[str, Any]]]) -> None:
    dep = one(docs, "Deployment", "rtcrelay-transceiver")
    spec = pod_spec(dep)
    check_container_security(spec, "transceiver")
    check_route_keys_mount(spec, "transceiver", {"rtcrelay-whip-token-keys": [{"key": "whip-token-keys",
                                                                                "path": "whip-token-keys"}]})
    assert not spec.get("hostNetwork", False)
    [container] = spec["containers"]
    assert container["args"][:1] == ["transceiver"]
    for port in container["ports"]:
        assert "hostPort" not in port and "hostIP" not in port, port
        assert port["protocol"] == "TCP", "media reaches transceivers through the relay tunnel only"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["RTCRELAY_TRANSCEIVER_TUNNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    cfg: TransceiverConfig = config_from(docs, "rtcrelay-transceiver", "transceiver.toml", TransceiverConfig, "RTCRELAY_TRANSCEIVER_")
    assert container["ports"][0]["containerPort"] == cfg.http_port and cfg.http_host == "0.0.0.0"
    assert cfg.whip_token_keys_file == "credential"  # WHIP bearer tokens on, keys from the projected Secret
    # SIGTERM drains for drain_deadline seconds: the pod must be given longer.
    assert spec["terminationGracePeriodSeconds"] > cfg.drain_deadline
    # Every other object that selects transceivers exposes TCP signalling only.
    svc = one(docs, "Service", "rtcrelay-transceiver")
    assert svc["spec"]["type"] == "ClusterIP"
    assert all(p["protocol"] == "TCP" for p in svc["spec"]["ports"])
    for ds in docs.values():
        for d in ds:
            if d.get("kind") == "Service" and d["spec"].get("selector", {}).get("app.kubernetes.io/component") == "transceiver":
                assert d["spec"]["type"] == "ClusterIP", d["metadata"]["name"]


def test_secret_example_holds_a_placeholder_only(docs: dict[str, list[dict[str, Any]]]) -> None:
    secret = one(docs, "Secret", "rtcrelay-route-keys")
    text = secret["stringData"]["route-keys"]
    assert "REPLACE" in text and "active = 1" in text
