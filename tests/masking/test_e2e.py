"""Masking through a real mitmdump with real `openai` and `anthropic` SDK clients.

The stand-in records what it received: no raw value may ever be in it. It echoes the last
user text by default, so with `restore: true` (upstream openai here) the agent gets its
originals back, and without it (anthropic) it sees the placeholders. Evasions of
SECURITY.md's masking list each have a case here (the detector-level ones also in the
detector engine's own tests).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import anthropic
import brotli
import httpx
import openai
import pytest
import zstandard

from tests.conftest import Gateway, standin_upstreams_yaml, start_gateway

pytestmark = pytest.mark.integration

EMAIL = "ann.lee@example.com"
CARD = "4111 1111 1111 1111"
SSN = "536-22-4519"
IBAN = "GB82 WEST 1234 5698 7654 32"
OPENAI_SECRET = "sk-proj-" + "Qm9vdFN0cmFwX3NlY3JldF92YWx1ZV8xMjM0NTY3ODkw" * 2
RAW_VALUES = [EMAIL, "4111", SSN, "WEST", "GB82", OPENAI_SECRET[:20]]
SESSION = {"X-Agent-Session": "e2e-1"}


@pytest.fixture(scope="module")
def gw(standin, gateway_confdir, tmp_path_factory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("masking-e2e")
    rules = tmp / "rules"
    rules.mkdir()
    ups = standin_upstreams_yaml(standin).replace(
        "    dialect: openai\n", "    dialect: openai\n    restore: true\n")
    (rules / "rules.yaml").write_text(
        ups + "identity:\n  required: false\nmasking:\n  max_body_bytes: 4194304\n")
    g = start_gateway(rules, gateway_confdir, tmp / "data", tmp / "gateway.log",
                      standin_ca=standin.ca_path)
    yield g
    g.stop()


def oa(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(api_key="x", max_retries=0, timeout=30, default_headers=SESSION,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                               verify=str(gw.ca_cert)))


def an(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="x", max_retries=0, timeout=30,
                               default_headers=SESSION,
                               http_client=anthropic.DefaultHttpxClient(
                                   proxy=gw.proxy_url(), verify=str(gw.ca_cert)))


def raw_client(gw: Gateway) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30)


def views(req: dict) -> list[str]:
    """What the upstream got, also decoded (JSON escapes, URL encoding), as a reader would."""
    from urllib.parse import unquote_plus
    body = req["body"]
    # the stand-in's own bookkeeping (the arrival time, e.g. 1796159016.4111366) is not what
    # the upstream received: a digit run like "4111" in it is no leak
    sent = {k: v for k, v in req.items() if k != "time"}
    out = [json.dumps(sent, ensure_ascii=False), unquote_plus(body), unquote_plus(req["path"])]
    try:
        out.append(json.dumps(json.loads(body), ensure_ascii=False))
    except ValueError:
        pass
    return out


def assert_clean(standin, *extra: str) -> None:
    """Nothing the stand-in received contains a raw value."""
    seen = "\n".join(v for r in standin.requests for v in views(r))
    assert standin.requests, "nothing reached the stand-in"
    for v in (*RAW_VALUES, *extra):
        assert v not in seen, f"raw value reached the upstream: {v[:6]}…"


PROMPT = f"I am {EMAIL}, card {CARD}, ssn {SSN}, iban {IBAN}, key {OPENAI_SECRET}"


def test_openai_chat_non_streaming_masked_and_restored(gw: Gateway, standin) -> None:
    standin.clear()
    r = oa(gw).chat.completions.create(model="gpt-4o-mini", messages=[
        {"role": "system", "content": f"escalate to {EMAIL}"},
        {"role": "user", "content": PROMPT}])
    assert_clean(standin)
    sent = json.loads(standin.requests[0]["body"])
    assert re.search(r"\[EMAIL_\d+\]", sent["messages"][1]["content"])
    # restore: the echo comes back with the originals
    assert r.choices[0].message.content == f"echo: {PROMPT}"


def test_openai_chat_streaming_restored(gw: Gateway, standin) -> None:
    standin.clear()
    standin.stream_defaults["delta_chars"] = 3
    try:
        chunks = oa(gw).chat.completions.create(
            model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": PROMPT}])
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        standin.stream_defaults["delta_chars"] = 8
    assert_clean(standin)
    assert text == f"echo: {PROMPT}"


@pytest.mark.parametrize("shape", [{"delta_chars": 3}, {"delta_chars": 2, "split_writes": True}])
def test_model_output_split_across_events_and_writes_is_masked(gw: Gateway, standin,
                                                               shape: dict) -> None:
    standin.clear()
    secret_text = "Contact bob.marsh@example.org or 4012 8888 8888 1881 today"
    standin.script(text=secret_text, **shape)
    chunks = oa(gw).chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "who?"}])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "bob.marsh" not in text and "4012" not in text and "1881" not in text
    assert re.fullmatch(r"Contact \[EMAIL_\d+\] or \[CREDIT_CARD_\d+\] today", text), text
    # the same through Anthropic's stream (no restore on that upstream)
    standin.script(text=secret_text, **shape)
    with an(gw).messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                                messages=[{"role": "user", "content": "who?"}]) as s:
        atext = "".join(s.text_stream)
    assert re.fullmatch(r"Contact \[EMAIL_\d+\] or \[CREDIT_CARD_\d+\] today", atext), atext


def test_anthropic_non_streaming_and_streaming_placeholders(gw: Gateway, standin) -> None:
    standin.clear()
    c = an(gw)
    msg = c.messages.create(model="claude-sonnet-4-5", max_tokens=100,
                            system=f"Operator {EMAIL}",
                            messages=[{"role": "user", "content": PROMPT}])
    text = msg.content[0].text
    assert EMAIL not in text and re.search(r"\[EMAIL_\d+\]", text)
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                           messages=[{"role": "user", "content": PROMPT}]) as s:
        streamed = "".join(s.text_stream)
    assert streamed == text  # same session: the same placeholders
    assert_clean(standin)


def test_openai_responses_api(gw: Gateway, standin) -> None:
    standin.clear()
    c = oa(gw)
    r = c.responses.create(model="gpt-4o-mini", input=PROMPT, instructions=f"cc {EMAIL}")
    assert r.output_text == f"echo: {PROMPT}"
    s = c.responses.create(model="gpt-4o-mini", input=PROMPT, stream=True)
    deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    assert deltas == f"echo: {PROMPT}"
    assert_clean(standin)


TOOLS_OA = [{"type": "function", "function": {
    "name": "lookup_customer", "description": f"CRM; owner {EMAIL}",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


def test_tool_calls_arguments_both_ways(gw: Gateway, standin) -> None:
    standin.clear()
    c = oa(gw)
    # streamed tool call: arguments restored (JSON inside a JSON string, streamed)
    stream = c.chat.completions.create(model="gpt-4o-mini", stream=True, tools=TOOLS_OA,
                                       messages=[{"role": "user", "content": f"find {EMAIL}"}])
    args = "".join(tc.function.arguments or "" for ch in stream if ch.choices
                   for tc in (ch.choices[0].delta.tool_calls or []))
    assert json.loads(args) == {"query": f"find {EMAIL}"}
    # the agent sends the call and its result back: arguments and result are masked
    r = c.chat.completions.create(model="gpt-4o-mini", tools=TOOLS_OA, messages=[
        {"role": "user", "content": "find her"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "lookup_customer",
                         "arguments": json.dumps({"query": EMAIL, "card": CARD})}}]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": json.dumps({"ssn": SSN, "iban": IBAN})}])
    assert r.choices[0].message.content.startswith("done: ")
    assert SSN in r.choices[0].message.content  # restored for the agent
    assert_clean(standin)
    # Anthropic tool use, streamed input_json_delta, no restore
    tools = [{"name": "lookup_customer", "description": "CRM",
              "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]
    with an(gw).messages.stream(model="claude-sonnet-4-5", max_tokens=100, tools=tools,
                                messages=[{"role": "user", "content": f"find {EMAIL}"}]) as s:
        final = s.get_final_message()
    (block,) = [b for b in final.content if b.type == "tool_use"]
    assert EMAIL not in json.dumps(block.input) and "[EMAIL_" in block.input["query"]


# ---------------------------------------------------------------- evasions
def post(gw: Gateway, url: str, content: bytes, headers: dict) -> httpx.Response:
    with raw_client(gw) as c:
        return c.post(url, content=content, headers={**SESSION, **headers})


def last_body(standin) -> str:
    return standin.requests[-1]["body"]


@pytest.mark.parametrize("text", [
    "card 4111-1111-1111-1111", "card 4111.1111.1111.1111", "card 4111111111111111",
    "card ４１１１ １１１１ １１１１ １１１１",                       # full-width digits
    "card ٤١١١ ١١١١ ١١١١ ١١١١",                                       # Arabic-Indic digits
    "card 4111\u200b1111\u200b1111\u200b1111",                       # zero-width spaces
    "mail ann.lee\u200d@example.com",
])
def test_evasion_separators_unicode_zero_width(gw: Gateway, standin, text: str) -> None:
    standin.clear()
    r = oa(gw).chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": text}])
    sent = json.loads(last_body(standin))["messages"][0]["content"]
    assert re.fullmatch(r"(card|mail) \[(CREDIT_CARD|EMAIL)_\d+\]", sent), sent
    assert r.choices[0].message.content == f"echo: {text}"  # restored as the agent wrote it


def test_evasion_split_across_content_parts(gw: Gateway, standin) -> None:
    standin.clear()
    oa(gw).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": [
        {"type": "text", "text": "card 4111 1111"}, {"type": "text", "text": " 1111 1111 ok"}]}])
    body = last_body(standin)
    assert "1111" not in body and "CREDIT_CARD_" in body


@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "zstd"])
def test_evasion_compressed_bodies(gw: Gateway, standin, enc: str) -> None:
    standin.clear()
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}]}).encode()
    comp = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
            "zstd": zstandard.ZstdCompressor().compress}[enc](raw)
    r = post(gw, "https://api.openai.com/v1/chat/completions", comp,
             {"content-type": "application/json", "content-encoding": enc})
    assert r.status_code == 200, r.text
    assert_clean(standin)
    assert r.json()["choices"][0]["message"]["content"] == f"echo: {PROMPT}"


def test_evasion_json_escapes(gw: Gateway, standin) -> None:
    standin.clear()
    escaped = "".join(f"\\u{ord(c):04x}" for c in CARD)
    body = ('{"model": "m", "messages": [{"role": "user", "content": "card ' + escaped
            + ' mail ann.lee\\u0040example.com"}]}').encode()
    r = post(gw, "https://api.openai.com/v1/chat/completions", body,
             {"content-type": "application/json"})
    assert r.status_code == 200
    assert_clean(standin)


def test_evasion_form_and_multipart_webhooks(gw: Gateway, standin) -> None:
    standin.clear()
    form = "to=ann.lee%40example.com&card=%34111+1111+1111+1111&ssn=536%2d22%2d4519"
    r = post(gw, "https://hooks.example.com/form", form.encode(),
             {"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    b = "agentgateBOUNDARY"
    multi = (f"--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n{PROMPT}\r\n"
             f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.json\"\r\n"
             f"Content-Type: application/json\r\n\r\n{json.dumps({'e': EMAIL})}\r\n"
             f"--{b}--\r\n").encode()
    r = post(gw, "https://hooks.example.com/multi", multi,
             {"content-type": f"multipart/form-data; boundary={b}"})
    assert r.status_code == 200
    assert_clean(standin)
    # a webhook query string is masked as well
    with raw_client(gw) as c:
        assert c.get(f"https://hooks.example.com/q?email={EMAIL}").status_code == 200
    assert_clean(standin)


def test_evasion_very_large_bodies(gw: Gateway, standin) -> None:
    standin.clear()
    filler = "The quick brown fox jumps over the lazy dog. " * 60_000  # ~2.7 MB
    body = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": filler + PROMPT + filler[:1000]}]}).encode()
    r = post(gw, "https://api.openai.com/v1/chat/completions", body,
             {"content-type": "application/json"})
    assert r.status_code == 200
    assert_clean(standin)
    # over masking.max_body_bytes (4 MiB here): refused, never passed
    big = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": filler * 2 + PROMPT}]}).encode()
    n = len(standin.requests)
    with pytest.raises(openai.APIStatusError) as e:
        oa(gw).chat.completions.create(model="m", messages=[
            {"role": "user", "content": filler * 2 + PROMPT}])
    assert e.value.status_code == 413 and len(big) > 4 << 20
    # a gzip bomb that decodes over the limit
    r = post(gw, "https://api.openai.com/v1/chat/completions", gzip.compress(big),
             {"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 413
    assert len(standin.requests) == n


def test_unparseable_refused_in_dialect(gw: Gateway, standin) -> None:
    standin.clear()
    r = post(gw, "https://api.anthropic.com/v1/messages", b"\xff\xfe\x00binary",
             {"content-type": "application/octet-stream"})
    assert r.status_code == 415 and r.json()["type"] == "error"
    r = post(gw, "https://api.openai.com/v1/chat/completions", b"{not json",
             {"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unmaskable_body"
    assert standin.requests == []


def test_logs_hold_no_values(gw: Gateway) -> None:
    logs = gw.logs()
    for v in RAW_VALUES:
        assert v not in logs


def test_cli_mask(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT
    p = subprocess.run([sys.executable, "-m", "addons.cli", "mask"], input=PROMPT.encode(),
                       capture_output=True, cwd=str(tmp_path), timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert EMAIL not in out and "[EMAIL_1]" in out
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}]})
    p = subprocess.run([sys.executable, "-m", "addons.cli", "mask", "--json", "--report"],
                       input=body.encode(), capture_output=True, cwd=str(tmp_path), timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)["findings"]
    assert rep["EMAIL"] == {"count": 1, "strategy": "placeholder"}
    assert EMAIL not in p.stdout.decode()


def test_anthropic_restore_streaming_and_not(gateway_factory, standin) -> None:
    ups = standin_upstreams_yaml(standin).replace(
        "    dialect: anthropic\n", "    dialect: anthropic\n    restore: true\n")
    g = gateway_factory(ups + "identity:\n  required: false\n")
    standin.clear()
    c = an(g)
    msg = c.messages.create(model="claude-sonnet-4-5", max_tokens=100,
                            messages=[{"role": "user", "content": PROMPT}])
    assert msg.content[0].text == f"echo: {PROMPT}"
    standin.stream_defaults["delta_chars"] = 3
    try:
        with c.messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                               messages=[{"role": "user", "content": PROMPT}]) as s:
            assert "".join(s.text_stream) == f"echo: {PROMPT}"
        tools = [{"name": "lookup", "description": "CRM",
                  "input_schema": {"type": "object",
                                   "properties": {"query": {"type": "string"}}}}]
        with c.messages.stream(model="claude-sonnet-4-5", max_tokens=100, tools=tools,
                               messages=[{"role": "user", "content": f"find {EMAIL}"}]) as s:
            final = s.get_final_message()
    finally:
        standin.stream_defaults["delta_chars"] = 8
    (block,) = [b for b in final.content if b.type == "tool_use"]
    assert block.input == {"query": f"find {EMAIL}"}  # restored inside input_json_delta
    assert_clean(standin)
