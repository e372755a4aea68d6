"""What the provider backends share: API keys from configuration, prices, Retry-After,
and redaction of keys from messages."""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest

from server.backends.providers import (
    MAX_RETRY_AFTER_S,
    REDACTED,
    ApiKeyError,
    PriceTable,
    Redactor,
    parse_retry_after,
    read_api_key,
)
from server.config_file import ModelPrice
from server.model.task import Usage

SECRET = "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
NOW = 1_700_000_000.0


# -- read_api_key ------------------------------------------------------------------------


def test_key_from_an_environment_variable() -> None:
    """The variable's value, as the mapping passed in holds it (tests pass a dict)."""
    assert read_api_key("OPENAI_API_KEY", None, {"OPENAI_API_KEY": SECRET}) == SECRET


def test_key_from_a_file_loses_its_trailing_newline(tmp_path: Path) -> None:
    """Secret files written by `echo` end with a newline that is not part of the key."""
    path = tmp_path / "openai.key"
    path.write_text(SECRET + "\n")
    assert read_api_key(None, str(path), {}) == SECRET


@pytest.mark.parametrize(
    ("env_var", "file", "environ", "says"),
    [
        ("OPENAI_API_KEY", None, {}, "environment variable OPENAI_API_KEY is not set"),
        ("OPENAI_API_KEY", None, {"OPENAI_API_KEY": " "}, "OPENAI_API_KEY is empty"),
        (None, "/nonexistent/openai.key", {}, "cannot read API key file /nonexistent/openai.key"),
        (None, None, {}, "no API key configured"),
        ("A", "/b", {"A": SECRET}, "not both"),
    ],
)
def test_missing_key_names_where_it_was_looked_for(
    env_var: str | None, file: str | None, environ: dict[str, str], says: str
) -> None:
    """The error names the variable or file to fix."""
    with pytest.raises(ApiKeyError, match=says):
        read_api_key(env_var, file, environ)


def test_errors_never_show_the_value(tmp_path: Path) -> None:
    """A malformed key is reported without being printed."""
    path = tmp_path / "two-lines.key"
    path.write_text(f"{SECRET}\n{SECRET}\n")
    with pytest.raises(ApiKeyError) as caught:
        read_api_key(None, str(path), {})
    assert "more than one line" in str(caught.value)
    assert SECRET not in str(caught.value)


# -- PriceTable --------------------------------------------------------------------------


def test_cost_is_tokens_times_price_per_million() -> None:
    """1,000 input at $2.50/M and 500 output at $10/M cost $0.0075."""
    prices = PriceTable({"gpt-4o": ModelPrice(2.5, 10.0)})
    assert prices.cost("gpt-4o", Usage(1000, 500)) == pytest.approx(0.0075)
    assert prices.cost("unknown", Usage(1000, 500)) == 0.0


def test_priced_falls_back_to_the_model_that_answered() -> None:
    """A request for an alias is priced by the dated model the provider reports."""
    prices = PriceTable({"gpt-4o-2024-08-06": ModelPrice(2.5, 10.0)})
    usage = prices.priced(("gpt-4o", "gpt-4o-2024-08-06"), 1000, 500)
    assert (usage.input_tokens, usage.output_tokens) == (1000, 500)
    assert usage.cost_usd == pytest.approx(0.0075)


# -- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
        ({"retry-after": "86400"}, MAX_RETRY_AFTER_S),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    """Milliseconds first, then seconds or an HTTP date; clamped to [0, MAX_RETRY_AFTER_S]."""
    assert parse_retry_after(headers, NOW) == seconds


# -- Redactor ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "echo",
    [
        f"Incorrect API key provided: {SECRET}.",
        f"Incorrect API key provided: {SECRET[:12]}************{SECRET[-4:]}.",
        f"key ...{SECRET[-12:]} is revoked",
    ],
    ids=["whole", "prefix", "suffix"],
)
def test_redactor_removes_the_key_and_its_truncations(echo: str) -> None:
    """Whole keys and the truncated forms providers print are replaced."""
    redacted = Redactor(SECRET)(echo)
    assert REDACTED in redacted
    assert SECRET[:12] not in redacted
    assert SECRET[-12:] not in redacted


def test_redactor_leaves_other_text_alone() -> None:
    """Words that merely resemble keys, and a short key's fragments, stay."""
    assert Redactor(SECRET)("model gpt-4o not found") == "model gpt-4o not found"
    short = Redactor("short-key-123")  # too short for its fragments to be told from words
    assert short("short-key is short-key-123") == f"short-key is {REDACTED}"
    dummy = Redactor("ollama")  # what a local server that ignores keys is given
    assert dummy("ollama: model 'ollama2' not found") == f"{REDACTED}: model 'ollama2' not found"
    assert SECRET not in repr(Redactor(SECRET))
