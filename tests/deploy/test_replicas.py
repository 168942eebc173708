"""deploy/kubernetes/gateway.yaml as replicas (offline, no cluster): the probes point at the
paths and port the gateway's probe listener serves (checked against addons/health's own
code), the grace period covers preStop + the drain bound, a PodDisruptionBudget selects the
gateway pods and allows at most one down, each replica reaches the shared state from a Secret
and names itself after its pod, shares the placeholder secret from a Secret (the stub is
refused by the gateway's own check), and ships its audit to a lake whose catalog is the state
Postgres (no password in the ConfigMap: PGPASSWORD from the state's Secret) and whose data is a
ReadWriteMany volume. One integration test attaches a real lake with that catalog form.
The schema itself is checked by test_manifests.py (strict)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from addons.approval.config import parse_listen
from addons.approval.pgstore import check_dsn
from addons.config.loader import Rules, load_rules
from addons.health.addon import DEFAULT_DRAIN
from addons.health.probes import ProbeServer
from addons.masking.sessionstore import SecretMissing, gateway_secret
from addons.recording.lake import LakeConfig, redacted_catalog
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


def configmap_rules(tmp_path: Path) -> Rules:
    for name, text in one("ConfigMap", "agentgate-rules")["data"].items():
        (tmp_path / name).write_text(text)
    return load_rules(tmp_path)  # the gateway's own loader


def secret_value(ref: dict[str, str]) -> str:
    return one("Secret", ref["name"])["stringData"][ref["key"]]


def test_replicas_share_the_secret_from_a_secret_and_the_stub_is_refused() -> None:
    env = gateway_env()
    ref = env["AGENTGATE_SECRET"]["valueFrom"]["secretKeyRef"]
    stub = secret_value(ref)
    # the published stub is not a key anyone shares: the gateway's own check refuses it
    with pytest.raises(SecretMissing):
        gateway_secret({"AGENTGATE_SECRET": stub})
    assert gateway_secret({"AGENTGATE_SECRET": "0" * 64})  # what `openssl rand -hex 32` gives
    # only the gateway reads the key and the state's password, never an agent
    for _, d in k8s_docs():
        if d["kind"] == "Deployment" and d["metadata"]["name"] != "agentgate":
            text = yaml.safe_dump(d)
            assert ref["name"] not in text and "agentgate-state" not in text


def test_audit_lake_catalog_is_the_state_postgres_without_its_password(tmp_path: Path) -> None:
    lake = configmap_rules(tmp_path).audit_lake
    assert isinstance(lake, LakeConfig) and lake.on_postgres
    assert lake.replica is None  # each replica's chain is named after its pod (env below)
    conninfo = lake.catalog.removeprefix("postgres:")
    assert conninfo != lake.catalog and "password" not in conninfo.lower()
    assert redacted_catalog(lake.catalog) == lake.catalog
    env = gateway_env()
    state = conninfo_to_dict(secret_value(env["AGENTGATE_STATE"]["valueFrom"]["secretKeyRef"]))
    cat = conninfo_to_dict(conninfo)
    for k in ("host", "port", "dbname", "user"):
        assert cat[k] == state[k], k  # the same database as the shared state
    # libpq's own variable carries the password, from the state's Secret
    pw = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert pw["name"] == env["AGENTGATE_STATE"]["valueFrom"]["secretKeyRef"]["name"]
    assert secret_value(pw) == state["password"]  # the stubs agree
    assert env["AGENTGATE_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_audit_lake_data_is_a_volume_every_replica_writes(tmp_path: Path) -> None:
    lake = configmap_rules(tmp_path).audit_lake
    gw = one("Deployment", "agentgate")
    c = container(gw, "gateway")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == lake.data_path()]
    assert not mount.get("readOnly")
    vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
    claim = one("PersistentVolumeClaim",
                vols[mount["name"]]["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # all replicas at once
    # `kubectl exec … agentgate audit verify --lake` finds the lake in the mounted rules
    rules_mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["rules"]
    assert gateway_env()["AGENTGATE_RULES"]["value"] == rules_mount


@pytest.mark.integration
def test_the_manifests_catalog_form_reaches_a_real_lake_with_pgpassword(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap's catalog shape (conninfo without password) + PGPASSWORD attaches a real
    DuckLake in a real Postgres; without PGPASSWORD it does not (the password is not found
    elsewhere)."""
    from addons.devkit.replicas import LocalPostgres
    from addons.recording import lake as lakemod
    (tmp_path / "r").mkdir()
    cat = conninfo_to_dict(configmap_rules(tmp_path / "r").audit_lake.catalog
                           .removeprefix("postgres:"))
    pg = LocalPostgres().start()
    try:
        cat.update(host="127.0.0.1", port=str(pg.port), dbname="postgres", user="agentgate")
        cfg = LakeConfig(catalog="postgres:" + make_conninfo(**cat), data=str(tmp_path / "pq"))
        monkeypatch.delenv("PGPASSWORD", raising=False)
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
        with pytest.raises(lakemod.LakeError):
            lakemod.connect(cfg).close()
        monkeypatch.setenv("PGPASSWORD", pg.password)
        con = lakemod.connect(cfg)
        try:
            assert con.execute("SELECT count(*) FROM lake.flows").fetchone() == (0,)
        finally:
            con.close()
    finally:
        pg.stop()
