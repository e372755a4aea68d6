"""Settings from an environment mapping: embedded defaults, and errors naming each variable."""

from __future__ import annotations

import pytest

from server.config import ConfigError, Settings


def test_empty_environment_gives_the_embedded_defaults() -> None:
    """`make run` with nothing set: SQLite file, three local executors, 127.0.0.1:50051."""
    settings = Settings.from_env({})
    assert settings.server.listen == "127.0.0.1:50051"
    assert settings.store.url == "sqlite:///taskring.db"
    assert settings.store.sqlite_path == "taskring.db"
    assert settings.local.count == 3


def test_values_are_read_and_converted() -> None:
    """Every variable overrides its default."""
    settings = Settings.from_env(
        {
            "TASKRING_LISTEN": "[::1]:6000",
            "TASKRING_STORE": "sqlite:////var/lib/taskring/t.db",
            "TASKRING_LOCAL_EXECUTORS": "5",
            "TASKRING_LOCAL_TOKEN_DELAY_S": "0",
            "TASKRING_DEFAULT_TIMEOUT_S": "30",
            "TASKRING_SQLITE_SYNCHRONOUS": "normal",
            "TASKRING_OUTPUT_STORE_INTERVAL_S": "0",
        }
    )
    assert settings.server.listen == "[::1]:6000"
    assert settings.store.sqlite_path == "/var/lib/taskring/t.db"
    assert settings.local.count == 5
    assert settings.local.token_delay_s == 0
    assert settings.tasks.default_timeout_s == 30
    assert settings.store.sqlite_synchronous == "NORMAL"
    assert settings.store.output_store_interval_s == 0


def test_every_bad_variable_is_reported_at_once() -> None:
    """One error lists each bad variable with its value and what is expected."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {
                "TASKRING_LISTEN": "nowhere",
                "TASKRING_LOCAL_EXECUTORS": "zero",
                "TASKRING_LOCAL_TOKEN_DELAY_S": "-1",
                "TASKRING_STORE": "mysql://x",
                "TASKRING_OUTPUT_STORE_INTERVAL_S": "soon",
            }
        )
    text = str(caught.value)
    for name in (
        "TASKRING_LISTEN",
        "TASKRING_LOCAL_EXECUTORS",
        "TASKRING_LOCAL_TOKEN_DELAY_S",
        "TASKRING_STORE",
        "TASKRING_OUTPUT_STORE_INTERVAL_S",
    ):
        assert name in text
    assert len(caught.value.problems) == 5
    assert "'nowhere'" in text


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"TASKRING_DEFAULT_MAX_ATTEMPTS": "20"}, "TASKRING_DEFAULT_MAX_ATTEMPTS"),
        ({"TASKRING_STORE": "sqlite:///:memory:"}, "TASKRING_STORE"),
        (
            {"TASKRING_DEFAULT_TIMEOUT_S": "100", "TASKRING_MAX_TIMEOUT_S": "10"},
            "TASKRING_DEFAULT_TIMEOUT_S",
        ),
    ],
)
def test_settings_that_would_break_every_request_are_refused(
    env: dict[str, str], name: str
) -> None:
    """A default above its limit, or a store that keeps nothing, stops the start."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env)
