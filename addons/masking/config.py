r"""Parse the `masking` section of the rules: which detectors run, how findings are replaced.

```yaml
masking:
  enabled: true                     # default
  on_unparseable: refuse            # default; `pass_text` masks the body as plain text instead
  max_body_bytes: 16777216          # bodies larger than this are refused when masking applies
  hmac_key_env: AGENTGATE_MASK_KEY  # env var holding the key of the `hash` strategy
  default_strategy: placeholder     # placeholder | redact | partial | hash
  entities:
    EMAIL: placeholder              # shorthand for {strategy: placeholder}
    CREDIT_CARD: {strategy: partial}
    IP_ADDRESS: {enabled: false}
  allow: ['support@example\.com']   # regexes; a finding whose whole value matches is left alone
  headers_pass: [x-trace-id]        # headers never masked, added to DEFAULT_HEADERS_PASS
  custom:
    - name: EMPLOYEE_ID
      pattern: 'EMP-\d{6}'
      validator: luhn               # luhn | mod97 | none (default)
      context: [employee, staff]    # one of these words within context_window chars
      context_window: 40
      ignore_case: false
      max_length: 64                # longest value it may match (bounds stream hold-back)
      strategy: redact
```

No mitmproxy import: the CLI and the tests use the same parser as the gateway. Patterns are
compiled with the `regex` module (the detectors' engine) so errors are reported here, at load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import regex

from addons.config.schema import (
    MapSection,
    Where,
    expect_bool,
    expect_int,
    expect_map,
    expect_str,
    expect_str_list,
)

STRATEGIES = ("placeholder", "redact", "partial", "hash")
VALIDATORS = ("none", "luhn", "mod97")
UNPARSEABLE = ("refuse", "pass_text")

# Built-in entity names (the `[NAME_n]` placeholders). addons.masking.detectors implements each one;
# a test checks the two lists agree.
BUILTIN_ENTITIES: dict[str, str] = {
    "EMAIL": "e-mail address",
    "PHONE": "phone number (NANP, E.164 '+CC …', trunk-prefix national, CN mobile)",
    "US_SSN": "US social security number (SSA rules)",
    "CREDIT_CARD": "payment card number (issuer range + Luhn)",
    "IBAN": "international bank account number (country length + mod-97)",
    "IP_ADDRESS": "IPv4 / IPv6 address, optionally with /prefix",
    "OPENAI_KEY": "OpenAI API key (sk-…, sk-proj-…, sk-svcacct-…, sk-admin-…)",
    "ANTHROPIC_KEY": "Anthropic API key (sk-ant-api03-…)",
    "ANTHROPIC_ADMIN_KEY": "Anthropic admin key (sk-ant-admin01-…)",
    "AWS_ACCESS_KEY": "AWS access key id (AKIA…, ASIA…, ABIA…, ACCA…, A3T…)",
    "AWS_SECRET_KEY": "AWS secret access key (40 chars, next to an aws/secret word)",
    "AWS_BEDROCK_KEY": "Amazon Bedrock API key (ABSK…, bedrock-api-key-…)",
    "GITHUB_TOKEN": "GitHub token (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_)",
    "SLACK_TOKEN": "Slack token (xoxb-, xoxp-, xoxa-, xoxe-, xoxo-, xoxr-, xoxs-, xapp-)",
    "SLACK_WEBHOOK": "Slack incoming-webhook / workflow URL",
    "GOOGLE_API_KEY": "Google API key (AIza…)",
    "HUGGINGFACE_TOKEN": "Hugging Face token (hf_…, api_org_…)",
    "PERPLEXITY_KEY": "Perplexity API key (pplx-…)",
    "PRIVATE_KEY": "PEM / PGP private key block",
    "JWT": "JSON Web Token (base64url JSON header.payload[.signature])",
    "STRIPE_KEY": "Stripe secret / restricted key (sk_live_…, rk_live_…, sk_test_…)",
    "GITLAB_TOKEN": "GitLab personal access token (glpat-…)",
    "NPM_TOKEN": "npm access token (npm_…)",
    "PYPI_TOKEN": "PyPI upload token (pypi-Ag…)",
    "SENDGRID_KEY": "SendGrid API key (SG.….…)",
    "BEARER_TOKEN": "opaque token after 'Bearer ' (Authorization values pasted into text)",
    "PASSWORD": "password in a URL (scheme://user:PASSWORD@host) or a quoted value assigned "
                "to a password/secret/token/api_key key; unquoted only in UPPER_CASE env lines",
}

SECTION_KEYS = {"enabled", "on_unparseable", "max_body_bytes", "hmac_key_env", "default_strategy",
                "entities", "custom", "allow", "headers_pass"}
# Headers left alone by masking (both directions): HTTP framing and protocol negotiation,
# whose values are fixed vocabularies, and which masking must not break. Every other header
# value is masked. Credentials (CREDENTIAL_HEADERS) are never masked either: identity reads
# them before masking and the credentials step removes them after it.
DEFAULT_HEADERS_PASS: tuple[str, ...] = (
    "host", "content-type", "content-length", "content-encoding", "transfer-encoding",
    "connection", "keep-alive", "te", "trailer", "upgrade", "accept", "accept-encoding",
    "accept-language", "accept-charset", "user-agent", "cache-control", "pragma", "expect",
    "openai-beta", "openai-version", "anthropic-version", "anthropic-beta", "x-stainless-lang",
    "x-stainless-package-version", "x-stainless-os", "x-stainless-arch",
    "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-retry-count",
    "x-stainless-async", "x-stainless-timeout", "x-stainless-read-timeout", "date", "vary",
    "etag", "last-modified", "server", "content-language", "retry-after",
)
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "cookie")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
ENTITY_KEYS = {"enabled", "strategy"}
CUSTOM_KEYS = {"name", "pattern", "validator", "context", "context_window", "ignore_case",
               "max_length", "strategy", "enabled"}
_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{0,39}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFAULT_MAX_BODY = 16 * 1024 * 1024
CUSTOM_MAX_LENGTH_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class EntityConfig:
    enabled: bool = True
    strategy: str = "placeholder"


@dataclass(frozen=True, slots=True)
class CustomDetector:
    """A rules-defined detector. `pattern` is kept as text; detectors compile it."""

    name: str
    pattern: str
    validator: str = "none"
    context: tuple[str, ...] = ()
    context_window: int = 40
    ignore_case: bool = False
    max_length: int = 128
    strategy: str = "placeholder"
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class MaskingConfig:
    enabled: bool = True
    on_unparseable: str = "refuse"
    max_body_bytes: int = DEFAULT_MAX_BODY
    hmac_key_env: str | None = None
    default_strategy: str = "placeholder"
    # entity name -> settings; built-ins not listed use (enabled, default_strategy)
    entities: dict[str, EntityConfig] = field(default_factory=dict)
    custom: tuple[CustomDetector, ...] = ()
    allow: tuple[str, ...] = ()
    # lower-case header names never masked (defaults + the rules' headers_pass)
    headers_pass: frozenset[str] = frozenset(DEFAULT_HEADERS_PASS + CREDENTIAL_HEADERS)

    def __hash__(self) -> int:  # the dict field is never mutated after parsing
        return hash((self.enabled, self.on_unparseable, self.max_body_bytes, self.hmac_key_env,
                     self.default_strategy, tuple(sorted(self.entities.items())), self.custom,
                     self.allow, self.headers_pass))

    def entity(self, name: str) -> EntityConfig:
        """Settings of a built-in or custom entity (defaults for unknown names)."""
        ec = self.entities.get(name)
        if ec is not None:
            return ec
        for c in self.custom:
            if c.name == name:
                return EntityConfig(c.enabled, c.strategy)
        return EntityConfig(True, self.default_strategy)

    def strategy_for(self, name: str) -> str:
        return self.entity(name).strategy

    def enabled_builtins(self) -> tuple[str, ...]:
        return tuple(n for n in BUILTIN_ENTITIES if self.entity(n).enabled)

    def hmac_key(self) -> bytes | None:
        """The `hash` strategy's key from the environment (None when unset or empty)."""
        if not self.hmac_key_env:
            return None
        value = os.environ.get(self.hmac_key_env)
        return value.encode("utf-8") if value else None

    def describe(self) -> str:
        if not self.enabled:
            return "masking off"
        on = self.enabled_builtins()
        off = len(BUILTIN_ENTITIES) - len(on)
        counts: dict[str, int] = {}
        for n in on:
            s = self.strategy_for(n)
            counts[s] = counts.get(s, 0) + 1
        for c in self.custom:
            if c.enabled:
                counts[c.strategy] = counts.get(c.strategy, 0) + 1
        strat = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        parts = [f"masking on: {len(on)} built-in detectors" + (f" ({off} off)" if off else ""),
                 f"{sum(c.enabled for c in self.custom)} custom", f"strategies: {strat}",
                 f"unparseable bodies: {self.on_unparseable}"]
        if self.allow:
            parts.append(f"{len(self.allow)} allow patterns")
        return "; ".join(parts)


