"""The configuration loader: the example, defaults, durations, secrets, paths and the invalid corpus."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest

from watcher.config import (
    DEFAULT_TRACK,
    CampaignsConfig,
    Config,
    LeadsConfig,
    LogConfig,
    MetricsConfig,
    SinkConfig,
    StateConfig,
    load_config,
    parse_duration,
)
from watcher.errors import ConfigError
from watcher.events import EVENT_TYPES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
CORPUS_DIR = Path(__file__).resolve().parent / "invalid_configs"

# The environment tests/invalid_configs/README.md documents; CORPUS_UNSET is deliberately absent.
CORPUS_ENVIRON = {
    "CORPUS_PASSWORD": "corpus-env-password-4d2b",
    "CORPUS_WEBHOOK_SECRET": "whsec_Y29ycHVzLXdlYmhvb2sta2V5LTMyLWJ5dGVzLWxvbmc=",
    "CORPUS_SLACK_URL": "https://hooks.slack.com/services/TCORPUS/BCORPUS/corpus-env-slack",
    "CORPUS_EMPTY": "",
}

KEY_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes
KEY_B = "whsec_Y29ycHVzLXdlYmhvb2sta2V5LTMyLWJ5dGVzLWxvbmc="  # 32 bytes

EXAMPLE_ENVIRON = {
    "CONVERTR_PASSWORD": "example-password-51f0",
    "CRM_WEBHOOK_SECRET": f"{KEY_A} {KEY_B}",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/TEX/BEX/example-slack-token",
}

MINIMAL = """
[convertr]
base_url = "https://acme.cvtr.io/"
username = "api@acme.example"
password = "literal-password-0a9c"

[state]
path = "state.db"
"""


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ example file


def test_example_config_loads() -> None:
    """config.example.toml loads once the variables it names are set."""
    config = load_config(EXAMPLE, EXAMPLE_ENVIRON)
    assert config.path == EXAMPLE
    assert config.convertr.base_url == "https://acme.cvtr.io"
    assert config.convertr.password == "example-password-51f0"
    assert config.state.path == ROOT / "state.db"
    crm, slack = config.sinks
    assert (crm.name, crm.type, crm.secrets) == ("crm", "webhook", (KEY_A, KEY_B))
    assert (slack.name, slack.type) == ("sales-channel", "slack")
    assert slack.url == EXAMPLE_ENVIRON["SLACK_WEBHOOK_URL"]
    assert slack.events == frozenset({"campaign.status_changed"})
    assert config.sink("crm") is crm
    for value in (*EXAMPLE_ENVIRON.values(), KEY_A, KEY_B):
        if " " not in value:
            assert value in config.secret_values()


def test_example_documents_every_key() -> None:
    """Every key the loader accepts appears in the example, set or commented out."""
    text = EXAMPLE.read_text()
    keys = {
        "base_url", "username", "password", "password_env", "password_file", "items_per_page", "timeout",
        "timezone", "max_in_flight", "request_budget", "path", "delivered_retention", "attempt_log_retention",
        "enabled", "interval", "lookback", "updates", "campaign_ids", "start", "track", "recheck_window",
        "recheck_interval", "snapshot_retention", "safety_lag", "name", "type", "url", "url_env", "url_file", "lease",
        "secret", "secret_env", "secret_file", "events", "retry_schedule", "max_age", "include_pii",
        "concurrency", "listen", "level", "format",
    }  # fmt: skip
    for key in keys:
        assert re.search(rf"^#? ?{key} = |\b{key}\b", text, re.M), key
    for table in ("[convertr]", "[state]", "[leads]", "[campaigns]", "[metrics]", "[log]", "[[sinks]]"):
        assert table in text


def test_example_needs_its_variables() -> None:
    """Without CONVERTR_PASSWORD the example names the variable, not a value."""
    environ = {k: v for k, v in EXAMPLE_ENVIRON.items() if k != "CONVERTR_PASSWORD"}
    with pytest.raises(ConfigError, match=r"^convertr\.password_env: environment variable CONVERTR_PASSWORD"):
        load_config(EXAMPLE, environ)


# ------------------------------------------------------------------------------------------ defaults


def test_defaults(tmp_path: Path) -> None:
    """A minimal file gets every documented default."""
    text = (
        MINIMAL
        + f"""
