"""Local HTTP servers that speak the OpenAI and Anthropic wire formats, for tests and bench/.

async with FakeOpenAI() as fake:
    fake.script(Fail(429, headers={"retry-after": "7"}))  # the next request
    fake.for_model("broken", Fail(500))                   # every request for a model
    ...                                                   # fake.requests records them
"""

from .anthropic_server import FakeAnthropic
from .openai_server import FakeOpenAI
from .scripted import BreakStream, Fail, Hang, RecordedRequest, Reply, tokens

__all__ = [
    "BreakStream",
    "Fail",
    "FakeAnthropic",
    "FakeOpenAI",
    "Hang",
    "RecordedRequest",
    "Reply",
    "tokens",
]
