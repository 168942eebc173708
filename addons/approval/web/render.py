"""The held request, rendered for a human reviewer (pure logic: no tornado, no mitmproxy).

`render(what, body)` turns the masked request a hold carries into a view the page's
templates show as text (they escape everything: the request is agent-controlled):

- `transcript`: chat messages in order (system, user, assistant, tool calls with their
  arguments, tool results) for OpenAI chat completions, OpenAI Responses and Anthropic
  messages bodies;
- `tool`: an MCP `tools/call` (tool name + pretty arguments), one per batch member;
- `sql`: the masked statement, laid out one clause per line;
- `json` / `text`: anything else, pretty-printed.

Unknown shapes never fail: they fall back to pretty JSON, then to the raw text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_PARSE = 8 * 1024 * 1024  # bodies above this are shown as text, not parsed
LIST_TURNS = 12     # the list page shows the last turns of a long conversation …
LIST_CHARS = 1500   # … each cut to this many characters (the detail page has all)

KIND_LABELS = {"llm": "LLM call", "tool": "tool call", "sql": "SQL", "webhook": "webhook",
               "http": "HTTP request"}


@dataclass
class ToolCall:
    name: str
    arguments: str  # pretty JSON (or the raw string the model produced)
    id: str = ""


@dataclass
class Turn:
    role: str                      # system | developer | user | assistant | tool | …
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_result_for: str = ""      # the call id a tool result answers
    notes: list[str] = field(default_factory=list)  # "image omitted", …
    chars: int = 0                 # the text's length before a shortened view cut it

    @property
    def length(self) -> int:
        return self.chars or len(self.text)


@dataclass
class View:
    kind: str                      # llm | tool | sql | webhook | http
    shape: str                     # transcript | tool | sql | json | text | empty
    title: str = ""                # "OpenAI chat completions", "MCP tools/call", …
    turns: list[Turn] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    params: list[tuple[str, str]] = field(default_factory=list)  # model, temperature, …
    text: str = ""                 # sql / json / text body

    clipped_chars: int = 0         # characters left out of this (list page) view
    hidden_turns: int = 0          # earlier turns left out of it

    @property
    def clipped(self) -> bool:
        return bool(self.clipped_chars or self.hidden_turns)

    @property
    def kind_label(self) -> str:
        return KIND_LABELS.get(self.kind, self.kind)

    def clip(self, max_turns: int = LIST_TURNS, max_chars: int = LIST_CHARS) -> View:
        """A shorter view for the list page: the last `max_turns` turns (the newest
        message, which usually triggered the hold, is always among them), each text cut
        in the middle to `max_chars`; the detail page shows everything."""
        left = 0

        def cut(text: str) -> str:
            nonlocal left
            if len(text) <= max_chars:
                return text
            left += len(text) - max_chars
            half = max_chars // 2
            return (f"{text[:half]}\n… {len(text) - max_chars:,} characters left out "
                    f"here …\n{text[-half:]}")

        turns = self.turns[-max_turns:] if max_turns else []
        out = View(self.kind, self.shape, self.title, params=self.params,
                   turns=[Turn(t.role, cut(t.text),
                               [ToolCall(c.name, cut(c.arguments), c.id) for c in t.tool_calls],
                               t.tool_result_for, t.notes, len(t.text)) for t in turns],
                   calls=[ToolCall(c.name, cut(c.arguments), c.id) for c in self.calls],
                   text=cut(self.text) if self.shape != "sql" else self.text)
        out.clipped_chars, out.hidden_turns = left, len(self.turns) - len(turns)
        return out


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def _arguments(raw: Any) -> str:
    """Tool-call arguments: OpenAI sends a JSON *string*, Anthropic/MCP an object."""
    if isinstance(raw, str):
        try:
            return pretty(json.loads(raw))
        except ValueError:
            return raw
    return pretty(raw) if raw is not None else "{}"


def _text_of(content: Any, notes: list[str]) -> str:
    """The readable text of a message content (string, or list of typed parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return pretty(content)
    out: list[str] = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, dict):
            out.append(pretty(part))
            continue
        t = part.get("type")
        if isinstance(part.get("text"), str) and t in (None, "text", "input_text",
                                                       "output_text"):
            out.append(part["text"])
        elif t in ("image_url", "image", "input_image"):
            notes.append("image omitted")
        elif t in ("input_audio", "audio", "file", "input_file", "document"):
            notes.append(f"{t} omitted")
        elif t == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
        elif t in ("tool_use", "tool_result", "function_call", "function_call_output"):
            continue  # handled by the caller as tool calls / results
        else:
            out.append(pretty(part))
    return "\n\n".join(out)