[[sinks]]
name = "crm"
type = "webhook"
url = "https://hooks.example.com/in"
secret = "{KEY_A}"

[[sinks]]
name = "chat"
type = "slack"
url = "https://hooks.slack.com/services/T/B/literal-slack-token"
"""
    )
    config = load_config(write(tmp_path, text), {})
    c = config.convertr
    assert c.base_url == "https://acme.cvtr.io"
    assert (c.items_per_page, c.timeout, c.timezone, c.max_in_flight, c.request_budget) == (
        100, 30.0, "auto", 4, 2000,
    )  # fmt: skip
    assert config.state == StateConfig(tmp_path / "state.db", 7 * 86400.0, 14 * 86400.0)
    assert config.leads == LeadsConfig()
    assert (config.leads.interval, config.leads.lookback, config.leads.start) == (60.0, 600.0, None)
    assert (config.leads.recheck_window, config.leads.recheck_interval) == (7 * 86400.0, 900.0)
    assert (config.leads.snapshot_retention, config.leads.safety_lag) == (90 * 86400.0, 2.0)
    assert config.leads.track == DEFAULT_TRACK and len(DEFAULT_TRACK) == 23
    assert config.campaigns == CampaignsConfig(enabled=True, interval=300.0)
    assert config.metrics == MetricsConfig(listen=None)
    assert config.log == LogConfig(level="info", format="auto")
    crm, chat = config.sinks
    assert crm.events == chat.events == frozenset(EVENT_TYPES)
    assert crm.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    assert (crm.timeout, crm.max_age, crm.campaign_ids, crm.enabled) == (15.0, 3 * 86400.0, (), True)
    assert (crm.include_pii, crm.concurrency) == (True, 8)
    assert (chat.include_pii, chat.concurrency, chat.secrets) == (False, 1, ())
    # A record built by hand defaults exactly as a loaded one: every default has one home.
    assert crm == SinkConfig(name="crm", type="webhook", url=crm.url, secrets=crm.secrets)
    assert chat == SinkConfig(name="chat", type="slack", url=chat.url, url_is_secret=chat.url_is_secret)


@pytest.mark.parametrize(
    ("kind", "include_pii", "concurrency"),
    [
        # A hand-built Slack record used to get the webhook defaults: personal data in a channel.
        ("slack", False, 1),
        ("webhook", True, 8),
    ],
)
def test_sink_defaults_follow_the_type(kind: Literal["webhook", "slack"], include_pii: bool, concurrency: int) -> None:
    """include_pii and concurrency default by type in a hand-built record; given values are kept."""
    sink = SinkConfig(name="s", type=kind, url="https://example.com/")
    assert (sink.include_pii, sink.concurrency) == (include_pii, concurrency)
    given = SinkConfig(name="s", type=kind, url="https://example.com/", include_pii=not include_pii, concurrency=2)
    assert (given.include_pii, given.concurrency) == (not include_pii, 2)


def test_secret_values_and_repr(tmp_path: Path) -> None:
    """The redactor gets the password, Slack URLs, URLs given as secrets and keys; reprs hide them all."""
    text = (
        MINIMAL
        + f"""
[[sinks]]
name = "plain"
type = "webhook"
url = "https://hooks.example.com/plain-literal"
secret = "{KEY_A}"

