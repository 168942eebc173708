"""Masking reads an encoded body through the flow's shared decode (addons/frame/decode.py):
one decompression per body and flow, with the same TooLarge/Unparseable answers as before."""

from __future__ import annotations

import gzip
import json

import pytest
from mitmproxy.test import tflow

from addons.frame import decode
from addons.masking.addon import mask_message, mask_response
from addons.masking.bodies import Masked, TooLarge, Unparseable
from addons.masking.config import MaskingConfig
from addons.masking.detectors import DetectorSet
from addons.masking.masker import Masker, Session

LIMIT = 1024 * 1024
BODY = json.dumps({"model": "m", "messages": [
    {"role": "user", "content": "mail jane.doe@example.com " + "x" * 1000}]}).encode()


def ctx() -> Masked:
    return Masked(Masker(DetectorSet(MaskingConfig()), b"k"), Session(), {},
                  restorable=True, dialect="openai")


def flow_with(raw: bytes, encoding: str = "gzip"):
    f = tflow.tflow(resp=True)
    for msg in (f.request, f.response):
        msg.headers["content-encoding"] = encoding
        msg.headers["content-type"] = "application/json"
        msg.raw_content = raw
    return f


@pytest.fixture
def decodes(monkeypatch):
    calls: list[int] = []
    real = decode.decompress

    def counting(raw, enc, **kw):
        calls.append(len(raw))
        return real(raw, enc, **kw)
    monkeypatch.setattr(decode, "decompress", counting)
    return calls


def test_request_body_is_decoded_once_per_flow(decodes):
    f = flow_with(gzip.compress(BODY))
    decode.request_body(f, max_bytes=LIMIT).json  # policy's read
    out = mask_message(ctx(), f.request.raw_content, "gzip", "application/json", LIMIT,
                       False, flow=f)
    assert out is not None and b"jane.doe@example.com" not in out
    assert len(decodes) == 1


def test_response_body_is_decoded_once_per_flow(decodes):
    f = flow_with(gzip.compress(BODY))
    decode.response_body(f, max_bytes=LIMIT)
    new, _ = mask_response(ctx(), f.response.raw_content, "gzip", "application/json",
                           LIMIT, False, False, flow=f)
    assert new is not None and b"jane.doe@example.com" not in new
    assert len(decodes) == 1


def test_a_body_that_is_not_the_flows_is_decoded_by_itself(decodes):
    f = flow_with(gzip.compress(b"{}"))
    other = gzip.compress(BODY)
    out = mask_message(ctx(), other, "gzip", "application/json", LIMIT, False, flow=f)
    assert out is not None and b"jane.doe@example.com" not in out


@pytest.mark.parametrize("raw,exc,status", [
    (gzip.compress(b"{" + b" " * (LIMIT + 10) + b"}"), TooLarge, None),
    (b"\x1f\x8b not gzip", Unparseable, 400),
])
def test_same_errors_through_the_shared_decode(raw, exc, status):
    for flow in (None, flow_with(raw)):
        with pytest.raises(exc) as got:
            mask_message(ctx(), raw, "gzip", "application/json", LIMIT, False, flow=flow)
        if status is not None:
            assert got.value.status == status


def test_unknown_coding_is_unparseable_415_either_way():
    for flow in (None, flow_with(b"abc", "compress")):
        with pytest.raises(Unparseable) as got:
            mask_message(ctx(), b"abc", "compress", "application/json", LIMIT, False,
                         flow=flow)
        assert got.value.status == 415
