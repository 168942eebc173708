"""The log scrubber and the shared credential shapes (issue 11, class 10)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from addons.frame import credshape, logscrub

REAL = "sk-proj-LOGSCRUBREALKEY000000000000000000000000"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudC03In0.c2lnbmF0dXJlc2lnbmF0dXJl"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    logscrub.set_secrets([REAL, "whk-short"])
    logscrub.install()
    try:
        yield out
    finally:
        logscrub.uninstall()
        root.removeHandler(handler)
        root.setLevel(old_level)
        logscrub.set_secrets([])


def test_args_child_loggers_and_exceptions_are_scrubbed(captured: io.StringIO) -> None:
    # a child logger's record propagates to root: a logger filter would never see it
    logging.getLogger("mitmproxy.proxy.server").debug("<< %r", (
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nProxy-Authorization: Basic "
        b"YWdlbnQ6ZXlKaGJHY2lPaUpTVXpJMU5pSjkuZXlK\r\n\r\n"))
    logging.getLogger("agentgate.x").info("key %s token %s", REAL, JWT)
    try:
        raise ValueError(f"upstream said Authorization: Bearer {REAL}")
    except ValueError:
        logging.getLogger("mitmproxy").exception("failed with %s", f"?id_token={JWT}")
    text = captured.getvalue()
    for bad in (REAL, JWT, "YWdlbnQ6ZXlK", "eyJhbGci"):
        assert bad not in text
    assert text.count(credshape.REDACTED) >= 4 and "ValueError" in text


def test_handlers_added_later_get_records_already_scrubbed(captured: io.StringIO) -> None:
    late = io.StringIO()
    h = logging.StreamHandler(late)
    logging.getLogger().addHandler(h)
    try:
        logging.getLogger("x").warning("Authorization: Bearer %s", JWT)
    finally:
        logging.getLogger().removeHandler(h)
    assert JWT not in late.getvalue() and "Authorization: [REDACTED]" in late.getvalue()


def test_make_log_record_is_scrubbed_by_the_handler_filter(captured: io.StringIO) -> None:
    rec = logging.makeLogRecord({"name": "x", "msg": "k=%s", "args": (REAL,),
                                 "levelno": logging.ERROR, "levelname": "ERROR"})
    for h in logging.getLogger().handlers:
        h.handle(rec)
    assert REAL not in captured.getvalue()


def test_rotated_secret_added_at_runtime(captured: io.StringIO) -> None:
    logscrub.add_secret("rotated-secret-value-42")
    logging.getLogger("y").error("sent rotated-secret-value-42")
    assert "rotated-secret-value-42" not in captured.getvalue()


def test_scrubbing_stream_for_the_dumper() -> None:
    logscrub.set_secrets([REAL])
    try:
        out = io.StringIO()
        s = logscrub.ScrubbingStream(out)
        print(f"authorization: Bearer {REAL}", file=s)  # type: ignore[arg-type]
        print(f"GET https://h/p?access_token=abc123&q=1 {JWT}", file=s)  # type: ignore[arg-type]
        assert REAL not in out.getvalue() and JWT not in out.getvalue()
        assert "abc123" not in out.getvalue() and "q=1" in out.getvalue()
    finally:
        logscrub.set_secrets([])


@pytest.mark.parametrize("key", ["id_token", "jwt", "access_token", "token", "key", "api_key",
                                 "apiKey", "signature", "sig", "X-Amz-Signature",
                                 "X-Amz-Credential", "client_secret", "refreshToken",
                                 "password", "subscription-key", "x-goog-api-key"])
def test_credential_keys_by_class(key: str) -> None:
    assert credshape.is_credential_key(key)


@pytest.mark.parametrize("key", ["model", "limit", "q", "max_tokens", "keyword", "sort",
                                 "stream", "page", "api-version"])
def test_ordinary_keys_are_not_credentials(key: str) -> None:
    assert not credshape.is_credential_key(key)


def test_redact_url_by_key_and_by_jwt_shape() -> None:
    url = f"https://h/cb?state={JWT}&limit=5&sig=abc#access_token=xyz"
    assert credshape.redact_url(url) == \
        "https://h/cb?state=[REDACTED]&limit=5&sig=[REDACTED]#access_token=[REDACTED]"
    assert credshape.redact_url("https://h/p") == "https://h/p"