[[sinks]]
name = "hidden"
type = "webhook"
url_env = "HIDDEN_URL"
secret = "{KEY_B}"
"""
    )
    environ = {"HIDDEN_URL": "https://hooks.example.com/hidden-from-env"}
    config = load_config(write(tmp_path, text), environ)
    values = config.secret_values()
    assert "literal-password-0a9c" in values
    assert "https://hooks.example.com/hidden-from-env" in values
    assert "https://hooks.example.com/plain-literal" not in values
    assert KEY_A in values and KEY_B in values
    shown = repr(config)
    for value in values:
        assert value not in shown
    with pytest.raises(KeyError):
        config.sink("nope")


def test_config_is_frozen(tmp_path: Path) -> None:
    """The records cannot be changed after loading."""
    config = load_config(write(tmp_path, MINIMAL), {})
    with pytest.raises(AttributeError):
        config.leads.interval = 5  # type: ignore[misc]
    assert isinstance(config, Config)


# ----------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (90, 90.0),
        (2.5, 2.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        (" 10m ", 600.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    """Integer seconds and unit strings become float seconds."""
    assert parse_duration(value, "x.y") == seconds


@pytest.mark.parametrize(
    "value",
    [True, False, None, "", "90", "5x", "m5", "5 m", "30m1h", "5m5m", "-5s", "1e3s", -1, -0.5, "inf",
     float("nan"), float("inf"), 10**400, "9" * 400 + "d", [60], {"s": 1}],
)  # fmt: skip
def test_parse_duration_rejects(value: object) -> None:
    """Anything else names the key path and says what is expected."""
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "leads.interval")
    assert str(info.value).startswith("leads.interval: ")
    assert info.value.path == "leads.interval"


# ------------------------------------------------------------------------------------------- secrets


def test_secret_from_env(tmp_path: Path) -> None:
    """X_env reads the named variable from the environ argument."""
    text = MINIMAL.replace('password = "literal-password-0a9c"', 'password_env = "PW"')
    config = load_config(write(tmp_path, text), {"PW": "from-env-1234"})
    assert config.convertr.password == "from-env-1234"


def test_environ_defaults_to_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an environ argument the process environment is used."""
    monkeypatch.setenv("WATCHER_TEST_PW", "process-env-5678")
    text = MINIMAL.replace('password = "literal-password-0a9c"', 'password_env = "WATCHER_TEST_PW"')
    assert load_config(write(tmp_path, text)).convertr.password == "process-env-5678"


def test_secret_files_relative_to_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """X_file resolves against the config file's folder, whatever the working directory, and is stripped."""
    folder = tmp_path / "etc" / "watcher"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "pw").write_text("  file-password-77  \n")
    (folder / "secrets" / "slack").write_text("https://hooks.slack.com/services/T/B/file-token\n")
    (folder / "secrets" / "keys").write_text(f"{KEY_A}\n{KEY_B}\n")
    (folder / "secrets" / "url").write_text("https://hooks.example.com/from-file\n")
    text = (
        MINIMAL.replace('password = "literal-password-0a9c"', 'password_file = "secrets/pw"')
        + """
[[sinks]]
name = "crm"
type = "webhook"
url_file = "secrets/url"
secret_file = "secrets/keys"

[[sinks]]
name = "chat"
type = "slack"
url_file = "secrets/slack"
"""
    )
    path = write(folder, text)
    monkeypatch.chdir(tmp_path)
    config = load_config(path, {})
    assert config.convertr.password == "file-password-77"
    assert config.sink("crm").url == "https://hooks.example.com/from-file"
    assert config.sink("crm").secrets == (KEY_A, KEY_B)
    assert config.sink("chat").url == "https://hooks.slack.com/services/T/B/file-token"
    assert "https://hooks.example.com/from-file" in config.secret_values()


def test_secret_file_absolute_path(tmp_path: Path) -> None:
    """An absolute X_file path is used as given."""
    secret = tmp_path / "elsewhere" / "pw"
    secret.parent.mkdir()
    secret.write_text("absolute-pw-3141")
    text = MINIMAL.replace('password = "literal-password-0a9c"', f'password_file = "{secret}"')
    assert load_config(write(tmp_path / "conf", text), {}).convertr.password == "absolute-pw-3141"


def test_missing_secret_file_says_relative_only_for_relative_paths(tmp_path: Path) -> None:
    """A missing relative X_file mentions the config folder; a missing absolute one does not."""
    for raw, hint in (("nope/pw", True), (str(tmp_path / "nope" / "pw"), False)):
        text = MINIMAL.replace('password = "literal-password-0a9c"', f'password_file = "{raw}"')
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text), {})
        assert str(info.value).startswith("convertr.password_file: cannot read the file")
        assert ("relative to the config folder" in str(info.value)) is hint


def test_secret_pasted_into_env_key_is_not_echoed(tmp_path: Path) -> None:
    """A value that does not look like a variable name is not repeated in the error."""
    text = MINIMAL.replace('password = "literal-password-0a9c"', 'password_env = "hunter2-pasted"')
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    assert str(info.value) == "convertr.password_env: the environment variable it names is not set"


def test_secret_file_that_is_a_directory(tmp_path: Path) -> None:
    """A directory given as a secret file is a config error, not a crash."""
    (tmp_path / "secrets").mkdir()
    text = MINIMAL.replace('password = "literal-password-0a9c"', 'password_file = "secrets"')
    with pytest.raises(ConfigError, match=r"^convertr\.password_file: cannot read the file"):
        load_config(write(tmp_path, text), {})


