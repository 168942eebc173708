"""deploy/kubernetes/gateway.yaml as replicas (offline, no cluster): the probes point at the
paths and port the gateway's probe listener serves (checked against addons/health's own
code), the grace period covers preStop + the drain bound, a PodDisruptionBudget selects the
gateway pods and allows at most one down, each replica reaches the shared state from a Secret
and names itself after its pod. The schema itself is checked by test_manifests.py (strict)."""

from __future__ import annotations

from addons.approval.config import parse_listen
from addons.approval.pgstore import check_dsn
from addons.health.addon import DEFAULT_DRAIN
from addons.health.probes import ProbeServer
from tests.deploy.test_manifests import container, k8s_docs, matches, one


def gateway_env() -> dict[str, dict]:
    c = container(one("Deployment", "agentgate"), "gateway")
    return {e["name"]: e for e in c["env"]}


def test_probes_hit_the_health_listener_paths_the_gateway_serves() -> None:
    c = container(one("Deployment", "agentgate"), "gateway")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    host, port = parse_listen(gateway_env()["AGENTGATE_HEALTH_LISTEN"]["value"])
    assert host == "0.0.0.0" and ports["health"] == port  # the kubelet reaches the pod IP
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready == {"path": "/readyz", "port": "health"}
    assert live["path"] == "/healthz" and live["port"] == "health"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    # the paths are the ones the probe server answers: ready -> 200, draining -> 503
    draining = [False]
    probes = ProbeServer({"rules": lambda: None}, lambda: draining[0])
    assert probes.answer("GET", ready["path"])[0] == 200
    assert probes.answer("GET", live["path"])[0] == 200
    draining[0] = True
    assert probes.answer("GET", ready["path"])[0] == 503
    assert probes.answer("GET", live["path"])[0] == 200  # live while it drains
    # a draining pod leaves the Service at the next readiness probe, before the drain ends
    r = c["readinessProbe"]
    assert r["periodSeconds"] * r["failureThreshold"] <= 5


def test_grace_period_covers_prestop_and_the_drain() -> None:
    spec = one("Deployment", "agentgate")["spec"]["template"]["spec"]
    c = container(one("Deployment", "agentgate"), "gateway")
    drain = int(gateway_env().get("AGENTGATE_DRAIN_SECONDS", {}).get("value", DEFAULT_DRAIN))
    pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM comes after preStop; the drain plus flushing the audit must end before SIGKILL
    assert spec["terminationGracePeriodSeconds"] >= pre + drain + 5
    assert drain <= 25  # under the 30 s most tooling assumes


def test_replicas_share_state_and_a_pdb_guards_them() -> None:
    gw = one("Deployment", "agentgate")
    labels = gw["spec"]["template"]["metadata"]["labels"]
    assert gw["spec"]["replicas"] >= 2
    assert gw["spec"]["strategy"]["type"] == "RollingUpdate"
    pdb = one("PodDisruptionBudget", "agentgate")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or (
        pdb["spec"]["minAvailable"] < gw["spec"]["replicas"])
    # nothing but the gateway is selected by the budget
    for _, d in k8s_docs():
        if d["kind"] == "Deployment" and d["metadata"]["name"] != "agentgate":
            assert not matches(pdb["spec"]["selector"]["matchLabels"],
                               d["spec"]["template"]["metadata"]["labels"])
    env = gateway_env()
    ref = env["AGENTGATE_STATE"]["valueFrom"]["secretKeyRef"]
    secret = one("Secret", ref["name"])
    check_dsn(secret["stringData"][ref["key"]])  # the stub is a DSN the gateway accepts
    assert env["AGENTGATE_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # one audit DuckDB per replica: the data volume is not shared by the pods
    vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" not in vols["data"]
