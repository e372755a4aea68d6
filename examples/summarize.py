"""An extractive summarizer: a custom task type that needs no network and no model.

It picks the sentences whose content words are most frequent in the text (H. P. Luhn,
"The Automatic Creation of Literature Abstracts", 1958) and streams them in their original
order. It shows the shapes a handler may take; none needs to import taskring:

    async def f(input: dict) -> dict                  returns its output
    async def f(input: dict) -> AsyncIterator[...]    yields str to stream output text and a
                                                      dict as its output (`summarize` below)
    ... f(input, ctx)                                 also gets a TaskContext: task_id,
                                                      attempt, labels, remaining_s()
    class C: async def __call__(self, input[, ctx])   created once per process with the
                                                      configured options (`Summarizer`);
                                                      an `async def aclose(self)` is awaited
                                                      at shutdown

`input` has been checked against summarize.input.schema.json before the task was accepted,
and the output is checked against summarize.output.schema.json before the task succeeds.
An exception fails the task without a retry (HANDLER_ERROR, with its message).

    [task_types.summarize]
    handler = "examples.summarize:summarize"          # or "examples.summarize:Summarizer"
    input_schema_file = "examples/summarize.input.schema.json"
    output_schema_file = "examples/summarize.output.schema.json"
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotation: handlers need nothing from taskring at run time
    from server.tasktypes import TaskContext

_log = logging.getLogger(__name__)

# A sentence ends at . ! or ? followed by whitespace. Abbreviations ("e.g. this") split too
# early; good enough for an example, and why a real one would use a tokenizer.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_ENGLISH_STOPWORDS = """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is
    it its itself just me more most my myself no nor not now of off on once only or other
    our ours ourselves out over own same she should so some such than that the their theirs
    them themselves then there these they this those through to too under until up very was
    we were what when where which while who whom why will with you your yours yourself
    yourselves
"""
STOPWORDS = frozenset(_ENGLISH_STOPWORDS.split())


class Summarizer:
    """A class handler: taskring creates one per process with the type's `options`, e.g.
    `options = { max_sentences = 2, extra_stopwords = ["taskring"] }`, then calls it once per
    task. State set up here (here a word list; elsewhere a model) is shared by all tasks."""

    def __init__(self, max_sentences: int = 3, extra_stopwords: Sequence[str] = ()) -> None:
        if max_sentences < 1:
            raise ValueError("max_sentences must be at least 1")
        self._default_sentences = max_sentences
        self._stopwords = STOPWORDS | {w.lower() for w in extra_stopwords}

    async def __call__(
        self, input: dict[str, Any], ctx: TaskContext | None = None
    ) -> AsyncIterator[str | dict[str, Any]]:
        """Streams the chosen sentences, then yields the output object."""
        sentences = split_sentences(input["text"])
        wanted: int = input.get("max_sentences", self._default_sentences)
        if ctx is not None:
            _log.info(
                "task %s (attempt %d): %d sentences", ctx.task_id, ctx.attempt, len(sentences)
            )
        # Ranking is CPU work: in a thread, so that a megabyte of text does not stall the
        # other tasks this process runs on its event loop.
        chosen = await asyncio.to_thread(self.rank, sentences, wanted)
        for n, index in enumerate(chosen):
            yield (" " if n else "") + sentences[index]
        yield {
            "summary": " ".join(sentences[i] for i in chosen),
            "sentences": chosen,
            "source_sentences": len(sentences),
        }

    def rank(self, sentences: Sequence[str], wanted: int) -> list[int]:
        """Indices of the `wanted` best sentences, in their original order."""
        words = [self._content_words(s) for s in sentences]
        frequency = Counter(w for ws in words for w in ws)
        # A plain sum favours long sentences, an average favours short ones; dividing by the
        # square root of the length sits between (Luhn scored clusters of such words instead).
        scores = [sum(frequency[w] for w in ws) / math.sqrt(len(ws)) if ws else 0.0 for ws in words]
        best = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:wanted]
        return sorted(best)

    def _content_words(self, sentence: str) -> list[str]:
        return [w for w in _WORD.findall(sentence.lower()) if w not in self._stopwords]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


_DEFAULT = Summarizer()


async def summarize(input: dict[str, Any]) -> AsyncIterator[str | dict[str, Any]]:
    """A function handler (an async generator): the same summary with default settings."""
    async for item in _DEFAULT(input):
        yield item
