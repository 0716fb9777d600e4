"""deploy/overlays/: the kustomize overlays for a cluster that owns sessions and for an edge
relay pool (#19), checked offline against the base (deploy/kubernetes/): every patch names an
object of the base, the edge runs no transceiver, and the configs the overlays give load with
the real loaders and agree with each other (the cluster id the transceivers write into their
tokens is the one the cluster relays own and the edges route). Rendered by hand with
`kubectl kustomize deploy/overlays/edge` (kubectl is not installed by the project)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from test_deploy_kubernetes import K8S, config_text, manifest_files
from tool_venv import yaml_documents

from relay.config import RelayConfig
from transceiver.service import TransceiverConfig

OVERLAYS = Path(__file__).resolve().parents[1] / "deploy" / "overlays"


def overlay(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(its kustomization, its patches' documents)."""
    directory = OVERLAYS / name
    loaded = yaml_documents([directory / "kustomization.yaml"])
    [kustomization] = next(iter(loaded.values()))
    patches = yaml_documents([directory / p["path"] for p in kustomization["patches"]])
    return kustomization, [d for docs in patches.values() for d in docs]


def base_objects() -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for docs in yaml_documents(manifest_files()).values() for d in docs
            if d.get("kind") != "Namespace"}


def patched(patches: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [p for p in patches if p["kind"] == kind and p["metadata"]["name"] == name]
    return found


def test_overlays_build_on_the_base_and_patch_only_what_it_has() -> None:
    base = base_objects()
    for name in ("edge", "cluster"):
        kustomization, patches = overlay(name)
        assert kustomization["resources"] == ["../../kubernetes"]
        assert (OVERLAYS / name / kustomization["resources"][0]).resolve() == K8S
        for p in patches:
            assert (p["kind"], p["metadata"]["name"]) in base, f"{name}: {p['kind']}/{p['metadata']['name']}"
            assert p["metadata"].get("namespace") == "rtcrelay"


def test_an_edge_pool_is_relays_only_and_routes_the_clusters() -> None:
    _, patches = overlay("edge")
    deleted = {(p["kind"], p["metadata"]["name"]) for p in patches if p.get("$patch") == "delete"}
    assert deleted == {(kind, name) for kind, name in base_objects() if "transceiver" in name}
    relay: RelayConfig = config_text(patched(patches, "ConfigMap", "rtcrelay-relay")["data"]["relay.toml"],
                                     "edge relay.toml", RelayConfig, "RTCRELAY_RELAY_")
    assert relay.routes and not relay.hop_listen and relay.cluster_id not in relay.routes
    assert all(target.port == 3479 for targets in relay.routes.values() for target in targets)


def test_a_cluster_owns_its_sessions_and_takes_the_edges_hops() -> None:
    _, patches = overlay("cluster")
    relay: RelayConfig = config_text(patched(patches, "ConfigMap", "rtcrelay-relay")["data"]["relay.toml"],
                                     "cluster relay.toml", RelayConfig, "RTCRELAY_RELAY_")
    transceiver: TransceiverConfig = config_text(
        patched(patches, "ConfigMap", "rtcrelay-transceiver")["data"]["transceiver.toml"], "cluster transceiver.toml",
        TransceiverConfig, "RTCRELAY_TRANSCEIVER_")
    assert relay.cluster_id is not None and relay.cluster_id == transceiver.cluster_id
    assert [h.rsplit(":", 1)[1] for h in relay.hop_listen] == ["3479"]
    ports = patched(patches, "DaemonSet", "rtcrelay-relay")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "hop-udp", "containerPort": 3479, "protocol": "UDP"} in ports
    edge_relay: RelayConfig = config_text(
        patched(overlay("edge")[1], "ConfigMap", "rtcrelay-relay")["data"]["relay.toml"], "edge relay.toml",
        RelayConfig, "RTCRELAY_RELAY_")
    assert relay.cluster_id in edge_relay.routes  # the edges know the way to this cluster
    assert transceiver.whip_token_keys_file == "credential"
