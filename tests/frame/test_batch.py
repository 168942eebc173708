"""Requests carried inside batches (addons/frame/batch.py)."""

from __future__ import annotations

import json

import pytest

from addons.frame.batch import batch_requests, multipart_parts
from addons.frame.decode import Body, DecodeError

B = "bnd"


def upload(jsonl: bytes, purpose: str = "batch") -> Body:
    data = (f"--{B}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode()
    data += jsonl + f"\r\n--{B}--\r\n".encode()
    return Body(data, "multipart/form-data", {"boundary": B})


def line(i: int, **body) -> bytes:
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": body}).encode()


def test_openai_batch_upload_lines() -> None:
    reqs = batch_requests("POST", "/v1/files",
                          upload(line(1, model="a") + b"\n\n" + line(2, model="b") + b"\n"))
    assert [(r.index, r.custom_id, r.url, r.body["model"]) for r in reqs] == [
        (1, "c1", "/v1/chat/completions", "a"), (2, "c2", "/v1/chat/completions", "b")]
    assert reqs[1].label == "batch request 2"


def test_other_purposes_and_methods_are_not_batches() -> None:
    assert batch_requests("POST", "/v1/files", upload(line(1), "fine-tune")) is None
    assert batch_requests("GET", "/v1/files", upload(line(1))) is None


@pytest.mark.parametrize("jsonl", [
    b"not json", b'{"url": "/v1/x"}', b'{"url": "/v1/x", "body": "s"}', b"[1]",
    b'{"body": {}, "url": ""}', b'{"body": {}, "body": {}, "url": "/x"}',
])
def test_unreadable_lines_are_errors(jsonl: bytes) -> None:
    with pytest.raises(DecodeError):
        batch_requests("POST", "/v1/files", upload(jsonl))


def test_utf16_batch_file_is_read() -> None:
    data = b"\xff\xfe" + line(1, model="x").decode().encode("utf-16-le")
    assert batch_requests("POST", "/v1/files", upload(data))[0].body == {"model": "x"}


def test_anthropic_inline_batch() -> None:
    doc = {"requests": [{"custom_id": "x", "params": {"model": "m"}}]}
    body = Body(json.dumps(doc).encode(), "application/json", {})
    reqs = batch_requests("POST", "/v1/messages/batches", body)
    assert [(r.url, r.body) for r in reqs] == [("/v1/messages", {"model": "m"})]
    bad = Body(b'{"requests": [{"custom_id": "x"}]}', "application/json", {})
    with pytest.raises(DecodeError):
        batch_requests("POST", "/v1/messages/batches", bad)


def test_openai_batch_create_names_a_file_only() -> None:
    body = Body(b'{"input_file_id": "f", "endpoint": "/v1/chat/completions"}',
                "application/json", {})
    assert batch_requests("POST", "/v1/batches", body) is None


def test_multipart_malformed() -> None:
    with pytest.raises(DecodeError):
        multipart_parts(b"--x\r\nno end", "x")
    with pytest.raises(DecodeError):
        multipart_parts(b"", "")