def _expect_choice(value: Any, where: Where, choices: tuple[str, ...]) -> str:
    text = expect_str(value, where)
    if text not in choices:
        raise where.error(f"must be one of {', '.join(choices)}, got {text!r}")
    return text


def compile_user_regex(text: str, where: Where, *, ignore_case: bool = False) -> regex.Pattern:
    """Compile a rules regex with the detectors' engine; ConfigError on a bad one."""
    flags = regex.V0 | (regex.IGNORECASE if ignore_case else 0)
    try:
        pat = regex.compile(text, flags)
    except (regex.error, ValueError, OverflowError) as e:
        raise where.error(f"invalid regular expression: {e}") from None
    if pat.match("") is not None:
        raise where.error("pattern matches the empty string")
    return pat


def _parse_entity(raw: Any, where: Where, default_strategy: str) -> EntityConfig:
    if isinstance(raw, str):
        return EntityConfig(True, _expect_choice(raw, where, STRATEGIES))
    if isinstance(raw, bool):
        return EntityConfig(raw, default_strategy)
    d = expect_map(raw, where, ENTITY_KEYS)
    enabled = expect_bool(d.get("enabled", True), where.child("enabled"))
    strategy = default_strategy
    if "strategy" in d:
        strategy = _expect_choice(d["strategy"], where.child("strategy"), STRATEGIES)
    return EntityConfig(enabled, strategy)


