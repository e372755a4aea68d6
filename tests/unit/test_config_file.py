"""The TOML configuration file: members, routing, prices; every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ConfigError, Settings
from server.config_file import (
    ApiKey,
    BackendSpec,
    Limits,
    ModelPrice,
    RateLimit,
    TaskQuota,
    TypeQuota,
    TypeQuotas,
    read_file_config,
)
from server.dispatch.retry import RetryPolicies, RetryPolicy
from server.model.task import Priority


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "taskring.toml"
    path.write_text(text)
    return path


def test_a_full_file_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[routing]
load_factor = 1.5

[[backends]]
name = "gpu-1"
kind = "remote"
address = "127.0.0.1:50061"
weight = 2
max_concurrency = 16

[[backends]]
name = "claude"
kind = "anthropic"
api_key_env = "ANTHROPIC_API_KEY"
timeout_s = 30

[prices."gpt-4o-mini"]
input = 0.15
output = 0.6

[task_types.summarize]
handler = "examples.summarize:summarize"
""",
    )
    config, problems = read_file_config(path)
    assert problems == []
    assert config.load_factor == 1.5
    assert config.backends == (
        BackendSpec(
            "gpu-1",
            "remote",
            frozenset({"chat", "embed"}),
            weight=2,
            max_concurrency=16,
            address="127.0.0.1:50061",
        ),
        BackendSpec(
            "claude",
            "anthropic",
            frozenset({"chat"}),
            api_key_env="ANTHROPIC_API_KEY",
            timeout_s=30.0,
        ),
    )
    assert config.prices == {"gpt-4o-mini": ModelPrice(0.15, 0.6)}
    assert config.task_types == {"summarize": {"handler": "examples.summarize:summarize"}}
    assert config.base_dir == tmp_path.resolve()


