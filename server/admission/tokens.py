"""How many model tokens a task may use (estimated at admission, before it runs) and did
use (once it ended), for the token budget. No tokenizer: a simple estimate, corrected
with the backend's own count when the task ends.

Text is counted as its UTF-8 bytes / 4, rounded up: about right for English (OpenAI's and
Anthropic's tokenizers average about 4 characters per token), and closer than characters
for scripts whose characters take several bytes, and tokens. A chat message adds
TOKENS_PER_MESSAGE for its role and separators. Worked example, max_tokens unset and
`default_max_tokens` 1024:

    messages [system "Be brief." (9 bytes), user "Hello" (5 bytes)]
    prompt   = (ceil(9/4) + 4) + (ceil(5/4) + 4) = 7 + 6 = 13
    estimate = 13 + 1024 = 1037
"""

from __future__ import annotations

from dataclasses import dataclass

from server.model.task import ChatInput, EmbedInput, Task, TaskSpec, chat_text

BYTES_PER_TOKEN = 4
# The role and the separators around each message (OpenAI's guide counts 3 or 4).
TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a task may use: its input, and at most `max_output` more (chat's max_tokens)."""

    prompt: int
    max_output: int

    @property
    def total(self) -> int:
        return self.prompt + self.max_output


def text_tokens(text: str) -> int:
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


def estimate(spec: TaskSpec, default_max_tokens: int) -> Estimate | None:
    """The tokens a task may use; None for a custom task (its handler's use is its own:
    custom tasks are not charged). `default_max_tokens` stands for a chat task's unset
    max_tokens."""
    match spec.input:
        case ChatInput(messages=messages, max_tokens=max_tokens):
            prompt = sum(text_tokens(m.content) + TOKENS_PER_MESSAGE for m in messages)
            return Estimate(prompt, max_tokens or default_max_tokens)
        case EmbedInput(texts=texts):
            return Estimate(sum(text_tokens(text) for text in texts), 0)
        case _:
            return None


def used(task: Task, prompt: int) -> int:
    """The tokens an ended task used: what its backend reported (the last attempt's usage),
    else none if it never ran, else `prompt` (its estimated input) and the output it
    produced, estimated: what a provider bills for a request cut short (cancelled while
    streaming, say), where no usage comes back."""
    if task.usage is not None:
        return task.usage.input_tokens + task.usage.output_tokens
    if task.attempt == 0:
        return 0
    return prompt + text_tokens(chat_text(task.output))
