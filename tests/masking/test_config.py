"""The `masking` rules section: typed config, and errors naming file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.masking.config import BUILTIN_ENTITIES, MaskingConfig
from addons.masking.detectors import DetectorSet

ROOT = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, masking_yaml: str):
    (tmp_path / "masking.yaml").write_text("masking:\n" + masking_yaml)
    return load_rules(tmp_path).masking


def error(tmp_path: Path, masking_yaml: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, masking_yaml)
    return ei.value


def test_defaults(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    cfg = load_rules(tmp_path).masking
    assert isinstance(cfg, MaskingConfig)
    assert cfg.enabled and cfg.on_unparseable == "refuse" and cfg.hmac_key_env is None
    assert cfg.enabled_builtins() == tuple(BUILTIN_ENTITIES)
    assert all(cfg.strategy_for(n) == "placeholder" for n in BUILTIN_ENTITIES)
    assert cfg.describe().startswith("masking on: 27 built-in detectors")
    hash(cfg)


def test_repository_rules_load() -> None:
    assert isinstance(load_rules(ROOT / "rules").masking, MaskingConfig)


def test_full_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(tmp_path, r"""
  on_unparseable: pass_text
  max_body_bytes: 2097152
  hmac_key_env: MASK_KEY
  default_strategy: redact
  entities:
    EMAIL: placeholder
    CREDIT_CARD: {strategy: partial}
    IP_ADDRESS: {enabled: false}
    US_SSN: {strategy: hash}
    PHONE: false
  allow: ['support@example\.com']
  custom:
    - name: EMPLOYEE_ID
      pattern: 'EMP-\d{6}'
      context: [Employee, staff]
      context_window: 30
      strategy: placeholder
    - name: ACCOUNT_NO
      pattern: '\b\d{12}\b'
      validator: luhn
      max_length: 12
""")
    assert cfg.on_unparseable == "pass_text" and cfg.max_body_bytes == 2097152
    assert cfg.strategy_for("EMAIL") == "placeholder"
    assert cfg.strategy_for("CREDIT_CARD") == "partial"
    assert cfg.strategy_for("JWT") == "redact"          # default_strategy
    assert cfg.strategy_for("US_SSN") == "hash"
    assert not cfg.entity("IP_ADDRESS").enabled and not cfg.entity("PHONE").enabled
    assert [c.name for c in cfg.custom] == ["EMPLOYEE_ID", "ACCOUNT_NO"]
    assert cfg.custom[0].context == ("employee", "staff")
    assert cfg.custom[1].validator == "luhn" and cfg.custom[1].strategy == "redact"
    assert cfg.strategy_for("ACCOUNT_NO") == "redact"
    d = cfg.describe()
    assert "25 built-in detectors (2 off)" in d and "2 custom" in d and "pass_text" in d
    monkeypatch.setenv("MASK_KEY", "k3y")
    assert cfg.hmac_key() == b"k3y"
    monkeypatch.delenv("MASK_KEY")
    assert cfg.hmac_key() is None
    ds = DetectorSet(cfg)
    assert [f.entity for f in ds.find("Employee EMP-123456, 10.0.0.1")] == ["EMPLOYEE_ID"]
    assert ds.find("mail support@example.com") == []


@pytest.mark.parametrize("yaml_text,key,reason", [
    ("  enabled: yes-please\n", "masking.enabled", "expected true or false"),
    ("  on_unparseable: ignore\n", "masking.on_unparseable", "must be one of refuse, pass_text"),
    ("  default_strategy: scramble\n", "masking.default_strategy", "must be one of"),
    ("  max_body_bytes: 10\n", "masking.max_body_bytes", "must be >= 1024"),
    ("  hmac_key_env: 'not a var'\n", "masking.hmac_key_env", "not an environment variable"),
    ("  entities:\n    EMIAL: redact\n", "masking.entities.EMIAL", "unknown entity"),
    ("  entities:\n    EMAIL: {strategy: shred}\n", "masking.entities.EMAIL.strategy",
     "must be one of placeholder, redact, partial, hash"),
    ("  entities:\n    EMAIL: {color: red}\n", "masking.entities.EMAIL.color", "unknown key"),
    ("  entities:\n    US_SSN: hash\n", "masking.entities.US_SSN", "needs masking.hmac_key_env"),
    ("  default_strategy: hash\n", "masking.default_strategy", "needs masking.hmac_key_env"),
    ("  custom:\n    - {name: X1, pattern: 'ab', strategy: hash}\n", "masking.custom[0]",
     "needs masking.hmac_key_env"),
    ("  custom:\n    - {name: X1, pattern: 'a(b'}\n", "masking.custom[0].pattern",
     "invalid regular expression"),
    ("  custom:\n    - {name: X1, pattern: 'a*'}\n", "masking.custom[0].pattern",
     "matches the empty string"),
    ("  custom:\n    - {name: X1, pattern: 'ab', validator: crc32}\n",
     "masking.custom[0].validator", "must be one of none, luhn, mod97"),
    ("  custom:\n    - {name: lower, pattern: 'ab'}\n", "masking.custom[0].name", "UPPER_CASE"),
    ("  custom:\n    - {name: EMAIL, pattern: 'ab'}\n", "masking.custom[0].name", "built-in"),
    ("  custom:\n    - {name: X1, pattern: 'ab'}\n    - {name: X1, pattern: 'cd'}\n",
     "masking.custom[1].name", "defined twice"),
    ("  custom:\n    - {pattern: 'ab'}\n", "masking.custom[0].name", "required key"),
    ("  custom:\n    - {name: X1, pattern: 'ab', max_length: 0}\n",
     "masking.custom[0].max_length", "must be >= 1"),
    ("  custom: {name: X1}\n", "masking.custom", "expected a list"),
    ("  allow: ['(']\n", "masking.allow[0]", "invalid regular expression"),
    ("  colour: blue\n", "masking.colour", "unknown key"),
])
def test_errors_name_file_key_and_reason(tmp_path: Path, yaml_text: str, key: str,
                                         reason: str) -> None:
    e = error(tmp_path, yaml_text)
    assert e.file.endswith("masking.yaml")
    assert e.key == key
    assert reason in e.reason


def test_key_set_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("masking:\n  enabled: true\n")
    (tmp_path / "b.yaml").write_text("masking:\n  enabled: false\n")
    with pytest.raises(ConfigError) as ei:
        load_rules(tmp_path)
    assert ei.value.key == "masking.enabled"


def test_sections_across_files_merge(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("masking:\n  entities: {EMAIL: redact}\n")
    (tmp_path / "b.yaml").write_text("masking:\n  hmac_key_env: K\n  default_strategy: hash\n")
    cfg = load_rules(tmp_path).masking
    assert cfg.strategy_for("EMAIL") == "redact" and cfg.strategy_for("PHONE") == "hash"


def test_config_is_immutable() -> None:
    cfg = MaskingConfig()
    with pytest.raises(AttributeError):
        cfg.enabled = False  # type: ignore[misc]
