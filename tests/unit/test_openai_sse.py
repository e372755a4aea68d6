"""The OpenAI backend reads chat streams' server-sent events itself (the SDK's per-chunk
models cost too much of the event loop): what compatible servers send must parse alike."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from server.backends.openai_backend import _chunks, _StreamError


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def parsed(*items: str) -> list[dict[str, object]]:
    return [chunk async for chunk in _chunks(lines(*items))]


async def test_events_end_at_blank_lines_and_stop_at_done() -> None:
    assert await parsed(
        'data: {"n": 1}', "", 'data: {"n": 2}', "", "data: [DONE]", "", 'data: {"n": 3}', ""
    ) == [{"n": 1}, {"n": 2}]


async def test_comments_other_fields_and_stray_blank_lines_are_ignored() -> None:
    """vLLM, Ollama and proxies send keep-alive comments, `event:`/`id:` fields, extra
    blank lines; `data:` without the space is valid SSE too."""
    assert await parsed(
        ": keep-alive", "", "", "event: chunk", "id: 7", 'data:{"n": 1}', "", "retry: 10"
    ) == [{"n": 1}]


async def test_data_lines_of_one_event_join() -> None:
    assert await parsed('data: {"n":', "data: 1}", "") == [{"n": 1}]


async def test_an_event_cut_off_by_the_end_of_the_stream_is_not_used() -> None:
    assert await parsed('data: {"n": 1}', "", 'data: {"n": 2}') == [{"n": 1}]


async def test_error_event_raises_with_the_providers_message() -> None:
    error = json.dumps({"error": {"message": "overloaded", "type": "server_error"}})
    with pytest.raises(_StreamError, match=r"^overloaded$"):
        await parsed(f"data: {error}", "")


@pytest.mark.parametrize("payload", ['"just a string"', "[1, 2]", '{"error": 5}'])
async def test_chunks_that_are_not_objects_or_carry_bare_errors_raise(payload: str) -> None:
    with pytest.raises(_StreamError):
        await parsed(f"data: {payload}", "")


async def test_malformed_json_raises_the_decoder_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        await parsed("data: {not json", "")
