"""Shared fixtures: the stand-in upstream and real mitmdump gateways with the suite loaded.

Everything listens on 127.0.0.1 with ports picked by the OS; nothing needs the internet.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from addons.devkit.launch import (  # noqa: F401 - re-exported for tests
    BIN,
    Gateway,
    free_port,
    standin_upstreams_yaml,
)
from addons.devkit.launch import start_gateway as _start_gateway
from addons.devkit.standin import StandIn

pytest_plugins = ["tests.oidc_fixtures"]

ROOT = Path(__file__).resolve().parents[1]

# Fake but realistic-looking upstream secrets: tests grep every artifact for them.
REAL_OPENAI_KEY = "sk-proj-GATEWAYREALKEY0000000000000000000000000000000000"
REAL_ANTHROPIC_KEY = "sk-ant-api03-GATEWAYREALKEY00000000000000000000000000000000000000"
REAL_WEBHOOK_TOKEN = "whk-GATEWAYREALTOKEN-0000000000000000"
GATEWAY_ENV = {
    "OPENAI_API_KEY": REAL_OPENAI_KEY,
    "ANTHROPIC_API_KEY": REAL_ANTHROPIC_KEY,
    "WEBHOOK_TOKEN": REAL_WEBHOOK_TOKEN,
}


def start_gateway(*args, **kwargs) -> Gateway:
    """launch.start_gateway with the tests' fake upstream secrets in the gateway's env."""
    kwargs["gateway_env"] = {**GATEWAY_ENV, **(kwargs.get("gateway_env") or {})}
    # the reviewers' API on a port the gateway's own bind picks (tests read it back from the
    # log: Gateway.approvals_url): a port probed free here and bound later by mitmdump could be
    # taken in between by another test process — one gateway in a 2-worker run exited with
    # "approvals API cannot listen … already in use"
    kwargs.setdefault("approvals_listen", "127.0.0.1:0")
    return _start_gateway(*args, **kwargs)


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    s = StandIn(certdir=tmp_path_factory.mktemp("standin-certs")).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def gateway_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One interception CA for the whole session (generating RSA keys is slow)."""
    from mitmproxy.certs import CertStore
    d = tmp_path_factory.mktemp("gateway-confdir")
    CertStore.from_store(d, "mitmproxy", 2048)
    return d


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway_factory(tmp_path: Path, gateway_confdir: Path,
                    standin: StandIn) -> Iterator[GatewayFactory]:
    """make(rules_yaml: str | dict[filename, yaml], env=…, extra_args=…) -> Gateway.

    `{standin_upstreams}` in a rules text is replaced by upstreams routed to the stand-in.
    """
    started: list[Gateway] = []

    def make(rules: str | dict[str, str] | Path | None = None, *,
             env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (),
             web: bool = False, wait: bool = True, script: Path | None = None) -> Gateway:
        n = len(started)
        if isinstance(rules, Path):
            rules_dir = rules
        else:
            rules_dir = tmp_path / f"rules{n}"
            rules_dir.mkdir()
            files = rules if isinstance(rules, dict) else {
                "rules.yaml": rules if rules is not None else "{standin_upstreams}"}
            for name, text in files.items():
                (rules_dir / name).write_text(
                    text.replace("{standin_upstreams}", standin_upstreams_yaml(standin)))
        data_dir = tmp_path / f"data{n}"
        data_dir.mkdir(exist_ok=True)
        gw = start_gateway(rules_dir, gateway_confdir, data_dir, tmp_path / f"gateway{n}.log",
                           standin_ca=standin.ca_path, env=env, extra_args=extra_args, web=web,
                           wait=wait, script=script)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def no_identity() -> str:
    """Rules fragment for tests of other concerns that run without OIDC tokens."""
    return "identity:\n  required: false\n"


@pytest.fixture(autouse=True)
def _no_stale_mitmproxy_log_handlers() -> Iterator[None]:
    """taddons.context() leaves its master's log handler on the root logger; once that
    master's loop is closed, any later log record raises inside the handler. Drop those."""
    import logging

    def drop() -> None:
        root = logging.getLogger()
        for h in list(root.handlers):
            loop = getattr(getattr(h, "master", None), "event_loop", None)
            if loop is not None and loop.is_closed():
                root.removeHandler(h)

    drop()
    yield
    drop()


# The files that take minutes, longest first (a full 2-worker run, 2026-12-02: ~290, 170,
# 165, 150 s of test time): they are handed out first. pytest-xdist (--dist loadfile
# --no-loadscope-reorder, as ./run_proxy.sh test runs it) gives whole files to whichever
# worker is free in collection order; the soak in test_netns.py, handed out last, ran alone
# for its last ~4 minutes while the other worker sat idle. Only the order of files changes,
# and only under xdist.
LONG_FILES_FIRST = ("tests/connect/test_netns.py", "tests/hostile/test_mcp.py",
                    "tests/database/test_relay_e2e.py", "tests/replicas/test_replicas_e2e.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {path: i for i, path in enumerate(LONG_FILES_FIRST)}
    # a stable sort: every worker derives the same order (xdist requires it), the rest of the
    # files and the tests inside each file keep theirs
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