def _parse_custom(raw: Any, where: Where, default_strategy: str) -> CustomDetector:
    d = expect_map(raw, where, CUSTOM_KEYS, required=("name", "pattern"))
    name = expect_str(d["name"], where.child("name"))
    if not _NAME_RE.fullmatch(name):
        raise where.child("name").error(
            "use UPPER_CASE letters, digits and '_' (it becomes the placeholder [NAME_1])")
    if name in BUILTIN_ENTITIES:
        raise where.child("name").error(f"{name} is a built-in entity; configure it under "
                                        "masking.entities instead")
    ignore_case = expect_bool(d.get("ignore_case", False), where.child("ignore_case"))
    pattern = expect_str(d["pattern"], where.child("pattern"))
    compile_user_regex(pattern, where.child("pattern"), ignore_case=ignore_case)
    validator = _expect_choice(d.get("validator", "none"), where.child("validator"), VALIDATORS)
    context: tuple[str, ...] = ()
    if d.get("context") is not None:
        context = tuple(w.lower() for w in expect_str_list(d["context"], where.child("context")))
    window = expect_int(d.get("context_window", 40), where.child("context_window"),
                        minimum=1, maximum=1000)
    max_length = expect_int(d.get("max_length", 128), where.child("max_length"),
                            minimum=1, maximum=CUSTOM_MAX_LENGTH_LIMIT)
    strategy = default_strategy
    if "strategy" in d:
        strategy = _expect_choice(d["strategy"], where.child("strategy"), STRATEGIES)
    enabled = expect_bool(d.get("enabled", True), where.child("enabled"))
    return CustomDetector(name=name, pattern=pattern, validator=validator, context=context,
                          context_window=window, ignore_case=ignore_case,
                          max_length=max_length, strategy=strategy, enabled=enabled)