def _openai_chat(body: dict[str, Any]) -> list[Turn]:
    turns = []
    for m in body["messages"]:
        if not isinstance(m, dict):
            turns.append(Turn("?", pretty(m)))
            continue
        notes: list[str] = []
        role = str(m.get("role") or "?")
        turn = Turn(role, _text_of(m.get("content"), notes), notes=notes)
        for c in m.get("tool_calls") or []:
            if isinstance(c, dict):
                fn = c.get("function") if isinstance(c.get("function"), dict) else {}
                turn.tool_calls.append(ToolCall(str(fn.get("name") or c.get("type") or "?"),
                                                _arguments(fn.get("arguments")),
                                                str(c.get("id") or "")))
        fc = m.get("function_call")  # the legacy single function call
        if isinstance(fc, dict):
            turn.tool_calls.append(ToolCall(str(fc.get("name") or "?"),
                                            _arguments(fc.get("arguments"))))
        if role in ("tool", "function"):
            turn.tool_result_for = str(m.get("tool_call_id") or m.get("name") or "")
        turns.append(turn)
    return turns


def _anthropic(body: dict[str, Any]) -> list[Turn]:
    turns = []
    system = body.get("system")
    if system:
        notes: list[str] = []
        turns.append(Turn("system", _text_of(system, notes), notes=notes))
    for m in body["messages"]:
        if not isinstance(m, dict):
            turns.append(Turn("?", pretty(m)))
            continue
        notes = []
        role = str(m.get("role") or "?")
        content = m.get("content")
        turn = Turn(role, _text_of(content, notes), notes=notes)
        results: list[Turn] = []
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "tool_use":
                turn.tool_calls.append(ToolCall(str(part.get("name") or "?"),
                                                _arguments(part.get("input")),
                                                str(part.get("id") or "")))
            elif part.get("type") == "tool_result":
                rnotes: list[str] = []
                results.append(Turn("tool", _text_of(part.get("content"), rnotes),
                                    tool_result_for=str(part.get("tool_use_id") or ""),
                                    notes=rnotes))
        if turn.text or turn.tool_calls or turn.notes or not results:
            turns.append(turn)
        turns.extend(results)
    return turns


def _responses(body: dict[str, Any]) -> list[Turn]:
    turns = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        turns.append(Turn("system", body["instructions"]))
    items = body.get("input")
    if isinstance(items, str):
        return [*turns, Turn("user", items)]
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            turns.append(Turn("user", item if isinstance(item, str) else pretty(item)))
            continue
        t = item.get("type")
        if t == "function_call":
            turns.append(Turn("assistant", tool_calls=[ToolCall(
                str(item.get("name") or "?"), _arguments(item.get("arguments")),
                str(item.get("call_id") or ""))]))
        elif t == "function_call_output":
            out = item.get("output")
            turns.append(Turn("tool", out if isinstance(out, str) else pretty(out),
                              tool_result_for=str(item.get("call_id") or "")))
        elif "role" in item:
            notes: list[str] = []
            turns.append(Turn(str(item["role"]), _text_of(item.get("content"), notes),
                              notes=notes))
        else:
            turns.append(Turn(str(t or "?"), pretty(item)))
    return turns


_PARAMS = ("model", "max_tokens", "max_completion_tokens", "max_output_tokens", "n",
           "temperature", "stream")


def _params(body: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(k, str(body[k])) for k in _PARAMS if k in body and not isinstance(body[k], dict)]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        names = []
        for t in tools:
            if isinstance(t, dict):
                fn = t.get("function") if isinstance(t.get("function"), dict) else t
                names.append(str(fn.get("name") or t.get("type") or "?"))
        out.append(("tools offered", ", ".join(names)))
    return out


