"""axserving.config: precedence, validation messages, and the documented YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from axserving.config import DEFAULT_CONFIG_FILE, ConfigError, Settings, check, load_settings


def test_documented_yaml_matches_builtin_defaults() -> None:
    assert load_settings(env={}, config_path=str(DEFAULT_CONFIG_FILE)) == Settings()


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("rest:\n  port: 1111\n  host: 0.0.0.0\nscheduler:\n  max_queue: 7\n")
    s = load_settings(env={"AXS_CONFIG": str(cfg)})
    assert (s.rest.port, s.rest.host, s.scheduler.max_queue) == (1111, "0.0.0.0", 7)
    s = load_settings(env={"AXS_CONFIG": str(cfg), "AXS_REST_PORT": "2222"})
    assert s.rest.port == 2222 and s.rest.host == "0.0.0.0"
    s = load_settings({"rest.port": 3333}, env={"AXS_CONFIG": str(cfg), "AXS_REST_PORT": "2222"})
    assert s.rest.port == 3333
    s = load_settings({"rest.port": 4444}, env={"AXS_CONFIG": "/nonexistent"}, config_path=str(cfg))
    assert s.rest.port == 4444 and s.scheduler.max_queue == 7


def test_api_keys_from_env_only() -> None:
    s = load_settings(env={"AXS_API_KEY": " a, b ,,c"})
    assert s.api_keys == ("a", "b", "c")


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"AXS_REST_PORT": "http"}, ["rest.port", "'http'", "$AXS_REST_PORT"]),
        ({"AXS_REST_PORT": "70000"}, ["rest.port", "<= 65535"]),
        ({"AXS_BACKEND": "vllm"}, ["model_defaults.backend", "'vllm'", "$AXS_BACKEND"]),
        ({"AXS_ALLOW_NO_AUTH": "perhaps"}, ["auth.allow_no_auth", "'perhaps'"]),
        ({"AXS_MODEL_ID": "has space"}, ["models.0.id", "'has space'", "$AXS_MODEL_ID"]),
        ({"AXS_LOG": "loud"}, ["logging.level", "'loud'"]),
    ],
)
def test_bad_values_name_key_value_and_source(env: dict[str, str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    for needle in needles:
        assert needle in str(info.value)


def test_unknown_key_and_bad_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("rest:\n  prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(env={}, config_path=str(cfg))
    cfg.write_text("rest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(env={}, config_path=str(cfg))
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={}, config_path=str(tmp_path / "missing.yaml"))


def test_step_budget_from_env_and_cli() -> None:
    from axserving.cli import _cli_overrides, build_parser

    assert load_settings(env={"AXS_BATCH_SIZE": "128"}).model_defaults.batch_size == 128
    args = build_parser().parse_args(["run", "--batch-size", "64"])
    assert load_settings(_cli_overrides(args), env={"AXS_BATCH_SIZE": "128"}).model_defaults.batch_size == 64
    with pytest.raises(ConfigError, match="batch_size"):
        load_settings(env={"AXS_BATCH_SIZE": "0"})


def test_prefill_slowdown_from_file_env_and_cli(tmp_path: Path) -> None:
    from axserving.cli import _cli_overrides, build_parser

    assert load_settings(env={}).model_defaults.prefill_slowdown == 4.0
    assert load_settings(env={"AXS_PREFILL_SLOWDOWN": "0"}).model_defaults.prefill_slowdown == 0.0
    args = build_parser().parse_args(["run", "--prefill-slowdown", "2.5"])
    settings = load_settings(_cli_overrides(args), env={"AXS_PREFILL_SLOWDOWN": "8"})
    assert settings.model_defaults.prefill_slowdown == 2.5
    for bad in ("0.5", "-1", "fast"):  # 0 is off; between 0 and 1 a prompt step could not be slower
        with pytest.raises(ConfigError, match="prefill_slowdown"):
            check(load_settings(env={"AXS_PREFILL_SLOWDOWN": bad}))
    assert load_settings(env={}).model_defaults.prefill_stall_ms == 500
    args = build_parser().parse_args(["run", "--prefill-stall-ms", "200"])
    assert load_settings(_cli_overrides(args), env={"AXS_PREFILL_STALL_MS": "0"}).model_defaults.prefill_stall_ms == 200
    assert load_settings(env={"AXS_PREFILL_STALL_MS": "0"}).model_defaults.prefill_stall_ms == 0
    with pytest.raises(ConfigError, match="prefill_stall_ms"):
        load_settings(env={"AXS_PREFILL_STALL_MS": "-5"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - id: a\n    path: fake://echo\n    prefill_slowdown: 0.9\n")
    with pytest.raises(ConfigError, match="models.0.prefill_slowdown = 0.9"):
        check(load_settings(env={}, config_path=str(cfg)))


def test_flash_attn_from_file_env_and_cli(tmp_path: Path) -> None:
    from axserving.cli import _cli_overrides, build_parser

    assert load_settings(env={}).model_defaults.flash_attn == "auto"
    for raw, want in (("on", True), ("true", True), ("off", False), ("0", False), ("AUTO", "auto")):
        assert load_settings(env={"AXS_FLASH_ATTN": raw}).model_defaults.flash_attn == want
    args = build_parser().parse_args(["run", "--flash-attn", "on"])
    assert load_settings(_cli_overrides(args), env={"AXS_FLASH_ATTN": "auto"}).model_defaults.flash_attn is True
    with pytest.raises(ConfigError, match="flash_attn = 'sometimes'"):
        load_settings(env={"AXS_FLASH_ATTN": "sometimes"})
    cfg = tmp_path / "c.yaml"
    # YAML reads on/off as booleans, and "auto" as itself.
    cfg.write_text("model_defaults:\n  flash_attn: on\nmodels:\n  - id: a\n    path: fake://echo\n    flash_attn: auto\n")
    settings = load_settings(config_path=str(cfg), env={})
    assert settings.model_defaults.flash_attn is True and settings.models[0].flash_attn == "auto"


def test_draft_tokens_from_file_env_and_cli(tmp_path: Path) -> None:
    from axserving.cli import _cli_overrides, build_parser

    assert load_settings(env={}).model_defaults.draft_tokens == 0
    assert load_settings(env={"AXS_DRAFT_TOKENS": "6"}).model_defaults.draft_tokens == 6
    args = build_parser().parse_args(["run", "--draft-tokens", "4"])
    assert load_settings(_cli_overrides(args), env={"AXS_DRAFT_TOKENS": "6"}).model_defaults.draft_tokens == 4
    for bad in ("-1", "33", "many"):
        with pytest.raises(ConfigError, match="draft_tokens"):
            load_settings(env={"AXS_DRAFT_TOKENS": bad})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - id: a\n    path: fake://echo\n    draft_tokens: 3\n")
    assert load_settings(config_path=str(cfg), env={}).models[0].draft_tokens == 3
