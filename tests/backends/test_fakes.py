"""The provider fakes speak the real wire formats: the official SDKs parse their answers,
including the non-streaming ones our backends do not use (bench/ and other tests may)."""

from __future__ import annotations

import anthropic
import openai

from tests.fakes import FakeAnthropic, FakeOpenAI


async def test_openai_fake_answers_without_streaming() -> None:
    """A plain chat completion: the echo, its finish reason and word counts."""
    async with FakeOpenAI() as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0)
        async with client:
            completion = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "one two three"}], max_tokens=2
            )
    assert completion.choices[0].message.content == "one two "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 2)


async def test_openai_fake_embeds_as_floats_and_as_base64() -> None:
    """Both encodings the API offers give the same vectors."""
    async with FakeOpenAI(embed_dim=4) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0)
        async with client:
            as_base64 = await client.embeddings.create(model="m", input=["a", "b"])
            as_floats = await client.embeddings.create(
                model="m", input=["a", "b"], encoding_format="float"
            )
    assert fake.requests[0].body["encoding_format"] == "base64"  # the SDK's default
    expected = [fake.embedding("a"), fake.embedding("b")]
    assert [e.embedding for e in as_base64.data] == expected
    assert [e.embedding for e in as_floats.data] == expected


async def test_anthropic_fake_answers_without_streaming() -> None:
    """A plain message: the echo as one text block, its stop reason and word counts."""
    async with FakeAnthropic() as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="k", max_retries=0)
        async with client:
            message = await client.messages.create(
                model="m",
                max_tokens=10,
                system="be brief",
                messages=[{"role": "user", "content": "one two three"}],
            )
    [block] = message.content
    assert block.type == "text"
    assert block.text == "one two three"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 3)