def _mcp_calls(body: Any) -> tuple[list[ToolCall], list[tuple[str, str]]]:
    members = body if isinstance(body, list) else [body]
    calls: list[ToolCall] = []
    other: list[str] = []
    for m in members:
        if not isinstance(m, dict):
            continue
        params = m.get("params") if isinstance(m.get("params"), dict) else {}
        if m.get("method") == "tools/call":
            calls.append(ToolCall(str(params.get("name") or "?"),
                                  _arguments(params.get("arguments")), str(m.get("id") or "")))
        elif isinstance(m.get("method"), str):
            other.append(m["method"])
    extra = [("batch", str(len(members)))] if isinstance(body, list) else []
    if other:
        extra.append(("other methods", ", ".join(other)))
    return calls, extra


# ---------------------------------------------------------------- SQL layout
_CLAUSES = re.compile(
    r"\b(SELECT|FROM|WHERE|GROUP\s+BY|ORDER\s+BY|HAVING|LIMIT|OFFSET|RETURNING|VALUES|SET|"
    r"(?:LEFT|RIGHT|FULL|INNER|CROSS)(?:\s+OUTER)?\s+JOIN|JOIN|ON\s+CONFLICT|UNION(?:\s+ALL)?|"
    r"INSERT\s+INTO|UPDATE|DELETE\s+FROM|WITH)\b", re.IGNORECASE)
_SQL_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/|[^'\"/-]+|.",
                         re.DOTALL)


def format_sql(sql: str) -> str:
    """One clause per line, keywords upper-cased; quoted text and comments untouched."""
    out: list[str] = []
    for tok in _SQL_TOKENS.findall(sql):
        if tok.startswith("--"):
            out.append(tok + "\n")  # a line comment ends its line: keep what follows out
            continue
        if tok[:1] in ("'", '"') or tok.startswith("/*"):
            out.append(tok)
            continue
        tok = re.sub(r"\s+", " ", tok)
        out.append(_CLAUSES.sub(lambda m: "\n" + re.sub(r"\s+", " ", m.group(1).upper()),
                                tok))
    text = "".join(out)
    lines = [ln.strip() for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if ln).strip()


# ---------------------------------------------------------------- entry point
def render(what: dict[str, Any], body: str) -> View:
    kind = str(what.get("kind") or "http")
    if kind == "sql":
        sql = what.get("sql") if isinstance(what.get("sql"), str) else body
        return View(kind, "sql", "SQL statement", text=format_sql(sql or ""),
                    params=[(k, str(what[k])) for k in ("database", "statement_kind")
                            if what.get(k)] + ([("tables", ", ".join(map(str, what["tables"])))]
                                               if isinstance(what.get("tables"), list) else []))
    if not body:
        return View(kind, "empty", "no body")
    data: Any = None
    if len(body) <= MAX_PARSE and body.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(body)
        except ValueError:
            data = None
    if data is None:
        return View(kind, "text", "request body", text=body)
    if isinstance(data, dict):
        try:
            if isinstance(data.get("messages"), list):
                anthropic = (isinstance(data.get("system"), str | list)
                             or "anthropic" in str(what.get("host") or "")
                             or str(what.get("path") or "").endswith("/messages"))
                turns = _anthropic(data) if anthropic else _openai_chat(data)
                title = "Anthropic messages" if anthropic else "OpenAI chat completions"
                return View(kind, "transcript", title, turns=turns, params=_params(data))
            if "input" in data and (isinstance(data["input"], str | list)) and (
                    "model" in data or str(what.get("path") or "").endswith("/responses")):
                return View(kind, "transcript", "OpenAI Responses", turns=_responses(data),
                            params=_params(data))
        except (TypeError, AttributeError, KeyError):
            pass  # an odd shape: shown as JSON below
    if kind == "tool" or (isinstance(data, dict) and data.get("jsonrpc") == "2.0") or (
            isinstance(data, list) and data and isinstance(data[0], dict)
            and data[0].get("jsonrpc") == "2.0"):
        calls, extra = _mcp_calls(data)
        if calls:
            return View(kind, "tool", "MCP tools/call", calls=calls, params=extra)
    return View(kind, "json", "request body (JSON)", text=pretty(data))