def test_every_problem_is_named_with_its_place(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[routing]
load_factor = 0.5

[[backends]]
name = "a"
kind = "remote"

[[backends]]
name = "a"
kind = "local"
task_types = ["chat", ""]

[[backends]]
name = "b"
kind = "anthropic"
task_types = ["embed"]
max_concurrency = 0
colour = "blue"

[prices.m]
input = -1
""",
    )
    _, problems = read_file_config(path)
    text = "\n".join(problems)
    assert "routing.load_factor: must be a number >= 1.0" in text
    assert "backends[0].address: a remote backend needs its executor's host:port" in text
    assert "backends[1].name: 'a' used twice" in text
    assert "backends[1].task_types: must be a non-empty list of non-empty task type" in text
    assert "backends[2].task_types: a anthropic backend runs ['chat'], not ['embed']" in text
    assert "backends[2].max_concurrency: must be a whole number from 1 to 100000" in text
    assert "unknown keys ['colour']" in text
    assert "prices.'m': needs input and output" in text
    assert all(p.startswith(str(path)) for p in problems)


def test_settings_refuse_a_bad_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_env({"TASKRING_CONFIG": str(tmp_path / "missing.toml")})
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.from_env({"TASKRING_CONFIG": str(write(tmp_path, "[[backends]\n"))})


def test_without_a_file_the_ring_is_the_local_executors() -> None:
    assert Settings.from_env({}).file.backends == ()


def test_the_readme_examples_are_valid_files(tmp_path: Path) -> None:
    """The configuration users copy from the README must load as shown."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    examples = [block.split("```", 1)[0] for block in readme.split("```toml\n")[1:]]
    configs = []
    for example in examples:
        config, problems = read_file_config(write(tmp_path, example))
        assert problems == [], example
        configs.append(config)
    kinds = [[b.kind for b in config.backends] for config in configs]
    assert ["openai", "anthropic", "openai", "remote"] in kinds
    assert any(config.limits.clients for config in configs)


def test_api_keys_and_limits_are_read(tmp_path: Path) -> None:
    digest = "ab" * 32
    config, problems = read_file_config(
        write(
            tmp_path,
            f"""
[[api_keys]]
client = "team-a"
sha256 = "{digest}"

[[api_keys]]
client = "ops"
sha256 = "{"cd" * 32}"
admin = true

[limits]
rate = 2.5
burst = 10
[limits.clients."team-a"]
rate = 100
burst = 200
""",
        )
    )
    assert problems == []
    assert config.api_keys == (ApiKey("team-a", digest), ApiKey("ops", "cd" * 32, admin=True))
    assert config.limits == Limits(RateLimit(2.5, 10), {"team-a": RateLimit(100.0, 200)})


def test_bad_keys_and_limits_are_named_with_their_place(tmp_path: Path) -> None:
    _, problems = read_file_config(
        write(
            tmp_path,
            """
[[api_keys]]
client = ""
sha256 = "trk_the-key-itself-by-mistake"
role = "admin"

[limits]
rate = 0
burst = 1.5
[limits.clients."b"]
rate = 1
""",
        )
    )
    text = "\n".join(problems)
    for place in (
        "api_keys[0]: unknown keys ['role']",
        "api_keys[0].client",
        "api_keys[0].sha256",
        "limits.rate",
        "limits.burst",
        "limits.clients.'b'.burst",
    ):
        assert place in text
    assert "trk_the-key-itself" not in text, "a misplaced key is not echoed"


def test_token_budgets_and_queued_caps_are_read_with_client_overrides(tmp_path: Path) -> None:
    """A client's table overrides the keys it sets; the others come from [limits]."""
    config, problems = read_file_config(
        write(
            tmp_path,
            """
[limits]
tokens_per_minute = 100000
max_queued = 1000
default_max_tokens = 512
[limits.clients."big"]
tokens_per_minute = 2000000
[limits.clients."fast"]
rate = 10
burst = 20
""",
        )
    )
    assert problems == []
    limits = config.limits
    assert limits.default is None, "no rate limit unless rate and burst are set"
    assert limits.clients == {"fast": RateLimit(10.0, 20)}
    assert limits.quota_for("anyone") == TaskQuota(tokens_per_minute=100_000, max_queued=1000)
    assert limits.quota_for("big") == TaskQuota(tokens_per_minute=2_000_000, max_queued=1000)
    assert limits.quota_for("fast") == limits.quota
    assert limits.default_max_tokens == 512
    assert limits.caps_queued


def test_bad_budgets_and_caps_are_named_with_their_place(tmp_path: Path) -> None:
    _, problems = read_file_config(
        write(
            tmp_path,
            """
[limits]
tokens_per_minute = 0
max_queued = "many"
default_max_tokens = true
[limits.clients."x"]
default_max_tokens = 5
max_queued = 1.5
tokens_per_minut = 100
""",
        )
    )
    text = "\n".join(problems)
    for place in (
        "limits.tokens_per_minute: must be a whole number from 1",
        "limits.max_queued: must be a whole number from 1",
        "limits.default_max_tokens: must be a whole number from 1",
        "limits.clients.'x': unknown keys ['default_max_tokens', 'tokens_per_minut']",
        "limits.clients.'x'.max_queued",
    ):
        assert place in text
    assert len(problems) == 5, text


def test_retry_policies_are_read_per_task_type(tmp_path: Path) -> None:
    """[retry] is every type's policy; [retry.types.X] overrides only the keys it sets."""
    path = write(
        tmp_path,
        """
[task_types.summarize]
handler = "examples.summarize:summarize"

[retry]
initial_backoff_s = 0.5
max_backoff_s = 30
[retry.types.chat]
max_attempts = 5
[retry.types.summarize]
factor = 3
""",
    )
    config, problems = read_file_config(path, default_max_attempts=4)
    assert problems == []
    default = RetryPolicy(0.5, 30.0, 2.0, max_attempts=4)  # attempts: the environment's
    assert config.retry == RetryPolicies(
        default,
        {
            "chat": RetryPolicy(0.5, 30.0, 2.0, max_attempts=5),
            "summarize": RetryPolicy(0.5, 30.0, 3.0, max_attempts=4),
        },
    )
    assert config.retry.for_type("embed") == default
    # Without a file, TASKRING_DEFAULT_MAX_ATTEMPTS is every type's.
    settings = Settings.from_env({"TASKRING_DEFAULT_MAX_ATTEMPTS": "6"})
    assert settings.file.retry == RetryPolicies(RetryPolicy(max_attempts=6))


def test_bad_retry_policies_are_named_with_their_place(tmp_path: Path) -> None:
    _, problems = read_file_config(
        write(
            tmp_path,
            """
[retry]
max_attempts = 11
jitter = "none"
[retry.types.chat]
initial_backoff_s = 5
max_backoff_s = 1
[retry.types.chta]
factor = 0.5
""",
        )
    )
    text = "\n".join(problems)
    for place in (
        "retry: unknown keys ['jitter']",
        "retry.max_attempts: must be a whole number from 1 to 10",
        "retry.types.chat: need 0 <= initial_backoff_s <= max_backoff_s",
        "retry.types.chta: no such task type; known: chat, embed",
        "retry.types.chta: factor must be at least 1",
    ):
        assert place in text, text


def test_task_type_quotas_are_read(tmp_path: Path) -> None:
    """[quotas.types."<type>"]: a rate limit, a concurrency cap, or both, per task type."""
    path = write(
        tmp_path,
        """
[task_types.summarize]
handler = "examples.summarize:summarize"

[quotas.types."chat"]
rate = 2.5
burst = 5
max_running = 8
[quotas.types."embed"]
max_running = 3
[quotas.types."summarize"]
rate = 1
burst = 1
""",
    )
    config, problems = read_file_config(path)
    assert problems == []
    assert config.quotas == TypeQuotas(
        {
            "chat": TypeQuota(RateLimit(2.5, 5), 8),
            "embed": TypeQuota(None, 3),
            "summarize": TypeQuota(RateLimit(1.0, 1), None),
        }
    )
    assert config.quotas.rates() == {"chat": RateLimit(2.5, 5), "summarize": RateLimit(1.0, 1)}
    assert config.quotas.max_running() == {"chat": 8, "embed": 3}
    # No [quotas]: no type is limited.
    assert read_file_config(write(tmp_path, ""))[0].quotas == TypeQuotas()


def test_bad_task_type_quotas_are_named_with_their_place(tmp_path: Path) -> None:
    _, problems = read_file_config(
        write(
            tmp_path,
            """
[quotas]
max_running = 3
[quotas.types."chta"]
max_running = 2
[quotas.types."chat"]
rate = 5
max_running = 0
concurrency = 4
[quotas.types."embed"]
max_running = true
""",
        )
    )
    text = "\n".join(problems)
    for place in (
        "quotas: unknown keys ['max_running']; expected types",
        "quotas.types.chta: no such task type; known: chat, embed",
        "quotas.types.chat: unknown keys ['concurrency']",
        "quotas.types.chat.burst: required: the bucket's size",
        "quotas.types.chat.max_running: must be a whole number from 1 to 100000",
        "quotas.types.embed.max_running: must be a whole number from 1 to 100000",
    ):
        assert place in text, text
    assert len(problems) == 6, text


def test_priority_aging_and_caps_are_read(tmp_path: Path) -> None:
    """A client's table that only caps the priority keeps the common rate limit."""
    config, problems = read_file_config(
        write(
            tmp_path,
            """
[priorities]
aging_s = 30

[limits]
rate = 10
burst = 20
max_priority = "high"
[limits.clients."batch"]
max_priority = "LOW"
[limits.clients."ops"]
rate = 100
burst = 100
max_priority = "URGENT"
""",
        )
    )
    assert problems == []
    assert config.aging_s == 30.0
    assert config.limits == Limits(
        RateLimit(10.0, 20),
        {"ops": RateLimit(100.0, 100)},
        max_priority=Priority.HIGH,
        client_max_priority={"batch": Priority.LOW, "ops": Priority.URGENT},
    )
    assert config.limits.max_priority_of("batch") is Priority.LOW
    assert config.limits.max_priority_of("anyone") is Priority.HIGH


def test_without_priorities_tasks_age_every_minute_and_nobody_is_capped(tmp_path: Path) -> None:
    config, problems = read_file_config(write(tmp_path, "[limits]\nrate = 1\nburst = 1\n"))
    assert problems == []
    assert config.aging_s == 60.0
    assert config.limits.max_priority_of("anyone") is Priority.URGENT


def test_bad_aging_and_caps_are_named_with_their_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[priorities]
aging_s = -5
aging = 60

[limits]
max_priority = "CRITICAL"
[limits.clients."b"]
max_priority = 3
""",
    )
    _, problems = read_file_config(path)
    text = "\n".join(problems)
    for problem in (
        "priorities: unknown keys ['aging']",
        "priorities.aging_s: -5 is not a number of seconds >= 0",
        "limits.max_priority: 'CRITICAL' is not a priority; expected one of LOW, NORMAL, HIGH,"
        " URGENT",
        "limits.clients.'b'.max_priority: 3 is not a priority",
    ):
        assert problem in text
    with pytest.raises(ConfigError, match=r"priorities\.aging_s: -5"):
        Settings.from_env({"TASKRING_CONFIG": str(path)})
