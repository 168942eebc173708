"""`agentgate mask`: stdin to stdout as the gateway would mask it."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from addons.cli import main
from addons.masking.cli import detect_dialect


def run_cli(monkeypatch, capsys, args: list[str], data: bytes) -> tuple[int, str, str]:
    class Stdin:
        buffer = io.BytesIO(data)

    monkeypatch.setattr(sys, "stdin", Stdin)
    monkeypatch.chdir(Path(__file__).parent)  # no ./rules here: built-in defaults
    monkeypatch.delenv("AGENTGATE_RULES", raising=False)
    rc = main(["mask", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text(monkeypatch, capsys) -> None:
    rc, out, _ = run_cli(monkeypatch, capsys, [],
                         b"mail jane.doe@example.com and 4111 1111 1111 1111\n")
    assert rc == 0 and out == "mail [EMAIL_1] and [CREDIT_CARD_1]\n"


def test_json_openai_with_report(monkeypatch, capsys) -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": "jane.doe@example.com"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": json.dumps({"to": "jane.doe@example.com"})}}]}]}
    rc, out, _ = run_cli(monkeypatch, capsys, ["--json"], json.dumps(body).encode())
    masked = json.loads(out)
    assert rc == 0 and masked["messages"][0]["content"] == "[EMAIL_1]"
    assert json.loads(masked["messages"][1]["tool_calls"][0]["function"]["arguments"]) == \
        {"to": "[EMAIL_1]"}
    rc, out, _ = run_cli(monkeypatch, capsys, ["--json", "--report"], json.dumps(body).encode())
    assert json.loads(out) == {"findings": {"EMAIL": {"count": 2, "strategy": "placeholder"}}}
    assert "jane" not in out


def test_rules_dir_and_refusals(monkeypatch, capsys, tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("masking:\n  entities:\n    EMAIL: redact\n")
    rc, out, _ = run_cli(monkeypatch, capsys, ["--rules", str(tmp_path)],
                         b"jane.doe@example.com")
    assert rc == 0 and out == "[REDACTED_EMAIL]"
    rc, _, err = run_cli(monkeypatch, capsys, ["--json"], b"{broken")
    assert rc == 2 and "not valid JSON" in err
    (tmp_path / "bad.yaml").write_text("masking:\n  on_unparseable: maybe\n")
    rc, _, err = run_cli(monkeypatch, capsys, ["--rules", str(tmp_path)], b"x")
    assert rc == 2 and "on_unparseable" in err


@pytest.mark.parametrize("body,dialect", [
    ({"model": "claude", "max_tokens": 5, "system": "s", "messages": []}, "anthropic"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]}, "anthropic"),
    ({"model": "m", "tools": [{"name": "f", "input_schema": {}}], "messages": []}, "anthropic"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "openai"),
    ({"model": "m", "input": "hi"}, "openai"),
    ({"event": "x"}, "generic"),
    ([1, 2], "generic"),
])
def test_detect_dialect(body, dialect: str) -> None:
    assert detect_dialect(body) == dialect
