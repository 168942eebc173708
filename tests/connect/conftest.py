"""Fixtures for the connector tests (helpers.py holds the fakes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from addons.connect.forwarder import ConnectConfig
from addons.connect.tokens import TokenSource
from tests.connect.helpers import FakeGateway, RunningConnector


@pytest.fixture
def fake_gateway() -> Iterator[FakeGateway]:
    g = FakeGateway()
    yield g
    g.stop()


ConnectorFactory = Callable[..., RunningConnector]


@pytest.fixture
def connector() -> Iterator[ConnectorFactory]:
    """make(source, gateway_port, **config) -> a connector listening on 127.0.0.1:<free>."""
    started: list[RunningConnector] = []

    def make(source: TokenSource, gateway_port: int, **kw: Any) -> RunningConnector:
        cfg = ConnectConfig(gateway_host="127.0.0.1", gateway_port=gateway_port,
                            listen_host="127.0.0.1", listen_port=0, **kw)
        rc = RunningConnector(cfg, source)
        started.append(rc)
        return rc

    yield make
    for rc in started:
        rc.stop()
