"""The TOML configuration file: members, routing, prices; every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ConfigError, Settings
from server.config_file import BackendSpec, ModelPrice, read_file_config


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


def test_the_readme_example_is_a_valid_file(tmp_path: Path) -> None:
    """The configuration users copy from the README must load as shown."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    config, problems = read_file_config(write(tmp_path, example))
    assert problems == []
    assert [b.kind for b in config.backends] == ["openai", "anthropic", "openai", "remote"]
