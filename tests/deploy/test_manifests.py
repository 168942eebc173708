"""deploy/: the Kubernetes manifests pass the Kubernetes API schemas (kubernetes-validate, which
ships them: no cluster, no network), and the fields that make the gateway the agent's only way
out hold together: selectors match labels, the NetworkPolicy selects the agent and allows only
the gateway (and DNS), the projected token's audience is the one the identity rules trust, the
sidecar's arguments parse with the connector's real argparse, the rules in the ConfigMap load
with the gateway's real loader. The compose file is parsed and checked the same way (no compose
schema is shipped offline: see the test docstrings for what is not validated).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from addons.config.loader import load_rules
from addons.connect import cli as connect_cli

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
K8S_VERSION = "1.30.0"  # an old-enough supported release: nothing newer is relied on


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def connect_args(argv: list[str]) -> argparse.Namespace:
    """Parse `agentgate connect …` with the connector's own argparse, then build its config
    (which rejects what argparse lets through: a bad --gateway, a non-loopback --listen)."""
    parser = argparse.ArgumentParser(prog="agentgate", exit_on_error=False)
    connect_cli.register(parser.add_subparsers(dest="cmd"))
    assert argv[:2] == ["agentgate", "connect"], argv
    args = parser.parse_args(argv[1:])
    connect_cli.build(args)
    return args


@pytest.mark.parametrize("path_doc", k8s_docs(),
                         ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}/{pd[1]['metadata']['name']}")
def test_every_k8s_document_passes_the_api_schema_strictly(path_doc) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, doc = path_doc
    # strict: an unknown or misspelt field is an error, not silently dropped by the API server
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"].get("namespace", "agents") == "agents"


def test_selectors_select_their_pods_and_the_service_reaches_the_proxy_port() -> None:
    for name in ("agentgate", "research-agent"):
        d = one("Deployment", name)
        assert matches(d["spec"]["selector"]["matchLabels"],
                       d["spec"]["template"]["metadata"]["labels"])
    gw = one("Deployment", "agentgate")
    assert gw["spec"]["replicas"] >= 2  # approvals shared in Postgres (test_replicas.py)
    svc = one("Service", "agentgate")
    assert matches(svc["spec"]["selector"], gw["spec"]["template"]["metadata"]["labels"])
    agent_labels = one("Deployment", "research-agent")["spec"]["template"]["metadata"]["labels"]
    assert not matches(svc["spec"]["selector"], agent_labels)
    ports = {p["name"]: p["containerPort"] for p in container(gw, "gateway")["ports"]}
    (proxy,) = [p for p in svc["spec"]["ports"] if p["name"] == "proxy"]
    assert proxy["port"] == 8080 and proxy["targetPort"] == "proxy" and ports["proxy"] == 8080
    cmd = container(gw, "gateway")["command"]
    assert cmd[cmd.index("--listen-port") + 1] == "8080"


def test_the_gateway_gets_secrets_the_agent_never_does() -> None:
    gw = one("Deployment", "agentgate")
    c = container(gw, "gateway")
    assert {"secretRef": {"name": "agentgate-upstream-keys"}} in c["envFrom"]
    vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
    assert vols["ca"]["secret"]["secretName"] == "agentgate-ca"
    assert vols["rules"]["configMap"]["name"] == "agentgate-rules"
    agent = one("Deployment", "research-agent")
    text = yaml.safe_dump(agent)
    # no Secret reaches the agent pod: no secret volume, no secretRef / secretKeyRef env
    assert "secretName" not in text and "secretRef" not in text and "secretKeyRef" not in text
    avols = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    assert avols["agentgate-ca"] == {"name": "agentgate-ca",
                                     "configMap": {"name": "agentgate-ca-cert"}}
    assert agent["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_agent_env_points_at_the_connector_with_ca_and_placeholder_keys() -> None:
    agent = one("Deployment", "research-agent")
    env = {e["name"]: e["value"] for e in container(agent, "agent")["env"]}
    args = connect_args(container(agent, "agentgate-connect")["command"]
                        + container(agent, "agentgate-connect")["args"])
    host, port = connect_cli.build(args)[0].listen_host, connect_cli.build(args)[0].listen_port
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert env[var] == f"http://{host}:{port}"  # the connector, and no token in it
    mount = {m["name"]: m["mountPath"] for m in container(agent, "agent")["volumeMounts"]}
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert env[var] == f"{mount['agentgate-ca']}/mitmproxy-ca-cert.pem"
    assert env["OPENAI_API_KEY"] == "sk-placeholder"
    assert env["ANTHROPIC_API_KEY"].endswith("placeholder")


def test_sidecar_args_parse_with_the_connectors_cli_and_read_the_projected_token() -> None:
    agent = one("Deployment", "research-agent")
    side = container(agent, "agentgate-connect")
    argv = side["command"] + side["args"]
    assert argv == ["agentgate", "connect", "--gateway", "http://agentgate:8080",
                    "--token-file", "/var/run/secrets/tokens/agentgate"]
    args = connect_args(argv)
    cfg, _ = connect_cli.build(args)
    svc = one("Service", "agentgate")
    assert (cfg.gateway_host, cfg.gateway_port) == (svc["metadata"]["name"], 8080)
    # the token file is the projected volume's path under the sidecar's mount
    (m,) = [m for m in side["volumeMounts"] if m["name"] == "agentgate-token"]
    vols = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    (src,) = vols["agentgate-token"]["projected"]["sources"]
    sat = src["serviceAccountToken"]
    assert args.token_file == f"{m['mountPath']}/{sat['path']}"
    assert sat["expirationSeconds"] == 600
    # a misspelt flag in the manifest would be caught here, as the container would exit
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        connect_args([*argv, "--token-fille", "x"])


def test_projected_token_audience_is_the_audience_the_rules_trust(tmp_path: Path) -> None:
    cm = one("ConfigMap", "agentgate-rules")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    rules = load_rules(tmp_path)  # the gateway's own loader: these rules start a gateway
    ident = rules.identity
    assert ident.required and ident.sources == ("proxy",)
    agent = one("Deployment", "research-agent")
    vols = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    (src,) = vols["agentgate-token"]["projected"]["sources"]
    aud = src["serviceAccountToken"]["audience"]
    assert [i.audiences for i in ident.issuers] == [(aud,)]
    # tunnels retire before the token expires, well inside the token's lifetime
    assert 0 < ident.retire_before < src["serviceAccountToken"]["expirationSeconds"] / 2
    gw = one("Deployment", "agentgate")
    cmd = container(gw, "gateway")["command"]
    mounts = {m["name"]: m["mountPath"] for m in container(gw, "gateway")["volumeMounts"]}
    assert f"agentgate_rules={mounts['rules']}" in cmd
    assert f"confdir={mounts['ca']}" in cmd


def test_network_policy_lets_the_agent_reach_only_the_gateway_and_dns() -> None:
    pol = one("NetworkPolicy", "agents-egress-only-via-gateway")
    agent_labels = one("Deployment", "research-agent")["spec"]["template"]["metadata"]["labels"]
    gw_labels = one("Deployment", "agentgate")["spec"]["template"]["metadata"]["labels"]
    spec = pol["spec"]
    assert matches(spec["podSelector"]["matchLabels"], agent_labels)
    assert not matches(spec["podSelector"]["matchLabels"], gw_labels)  # the gateway goes out
    assert spec["policyTypes"] == ["Egress"]  # listed: egress is default-deny for these pods
    gateway_rule, dns_rule = spec["egress"]
    (peer,) = gateway_rule["to"]
    assert set(peer) == {"podSelector"}  # same namespace, no ipBlock, no namespaceSelector
    assert matches(peer["podSelector"]["matchLabels"], gw_labels)
    assert gateway_rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    (dns,) = dns_rule["to"]
    assert dns["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"}
    assert dns["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted(p["protocol"] for p in dns_rule["ports"]) == ["TCP", "UDP"]
    assert {p["port"] for p in dns_rule["ports"]} == {53}
    # no rule anywhere opens everything (an empty `to` or an ipBlock)
    for rule in spec["egress"]:
        assert rule.get("to") and rule.get("ports")
        assert all("ipBlock" not in p for p in rule["to"])
    # the gateway accepts the agents on its proxy port
    ing = one("NetworkPolicy", "agentgate-ingress")["spec"]
    assert matches(ing["podSelector"]["matchLabels"], gw_labels)
    assert matches(ing["ingress"][0]["from"][0]["podSelector"]["matchLabels"], agent_labels)


def test_compose_agent_is_on_an_internal_network_bridged_only_by_the_gateway() -> None:
    """Parsed with pyyaml and checked field by field: docker compose's own schema and
    interpolation are not validated here (no compose tooling offline)."""
    c = yaml.safe_load(COMPOSE.read_text())
    nets = c["networks"]
    svcs = c["services"]
    internal = {n for n, v in nets.items() if (v or {}).get("internal") is True}
    assert internal == {"agents"}

    def networks(name: str) -> set[str]:
        s = svcs[name]
        if "network_mode" in s:
            assert "networks" not in s
            return {f"mode:{s['network_mode']}"}
        return set(s.get("networks") or ["default"])

    assert networks("agent") == {"agents"}
    assert networks("gateway") == {"agents", "egress"}
    assert networks("connect") == {"mode:service:agent"}  # the agent's loopback
    outside = [n for n in svcs
               if networks(n) - internal and networks(n) != {"mode:service:agent"}]
    assert outside == ["gateway"]  # the only member of `agents` with outside access
    # nothing of the agent's side is published on the host
    assert "ports" not in svcs["agent"] and "ports" not in svcs["connect"]
    args = connect_args(svcs["connect"]["command"])
    cfg, _ = connect_cli.build(args)
    assert (cfg.gateway_host, cfg.gateway_port) == ("gateway", 8080)
    env = svcs["agent"]["environment"]
    assert env["HTTPS_PROXY"] == f"http://{cfg.listen_host}:{cfg.listen_port}"
    assert env["OPENAI_API_KEY"] == "sk-placeholder"
    # the agent mounts the CA certificate, never the CA key
    assert all("mitmproxy-ca.pem" not in v for v in svcs["agent"]["volumes"])
    gw_cmd = svcs["gateway"]["command"]
    assert gw_cmd[gw_cmd.index("--listen-port") + 1] == "8080"
