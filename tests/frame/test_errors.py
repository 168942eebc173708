"""Error bodies: every status the gateway emits has a proper type in both dialects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from addons.egress.edge import MITM_ERRORS
from addons.frame.errors import _TYPES, error_body, error_types

ADDONS = Path(__file__).resolve().parents[2] / "addons"
# refuse(flow, 421, ...) / status = 503 / Response.make(431, ...) / error_body(d, 413, ...)
_EMITTED = re.compile(r"(?:refuse\([^,()]+,\s*|status\s*=\s*|Response\.make\(\s*|"
                      r"error_body\([^,()]+,\s*)(\d{3})\b")


def emitted_statuses() -> set[int]:
    found = set()
    for path in ADDONS.rglob("*.py"):
        found |= {int(m) for m in _EMITTED.findall(path.read_text())}
    return {s for s in found if s >= 400} | set(MITM_ERRORS)


def test_the_scan_finds_the_gateways_statuses():
    # The scan must keep seeing the refusals (a scan that finds nothing proves nothing).
    assert {400, 403, 413, 421, 431, 502, 503} <= emitted_statuses()


@pytest.mark.parametrize("status", sorted(emitted_statuses()))
def test_every_emitted_status_has_an_explicit_type(status):
    assert status in _TYPES, f"{status} has no OpenAI/Anthropic error type in frame/errors.py"


@pytest.mark.parametrize("status,openai,anthropic", [
    (421, "invalid_request_error", "invalid_request_error"),
    (431, "invalid_request_error", "request_too_large"),
    (413, "invalid_request_error", "request_too_large"),
    (503, "api_error", "overloaded_error"),
    (504, "timeout_error", "timeout_error"),
])
def test_types(status, openai, anthropic):
    assert json.loads(error_body("openai", status, "m", "c"))["error"]["type"] == openai
    doc = json.loads(error_body("anthropic", status, "m", "c"))
    assert doc["type"] == "error" and doc["error"]["type"] == anthropic


@pytest.mark.parametrize("status", [418, 422, 499])
def test_unlisted_client_errors_are_not_typed_as_provider_failures(status):
    assert error_types(status) == ("invalid_request_error", "invalid_request_error")


def test_unlisted_server_errors():
    assert error_types(599) == ("api_error", "api_error")
