"""Settings: sources and their order, validation to one line, derived values."""

from __future__ import annotations

import pytest

from app import config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith("AGENTD_") or name in ("OPENAI_BASE_URL", "OPENAI_API_KEY",
                                                   "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_contract():
    s = config.load()
    assert (s.bind, s.shutdown_timeout, s.web_workers, s.agent_workers) == (
        "127.0.0.1:8000", 30.0, 1, 1)
    assert (s.run_timeout, s.agent_max_iterations, s.max_concurrent_runs, s.max_queued_runs) == (
        120.0, 10, 50, 1000)
    assert (s.llm_timeout, s.llm_max_retries, s.llm_max_connections) == (60.0, 3, 100)
    assert (s.cache_ttl, s.cache_default, s.log_level, s.log_format) == (3600.0, "off", "info",
                                                                       "auto")
    assert s.reserve == 5.0 and s.embedding_device == "auto" and not s.llm_configured
    assert "calculator" in s.system_prompt


def test_reserve_defaults_to_a_third_of_a_short_timeout(monkeypatch):
    monkeypatch.setenv("AGENTD_SHUTDOWN_TIMEOUT", "6")
    assert config.load().reserve == 2.0


@pytest.mark.parametrize(("name", "value"), [
    ("AGENTD_SHUTDOWN_TIMEOUT", "abc"), ("AGENTD_SHUTDOWN_TIMEOUT", "-1"),
    ("AGENTD_WEB_WORKERS", "0"), ("AGENTD_LOG_LEVEL", "loud"), ("AGENTD_BIND", "nowhere"),
    ("AGENTD_RATE_LIMIT", "fast"), ("AGENTD_TRUSTED_PROXIES", "banana"),
    ("AGENTD_EMBEDDING_DEVICE", "tpu"), ("AGENTD_CACHE_DEFAULT", "maybe"),
    ("AGENTD_LLM_TEMPERATURE", "3"), ("AGENTD_SHUTDOWN_RESERVE", "40"),
    ("AGENTD_SYSTEM_PROMPT", "@/no/such/file"), ("AGENTD_MAX_MESSAGE_CHARS", "40000"),
])
def test_a_bad_value_is_one_line_naming_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError) as e:
        config.load()
    message = str(e.value)
    assert name in message and "\n" not in message


def test_a_public_bind_without_auth_is_refused_and_allowed_with_keys(monkeypatch):
    monkeypatch.setenv("AGENTD_BIND", "0.0.0.0:8000")
    with pytest.raises(config.ConfigError, match="AGENTD_API_KEYS"):
        config.load()
    monkeypatch.setenv("AGENTD_API_KEYS", "a,b")
    assert config.load().api_keys == ["a", "b"]


def test_environment_beats_dotenv_beats_the_config_file(monkeypatch, tmp_path):
    (tmp_path / "agentd.toml").write_text(
        "run_timeout = 10\nllm_timeout = 11\nllm_max_retries = 7\n")
    (tmp_path / ".env").write_text("AGENTD_RUN_TIMEOUT=20\nAGENTD_LLM_TIMEOUT=21\n")
    monkeypatch.setenv("AGENTD_RUN_TIMEOUT", "30")
    s = config.load(tmp_path / "agentd.toml")
    assert (s.run_timeout, s.llm_timeout, s.llm_max_retries) == (30.0, 21.0, 7)


@pytest.mark.parametrize(("text", "expected"), [
    ("run_timeout = [", "not valid TOML"), ("no_such_setting = 1", "unknown setting"),
    ('run_timeout = "soon"', "AGENTD_RUN_TIMEOUT"),
])
def test_a_bad_config_file_is_one_line(tmp_path, text, expected):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(config.ConfigError, match=expected):
        config.load(tmp_path / "bad.toml")


def test_a_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_secrets_come_from_the_credentials_directory(monkeypatch, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "AGENTD_API_KEYS").write_text("from-file\n")
    (creds / "AGENTD_LLM_API_KEY").write_text("sk-file")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = config.load()
    assert s.api_keys == ["from-file"] and s.llm_api_key == "sk-file" and s.llm_configured
    monkeypatch.setenv("AGENTD_LLM_API_KEY", "sk-env")
    assert config.load().llm_api_key == "sk-env"  # the environment still wins


def test_openai_variables_are_honoured_when_ours_are_unset(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://llm.example/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    s = config.load()
    assert s.llm_base_url == "http://llm.example/v1" and s.llm_api_key == "sk-x"


def test_the_system_prompt_may_come_from_a_file(monkeypatch, tmp_path):
    (tmp_path / "prompt.txt").write_text("Be brief.")
    monkeypatch.setenv("AGENTD_SYSTEM_PROMPT", f"@{tmp_path / 'prompt.txt'}")
    assert config.load().system_prompt == "Be brief."


def test_rates_parse():
    assert config.parse_rate("120/minute") == (120, 60.0)
    assert config.parse_rate("5/s") == (5, 1.0)


def test_llm_settings_work_from_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('llm_base_url = "http://x/v1"\nllm_api_key = "k"\n')
    s = config.load(tmp_path / "c.toml")
    assert s.llm_base_url == "http://x/v1" and s.llm_api_key == "k"