def parse_masking(section: MapSection) -> MaskingConfig:
    where = section.where()
    d = expect_map(section.data, where, SECTION_KEYS)
    enabled = expect_bool(d.get("enabled", True), section.where("enabled"))
    on_unparseable = _expect_choice(d.get("on_unparseable", "refuse"),
                                    section.where("on_unparseable"), UNPARSEABLE)
    max_body = expect_int(d.get("max_body_bytes", DEFAULT_MAX_BODY),
                          section.where("max_body_bytes"), minimum=1024)
    hmac_env = d.get("hmac_key_env")
    if hmac_env is not None:
        hmac_env = expect_str(hmac_env, section.where("hmac_key_env"))
        if not _ENV_RE.fullmatch(hmac_env):
            raise section.where("hmac_key_env").error(
                f"not an environment variable name: {hmac_env!r} (name the variable that "
                "holds the key, never the key itself)")
    default_strategy = _expect_choice(d.get("default_strategy", "placeholder"),
                                      section.where("default_strategy"), STRATEGIES)

    custom: list[CustomDetector] = []
    if d.get("custom") is not None:
        cw = section.where("custom")
        if not isinstance(d["custom"], list):
            raise cw.error(f"expected a list, got {type(d['custom']).__name__}")
        seen: set[str] = set()
        for i, raw in enumerate(d["custom"]):
            c = _parse_custom(raw, cw.child(i), default_strategy)
            if c.name in seen:
                raise cw.child(i).child("name").error(f"custom detector {c.name} defined twice")
            seen.add(c.name)
            custom.append(c)
    custom_names = {c.name for c in custom}

    entities: dict[str, EntityConfig] = {}
    if d.get("entities") is not None:
        ew = section.where("entities")
        for name, raw in expect_map(d["entities"], ew).items():
            if name in custom_names:
                raise ew.child(name).error("custom detectors set enabled/strategy in their own "
                                           "entry under masking.custom")
            if name not in BUILTIN_ENTITIES:
                raise ew.child(name).error(
                    f"unknown entity (known: {', '.join(BUILTIN_ENTITIES)})")
            entities[name] = _parse_entity(raw, ew.child(name), default_strategy)
    for name in BUILTIN_ENTITIES:
        entities.setdefault(name, EntityConfig(True, default_strategy))

    allow: list[str] = []
    if d.get("allow") is not None:
        aw = section.where("allow")
        for i, pat in enumerate(expect_str_list(d["allow"], aw)):
            compile_user_regex(pat, aw.child(i))
            allow.append(pat)

    passed = set(DEFAULT_HEADERS_PASS + CREDENTIAL_HEADERS)
    if d.get("headers_pass") is not None:
        hw = section.where("headers_pass")
        for i, name in enumerate(expect_str_list(d["headers_pass"], hw)):
            if not _HEADER_NAME_RE.fullmatch(name):
                raise hw.child(i).error(f"not a header name: {name!r}")
            passed.add(name.lower())

    cfg = MaskingConfig(enabled=enabled, on_unparseable=on_unparseable, max_body_bytes=max_body,
                        hmac_key_env=hmac_env, default_strategy=default_strategy,
                        entities=entities, custom=tuple(custom), allow=tuple(allow),
                        headers_pass=frozenset(passed))
    if not hmac_env:
        # name the first setting that asks for `hash`, in the file that sets it
        users = [(section.where("entities").child(n), n) for n in BUILTIN_ENTITIES
                 if cfg.entity(n).enabled and cfg.strategy_for(n) == "hash"
                 and n in (d.get("entities") or {})]
        users += [(section.where("custom").child(i), c.name) for i, c in enumerate(custom)
                  if c.strategy == "hash"]
        if not users and default_strategy == "hash":
            users = [(section.where("default_strategy"), "default_strategy")]
        if users:
            w, name = users[0]
            raise w.error(f"{name} uses the hash strategy, which needs masking.hmac_key_env "
                          "(the environment variable holding its key)")
    return cfg