# ------------------------------------------------------------------------------------ paths and values


def test_relative_state_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """state.path resolves against the config folder, not the working directory."""
    write(tmp_path / "conf", MINIMAL.replace('"state.db"', '"data/watcher.db"'))
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("conf") / "config.toml", {})
    assert config.state.path == tmp_path / "conf" / "data" / "watcher.db"
    assert config.path == tmp_path / "conf" / "config.toml"


def test_absolute_state_path(tmp_path: Path) -> None:
    """An absolute state.path is kept."""
    target = tmp_path / "var" / "state.db"
    config = load_config(write(tmp_path / "conf", MINIMAL.replace('"state.db"', f'"{target}"')), {})
    assert config.state.path == target


def test_values_are_parsed(tmp_path: Path) -> None:
    """Non-default values of every kind come through converted."""
    text = (
        MINIMAL.replace("https://acme.cvtr.io/", "http://127.0.0.1:8080")
        + """
[leads]
interval = "1m30s"
lookback = 0
campaign_ids = [601, 602, 601]
start = "2024-04-01T09:30:00+01:00"
track = ["qaResult", "leadData.company"]
safety_lag = 0

[campaigns]
enabled = false
interval = 45

[metrics]
listen = "[::1]:9464"

[log]
level = "DEBUG"
format = "console"
"""
    )
    config = load_config(write(tmp_path, text), {})
    assert config.convertr.base_url == "http://127.0.0.1:8080"
    assert (config.leads.interval, config.leads.lookback, config.leads.safety_lag) == (90.0, 0.0, 0.0)
    assert config.leads.campaign_ids == (601, 602)
    assert config.leads.start == datetime(2024, 4, 1, 8, 30, tzinfo=UTC)
    assert config.leads.track == ("qaResult", "leadData.company")
    assert config.campaigns == CampaignsConfig(enabled=False, interval=45.0)
    assert config.metrics.listen == ("::1", 9464)
    assert config.log == LogConfig(level="debug", format="console")


def test_start_as_toml_datetime(tmp_path: Path) -> None:
    """An unquoted TOML offset date-time is accepted too."""
    config = load_config(write(tmp_path, MINIMAL + "\n[leads]\nstart = 2024-01-31T00:00:00Z\n"), {})
    assert config.leads.start == datetime(2024, 1, 31, tzinfo=UTC)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    assert str(info.value) == f"{missing}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as the config is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, {})


# ------------------------------------------------------------------------------------ invalid corpus


def corpus_cases() -> list[Path]:
    return sorted(CORPUS_DIR.glob("*.toml"))


def corpus_secrets() -> set[str]:
    """Every secret value the corpus uses: environ values, literal secrets and URL credentials."""
    values = {v for v in CORPUS_ENVIRON.values() if v}
    for case in corpus_cases():
        pattern = r'^(?:password|url|secret)(?:_env|_file)?\s*=\s*"([^"]*corpus-[^"]*|whsec_[^"]*)"'
        for match in re.finditer(pattern, case.read_text(), re.M):
            values.add(match.group(1))
            values.update(match.group(1).split())
    values.add("corpus-url-password")
    return values


def test_corpus_is_large_and_well_formed() -> None:
    """At least 35 cases, each opening with its expected key path."""
    cases = corpus_cases()
    assert len(cases) >= 35
    for case in cases:
        assert case.read_text().startswith("# expect: "), case.name
    assert all(len(value) >= 8 for value in corpus_secrets())


@pytest.mark.parametrize("case", corpus_cases(), ids=lambda p: p.stem)
def test_invalid_config(case: Path) -> None:
    """Each corpus file fails with one line naming its key path and no secret value."""
    expected = case.read_text().splitlines()[0].removeprefix("# expect: ").strip()
    if expected == "<file>":
        expected = str(case)
    with pytest.raises(ConfigError) as info:
        load_config(case, CORPUS_ENVIRON)
    message = str(info.value)
    assert message.startswith(expected + ": "), message
    assert "\n" not in message and "\r" not in message
    assert message == message.strip()
    problem = message.removeprefix(expected + ": ")
    assert problem[:1] == problem[:1].lower()
    for secret in corpus_secrets():
        assert secret not in message
    assert "corpus-" not in message
