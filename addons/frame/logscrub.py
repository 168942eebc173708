"""No credential in any log line, at any verbosity.

mitmproxy's `proxy_debug` logs raw bytes (a CONNECT's `Proxy-Authorization`, the agent's
`Authorization`), `termlog_verbosity=debug` and the dumper at `flow_detail=4` print headers,
URLs and bodies, mitmweb's event log shows the same records, and an exception text may quote
request data. Each of those is a way for a real upstream key or an agent's token to land in a
log file. One scrubber closes all of them:

- a LogRecord factory (`logging.setLogRecordFactory`) scrubs every record when it is made,
  whichever logger made it: filters on loggers never see records propagated from child
  loggers, and mitmproxy adds its handlers when it likes. The message is formatted first
  (`record.getMessage()`: the secret is usually in the args), the exception and stack text
  are rendered, scrubbed and folded into the message (mitmproxy's formatter would otherwise
  render the traceback again from `exc_info`);
- the same scrub as a filter on every handler of the root logger (mitmproxy's termlog and
  event store handlers included), for records made before the factory was installed or by
  `logging.makeLogRecord`;
- the dumper (mitmdump's flow output at any `flow_detail`) writes to a stream, not to
  `logging`: its stream is wrapped.

What is scrubbed: the values given to `set_secrets` / `add_secret` (the credentials addon
feeds every upstream's real credential, re-read on rules changes), plus everything
`addons/frame/credshape.py::scrub_text` recognises by shape (auth header values, auth
schemes, JWT-shaped strings, credential-like key=value pairs, well-known API key formats).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import IO, Any

from addons.frame.credshape import scrub_text

MIN_SECRET_LEN = 8  # shorter values would match ordinary text
_MARK = "_agentgate_scrubbed"

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def set_secrets(values: Iterable[str]) -> None:
    """Replace the set of known secret values (longest first, so a prefixed form goes first)."""
    global _secrets
    vals = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LEN}
    with _lock:
        _secrets = tuple(sorted(vals, key=len, reverse=True))


def add_secret(value: str | None) -> None:
    if value and len(value) >= MIN_SECRET_LEN and value not in _secrets:
        set_secrets((*_secrets, value))


def secrets_known() -> tuple[str, ...]:
    return _secrets


def scrub(text: str) -> str:
    return scrub_text(text, _secrets)


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub a record in place (once): message with its args, exception and stack text."""
    if getattr(record, _MARK, False):
        return record
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 - bad args: keep what can be shown
        msg = f"{record.msg!r} (unformattable args)"
    parts = [msg]
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    record.msg = scrub("\n".join(parts))
    record.args = None
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None
    setattr(record, _MARK, True)
    return record


class ScrubFilter(logging.Filter):
    """Handler filter: scrubs the record, never drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


FILTER = ScrubFilter("agentgate-scrub")
_previous_factory: Callable[..., logging.LogRecord] | None = None


def _factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    assert _previous_factory is not None
    record = _previous_factory(*args, **kwargs)
    if record.name is None:  # logging.makeLogRecord: filled in afterwards; the filter scrubs
        return record
    return scrub_record(record)


def install() -> None:
    """Install the record factory (once) and the filter on every current root handler.
    Idempotent; call again when handlers may have been added (mitmproxy adds its own)."""
    global _previous_factory
    current = logging.getLogRecordFactory()
    if current is not _factory:
        _previous_factory = current
        logging.setLogRecordFactory(_factory)
    for h in logging.getLogger().handlers:
        if FILTER not in h.filters:
            h.addFilter(FILTER)


def uninstall() -> None:
    global _previous_factory
    if logging.getLogRecordFactory() is _factory and _previous_factory is not None:
        logging.setLogRecordFactory(_previous_factory)
        _previous_factory = None
    for h in logging.getLogger().handlers:
        h.removeFilter(FILTER)


class ScrubbingStream:
    """A text stream that scrubs what is written to it (for mitmdump's dumper)."""

    def __init__(self, inner: IO[str]) -> None:
        self.inner = inner

    def write(self, s: str) -> int:
        self.inner.write(scrub(s))
        return len(s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def wrap_stream(obj: Any, attr: str) -> None:
    """Replace obj.<attr> (a text stream) by a scrubbing wrapper, once."""
    stream = getattr(obj, attr, None)
    if stream is not None and not isinstance(stream, ScrubbingStream):
        setattr(obj, attr, ScrubbingStream(stream))
