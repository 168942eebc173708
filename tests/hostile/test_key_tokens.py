"""A secret written with letters and '_' only, sent as a JSON object key, through a real
mitmdump: the body walk took every such key for a plain field name (bodies._PLAIN_KEY) and
left it out of what the detectors read, so a Hugging Face token (always letters), an AWS
access key id or a Stripe key without a digit reached the upstream as the key of a tool's
parameters, a message's metadata or the body itself. The stand-in must receive none."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Gateway
from tests.masking.test_plain_keys import TOKENS

pytestmark = pytest.mark.integration

OPENAI = "https://api.openai.com"
HOOK = "https://hooks.example.com"


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


def test_tokens_as_keys_never_reach_the_upstream(gw, standin) -> None:
    standin.clear()
    toks = list(TOKENS.values())
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {toks[0]: {"type": "string"}}}}}
    bodies = [
        (OPENAI + "/v1/chat/completions",
         {"model": "gpt-4o-mini", "tools": [tool], "messages": [
             {"role": "user", "content": "hello", "metadata": {toks[1]: 1}},
             {"role": "assistant", "content": "hi", toks[2]: "x"}]}),
        (HOOK + "/ev", {toks[3]: "v", "nested": [{toks[4]: None}]}),
    ]
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60) as c:
        for url, body in bodies:
            r = c.post(url, json=body, headers={"authorization": "Bearer x"})
            assert r.status_code == 200, (url, r.text[:300])
    assert len(standin.requests) == 2
    got = "\n".join(r["body"] + json.dumps(r["headers"]) for r in standin.requests)
    assert [t for t in toks if t in got] == [], got[:2000]
    first = json.loads(standin.requests[0]["body"])
    assert first["messages"][0]["content"] == "hello"  # the rest as sent
