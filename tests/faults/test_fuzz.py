"""Fault injection 5: every RPC fuzzed (hypothesis) with malformed, oversized and odd-unicode
input answers only its documented error codes, the server stays SERVING, and the store
holds only complete tasks: each one Submit acknowledged, none that it rejected.

One real server per test (grpc.aio on loopback, a real SQLite file, the built-in local
executors plus the `summarize` example type, so custom input meets a real JSON Schema),
shared by all examples of that test: examples accumulate state the way a real server
does, and AdminService fuzzing cannot break the ring another test relies on.

Runs are reproducible (`derandomize=True`: the examples are a function of the test, not
of a seed or of a .hypothesis database). TASKRING_FUZZ_EXAMPLES raises the example count
for a soak run; TASKRING_FUZZ_RANDOM=1 draws new examples on every run.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client._proto.taskring.v1 import admin_pb2 as apb
from client._proto.taskring.v1 import tasks_pb2 as pb
from server.admission.validate import validate_spec
from server.api.server import MAX_MESSAGE_BYTES, READINESS_SERVICE
from server.app import App
from server.config_file import FileConfig
from server.model.task import TaskState
from server.store import codec
from tests.conftest import FAST_RETRY, ROOT, make_settings

Code = grpc.StatusCode
EXAMPLES = int(os.environ.get("TASKRING_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the first example pays for the channel's connection
    derandomize=os.environ.get("TASKRING_FUZZ_RANDOM") != "1",
    database=None,  # no .hypothesis directory: derandomized runs need no replay store
    # One server per test is the point (see the module docstring); huge strings are too.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
# A call that takes this long is a hang: DEADLINE_EXCEEDED is in no method's table.
CALL_TIMEOUT_S = 10.0

TASKS = "/taskring.v1.TaskService/"
ADMIN = "/taskring.v1.AdminService/"
IA, NF, FP, AE = (
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS,
)
# What each method may answer while the server serves, from README "The API", the proto
# comments and admin.proto. INVALID_ARGUMENT is the service-wide code for a bad field (the
# TaskService comment), so Get, Cancel and Stream have it too for an empty or overlong id
# and a bad after_sequence. UNAVAILABLE is only for shutdown or a broken store: never here.
DOCUMENTED: dict[str, frozenset[Code]] = {
    TASKS + "Submit": frozenset({IA, AE}),
    TASKS + "SubmitAndStream": frozenset({IA, AE}),
    # As a whole; each task's own refusal (ITEM_CODES) is in the reply.
    TASKS + "SubmitBatch": frozenset({IA}),
    TASKS + "Get": frozenset({IA, NF}),
    TASKS + "Cancel": frozenset({IA, NF, FP}),
    TASKS + "Stream": frozenset({IA, NF}),
    TASKS + "List": frozenset({IA}),
    TASKS + "Stats": frozenset({IA}),
    ADMIN + "ListBackends": frozenset(),
    ADMIN + "AddBackend": frozenset({IA, FP, AE}),
    ADMIN + "DrainBackend": frozenset({NF}),
    ADMIN + "ResumeBackend": frozenset({NF}),
    ADMIN + "RemoveBackend": frozenset({NF}),
}
STREAMING = frozenset({TASKS + "Stream", TASKS + "SubmitAndStream"})
# What a SubmitBatch may answer for one of its tasks, as Submit would for that task alone.
ITEM_CODES = frozenset({IA, AE})
REQUEST_TYPES: dict[str, type[Message]] = {
    TASKS + "Submit": pb.SubmitRequest,
    TASKS + "SubmitAndStream": pb.SubmitAndStreamRequest,
    TASKS + "SubmitBatch": pb.SubmitBatchRequest,
    TASKS + "Get": pb.GetRequest,
    TASKS + "Cancel": pb.CancelRequest,
    TASKS + "Stream": pb.StreamRequest,
    TASKS + "List": pb.ListRequest,
    TASKS + "Stats": pb.StatsRequest,
    ADMIN + "ListBackends": apb.ListBackendsRequest,
    ADMIN + "AddBackend": apb.AddBackendRequest,
    ADMIN + "DrainBackend": apb.DrainBackendRequest,
    ADMIN + "ResumeBackend": apb.ResumeBackendRequest,
    ADMIN + "RemoveBackend": apb.RemoveBackendRequest,
}
# grpc.aio's own answer to a request its deserializer cannot parse (bad wire format,
# invalid UTF-8 in a string, nesting past protobuf's recursion limit): the handler never
# runs, so the application cannot choose the code. grpcio 1.85 answers UNKNOWN with this
# text (the synchronous server would say INTERNAL); it is the only UNKNOWN accepted.
UNDECODABLE = (Code.UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>")

# ------------------------------------------------------------------------- strategies

ODD_TEXTS = [
    "",
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",  # right-to-left override
    "\u200f\u200e",  # RTL and LTR marks
    "\u200b\ufeff",  # zero-width space, byte order mark
    "👩‍👩‍👧‍👦🏳️‍🌈",  # ZWJ sequences
    "e\u0301\u0302\u0303\u0304",  # stacked combining marks
    "\U0010ffff\ufffd\uffff",  # the last code point, the replacement char, a non-char
    "".join(map(chr, range(0x1D518, 0x1D520))),  # Fraktur look-alikes of Latin
    "\n\r\t\x0b\x0c\x1b[31m",
    "' OR 1=1; DROP TABLE tasks; --",
    "%s%n{0}${x}",
    "../../etc/passwd",
    "#",
    "a" * 256,  # the longest key validate.py allows
    "a" * 257,
    "chat",
    "embed",
    "summarize",
    "local-echo",
    "local-hash",
    "user",
]
# Units repeated into huge strings: the multi-byte ones make 100k chars up to 400 kB.
HUGE_UNITS = ["x", "ab ", "\x00", "é", "\u0301", "😀", "\U0010ffff", "\u202e"]
HUGE_CHARS = 100_000


def _repeat(unit: str, chars: int) -> str:
    return unit * max(1, chars // len(unit))


odd = st.sampled_from(ODD_TEXTS)
short_text = st.one_of(st.text(max_size=30), odd)
# Keys, names and labels: short or at the length limits, never huge (keeps examples cheap).
keys = st.one_of(short_text, st.builds(_repeat, st.sampled_from(HUGE_UNITS), st.integers(1, 600)))
# Content fields: anything up to 100k characters.
texts = st.one_of(
    st.text(max_size=50),
    odd,
    st.lists(odd, max_size=6).map("".join),
    st.builds(_repeat, st.sampled_from(HUGE_UNITS), st.integers(1, HUGE_CHARS)),
)
INT32_EDGES = [0, 1, -1, 2, 2**31 - 1, -(2**31)]
INT64_EDGES = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63)]
int32s = st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))
int64s = st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
small_ints = st.integers(-3, 12)
float32s = st.floats(width=32)  # NaN, infinities, subnormals, -0.0 included


def enum_values(count: int) -> st.SearchStrategy[int]:
    """A proto3 enum is open: any int32 goes on the wire, not only the declared values."""
    return st.one_of(st.integers(0, count + 1), int32s)


durations = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(st.integers(-5, 100_000), st.sampled_from([315_576_000_000]), int64s),
    nanos=st.one_of(st.integers(-(10**9), 10**9), st.sampled_from([0, 2**31 - 1, -(2**31)])),
)

json_leaves = st.one_of(st.none(), st.booleans(), st.floats(), short_text, texts)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(short_text, inner, max_size=4)
    ),
    max_leaves=20,
)


def _nested(depth: int) -> dict[str, Any]:
    """{"a": {"a": ...}}: each level is three protobuf messages (Struct, map entry, Value),
    so from depth ~33 the request is past protobuf's recursion limit of 100."""
    value: dict[str, Any] = {"text": "deep."}
    for _ in range(depth):
        value = {"a": value}
    return value


def _wide(count: int) -> dict[str, Any]:
    return {f"k{i}": i for i in range(count)}


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


# Input for the `summarize` type (schema: text 1..1e6 chars, max_sentences 1..50, nothing
# else), near-valid and not, plus deep and wide objects.
custom_inputs = st.one_of(
    st.fixed_dictionaries(
        {"text": texts}, optional={"max_sentences": st.one_of(small_ints, json_values)}
    ),
    st.dictionaries(short_text, json_values, max_size=5),
    st.integers(1, 45).map(_nested),
    st.integers(0, 3000).map(_wide),
).map(_struct)

chat_messages = st.builds(
    pb.ChatMessage,
    role=st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "USER"]), short_text),
    content=texts,
)


@st.composite
def chat_inputs(draw: st.DrawFn) -> pb.ChatInput:
    chat = pb.ChatInput(model=draw(st.one_of(st.just("local-echo"), keys)))
    many = draw(st.integers(0, 19))
    if many == 0:  # past MAX_MESSAGES, cheaply
        chat.messages.extend([pb.ChatMessage(role="user", content="hi")] * 1001)
    elif many == 1:  # a thousand violations in one request
        chat.messages.extend([pb.ChatMessage(role="\u202e" * 100)] * 1000)
    else:
        chat.messages.extend(draw(st.lists(chat_messages, max_size=4)))
    params = chat.parameters
    if draw(st.booleans()):
        params.temperature = draw(float32s)
    if draw(st.booleans()):
        params.max_tokens = draw(int32s)
    if draw(st.booleans()):
        params.top_p = draw(float32s)
    params.stop.extend(draw(st.lists(keys, max_size=3)))
    return chat


@st.composite
def embed_inputs(draw: st.DrawFn) -> pb.EmbedInput:
    embed = pb.EmbedInput(model=draw(st.one_of(st.just("local-hash"), keys)))
    if draw(st.integers(0, 19)) == 0:  # past MAX_EMBED_TEXTS
        embed.texts.extend(["t"] * 2049)
    else:
        embed.texts.extend(draw(st.lists(texts, max_size=4)))
    return embed


# A small pool, so keys repeat: replays (created=false) and reuse for another task
# (ALREADY_EXISTS) both happen.
IDEMPOTENCY_KEYS = ["k1", "k2", "\x00", "\u202ek", "😀" * 64]


@st.composite
def task_specs(draw: st.DrawFn) -> pb.TaskSpec:
    spec = pb.TaskSpec()
    which = draw(st.sampled_from(["chat", "embed", "custom", "none"]))
    if which == "chat":
        spec.chat.CopyFrom(draw(chat_inputs()))
    elif which == "embed":
        spec.embed.CopyFrom(draw(embed_inputs()))
    elif which == "custom":
        spec.custom.CopyFrom(draw(custom_inputs))
    spec.type = draw(st.one_of(st.just(""), st.sampled_from(["chat", "embed", "summarize"]), keys))
    if draw(st.booleans()):
        spec.routing_key = draw(keys)
    spec.priority = draw(enum_values(4))  # type: ignore[assignment]  # open enum on purpose
    if draw(st.booleans()):
        spec.timeout.CopyFrom(draw(durations))
    spec.max_attempts = draw(st.one_of(small_ints, int32s))
    spec.idempotency_key = draw(st.one_of(st.just(""), st.sampled_from(IDEMPOTENCY_KEYS), keys))
    spec.labels.update(
        draw(st.one_of(st.dictionaries(keys, keys, max_size=4), st.integers(60, 70).map(_labels)))
    )
    return spec


def _labels(count: int) -> dict[str, str]:
    return {f"l{i}": "v" for i in range(count)}


# A task id: random text, or one of the tasks this server holds (resolved per example).
task_ids = st.one_of(
    keys, st.sampled_from(["0" * 64, "0" * 65]), st.integers(0, 50).map(lambda i: f"#known{i}")
)


def valid_page_token(cursor: int) -> str:
    """The format tasks.py writes, forged here with out-of-range cursors."""
    return base64.urlsafe_b64encode(f"v1:{cursor}".encode()).decode()


list_requests = st.builds(
    pb.ListRequest,
    states=st.lists(enum_values(5), max_size=4),
    types=st.lists(st.one_of(st.sampled_from(["chat", "embed", "summarize"]), keys), max_size=4),
    page_size=st.one_of(st.integers(-2, 1002), int32s),
    page_token=st.one_of(
        st.just(""),
        keys,
        st.builds(valid_page_token, st.one_of(int64s, st.integers(2**63, 2**70))),
        st.sampled_from(["#next"]),  # the previous page's real token
    ),
)


@st.composite
def stats_requests(draw: st.DrawFn) -> pb.StatsRequest:
    request = pb.StatsRequest()
    many = draw(st.integers(0, 9))
    if many == 0:  # past MAX_STATS_TYPES
        request.types.extend([f"t{i}" for i in range(101)])
    elif many == 1:  # a violation for each
        request.types.extend([""] * 1000)
    else:
        request.types.extend(draw(st.lists(keys, max_size=4)))
    if draw(st.booleans()):
        request.window.CopyFrom(draw(durations))
    return request


NAMES = ["local-1", "local-2", "local-3", "fuzz-1", "fuzz-2", "", "#", "a\x00b", "\u202e"]
names = st.one_of(st.sampled_from(NAMES), keys, texts)  # echoed in NOT_FOUND: huge too
backend_configs = st.builds(
    apb.BackendConfig,
    name=names,
    kind=st.one_of(st.sampled_from(["local", "remote", "openai", "anthropic", "LOCAL"]), keys),
    # Valid remote addresses point at a closed loopback port: fuzzing must not reach out.
    address=st.sampled_from(["", "127.0.0.1:1", "[::1]:1", "127.0.0.1", ":1", "h:x", "\x00:1"]),
    base_url=st.one_of(st.just(""), keys),
    weight=st.one_of(small_ints, int32s),
    max_concurrency=st.one_of(small_ints, int32s),
    task_types=st.lists(
        st.one_of(st.sampled_from(["chat", "embed", "summarize", "other"]), keys, texts),
        max_size=3,
    ),
    api_key_env=st.one_of(st.just(""), keys),
)
admin_calls = st.one_of(
    st.tuples(st.just("ListBackends"), st.builds(apb.ListBackendsRequest)),
    st.tuples(st.just("AddBackend"), st.builds(apb.AddBackendRequest, backend=backend_configs)),
    st.tuples(st.just("DrainBackend"), st.builds(apb.DrainBackendRequest, name=names)),
    st.tuples(st.just("ResumeBackend"), st.builds(apb.ResumeBackendRequest, name=names)),
    st.tuples(st.just("RemoveBackend"), st.builds(apb.RemoveBackendRequest, name=names)),
)

# Valid requests, so raw-byte mutations start near something the server would accept.
SEEDS: dict[str, bytes] = {
    TASKS + "Submit": pb.SubmitRequest(
        task=pb.TaskSpec(
            chat=pb.ChatInput(model="local-echo", messages=[pb.ChatMessage(role="user")])
        )
    ).SerializeToString(),
    TASKS + "Get": pb.GetRequest(task_id="x").SerializeToString(),
    TASKS + "List": pb.ListRequest(page_size=2, states=[pb.TASK_STATE_QUEUED]).SerializeToString(),
    TASKS + "Stats": pb.StatsRequest(
        types=["chat"], window=duration_pb2.Duration(seconds=60)
    ).SerializeToString(),
    ADMIN + "DrainBackend": apb.DrainBackendRequest(name="local-1").SerializeToString(),
}
# Two inputs of the oneof in one message: legal on the wire (the last one wins).
BOTH_INPUTS = (
    pb.SubmitRequest(task=pb.TaskSpec(chat=pb.ChatInput(model="local-echo"))).SerializeToString()
    + pb.SubmitRequest(task=pb.TaskSpec(embed=pb.EmbedInput(model="m"))).SerializeToString()
)


@st.composite
def raw_payloads(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(sorted(DOCUMENTED)))
    seed = SEEDS.get(method, SEEDS[TASKS + "Submit"])
    how = draw(st.sampled_from(["random", "flip", "truncate", "concat", "invalid-utf8"]))
    if how == "random":
        return method, draw(st.binary(max_size=300))
    if how == "flip":
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return method, bytes(data)
    if how == "truncate":
        return method, seed[: draw(st.integers(0, len(seed) - 1))]
    if how == "concat":
        return method, BOTH_INPUTS + draw(st.binary(max_size=20))
    # Field 1 (a string or message in every request but ListBackends) as invalid UTF-8.
    junk = draw(st.binary(min_size=1, max_size=20)) + b"\xff"
    return method, bytes([0x0A, len(junk)]) + junk


# --------------------------------------------------------------------------- harness


@dataclass
class Fuzz:
    """A running server, raw channel access and what the test learned about its tasks."""

    app: App
    channel: grpc.aio.Channel
    db: Path
    # Ids of the tasks a Submit acknowledged: each must be in the store at the end.
    accepted: list[str] = field(default_factory=list)
    next_page_token: str = ""

    async def call(self, method: str, request: Message) -> list[bytes]:
        return await self.call_raw(method, request.SerializeToString())

    async def call_raw(self, method: str, data: bytes) -> list[bytes]:
        """Every reply message, undecoded; raises the call's AioRpcError."""
        identity: Callable[[bytes], bytes] = _identity
        if method in STREAMING:
            stream = self.channel.unary_stream(method, identity, identity)
            return [bytes(m) async for m in stream(data, timeout=CALL_TIMEOUT_S)]
        unary = self.channel.unary_unary(method, identity, identity)
        return [bytes(await unary(data, timeout=CALL_TIMEOUT_S))]

    def rows(self) -> int:
        with _read_only(self.db) as conn:
            count: int = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
            return count

    def resolve(self, task_id: str) -> str:
        """`#knownN` names a task Submit acknowledged (if there is any yet)."""
        if task_id.startswith("#known") and self.accepted:
            return self.accepted[int(task_id[6:]) % len(self.accepted)]
        return task_id


def _identity(data: bytes) -> bytes:
    return data


def _read_only(db: Path) -> sqlite3.Connection:
    # A second connection beside the server's: WAL lets it read committed rows only.
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


@pytest.fixture
async def fuzz(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Fuzz]:
    """The server of one test; after all its examples, it must still serve and its store
    must be whole (a failure here shows as an error in the test's teardown)."""
    schemas = ROOT / "examples"
    summarize = {
        "handler": "examples.summarize:Summarizer",
        "input_schema_file": str(schemas / "summarize.input.schema.json"),
        "output_schema_file": str(schemas / "summarize.output.schema.json"),
    }
    db = tmp_path / "tasks.db"
    settings_ = dataclasses.replace(
        make_settings(db),
        file=FileConfig(task_types={"summarize": summarize}, base_dir=schemas),
    )
    app = App(settings_, dispatch=FAST_RETRY)
    await app.start()
    # Replies may be as large as the server sends (an echo of a big prompt).
    options = [("grpc.max_receive_message_length", 4 * MAX_MESSAGE_BYTES)]
    channel = grpc.aio.insecure_channel(app.address, options=options)
    try:
        running = Fuzz(app, channel, db)
        yield running
        # Admin calls change which task types the ring runs, so stored specs of types no
        # member runs any more would fail validation now: not a store problem.
        await finish(running, revalidate="admin" not in request.node.name)
    finally:
        await channel.close()
        await app.stop()


def check_error(method: str, request: bytes, error: grpc.aio.AioRpcError) -> None:
    """The error is one `method` documents; INVALID_ARGUMENT names the fields to fix."""
    code, details = error.code(), error.details() or ""
    if not _decodes(method, request):
        assert (code, details[: len(UNDECODABLE[1])]) == UNDECODABLE, (code, details)
        return
    assert code in DOCUMENTED[method], f"{method} answered {code.name}: {details}"
    if code is Code.INVALID_ARGUMENT:
        fields = violated_fields(error)
        assert fields, f"{method}: INVALID_ARGUMENT without BadRequest field violations"
        assert all(fields), f"{method}: a violation names no field: {details}"


def _decodes(method: str, data: bytes) -> bool:
    """Whether protobuf (the server's own deserializer) can parse `data` as the request."""
    try:
        REQUEST_TYPES[method].FromString(data)
    except DecodeError:
        return False
    return True


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    if status is None:
        return []
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


async def assert_serving(fuzz: Fuzz) -> None:
    health = health_pb2_grpc.HealthStub(fuzz.channel)
    for service in ("", READINESS_SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def assert_store_whole(fuzz: Fuzz, *, revalidate: bool = True) -> None:
    """Every row decodes to a complete task (a known state, a spec with a type, sequence
    >= 1); the spec still passes validation (unless admin calls changed the known types);
    every acknowledged task is there; List returns exactly the stored tasks."""
    app = fuzz.app
    with _read_only(fuzz.db) as conn:
        rows = conn.execute("SELECT id, client_id, type, state, spec, sequence FROM tasks")
        stored = {}
        for task_id, client_id, type_, state, spec_json, sequence in rows:
            spec = codec.decode_spec(spec_json)
            assert TaskState(state) in TaskState, task_id
            assert spec.type, task_id
            assert spec.type == type_, task_id
            assert sequence >= 1, task_id
            assert client_id, task_id
            if revalidate:
                known = app.dispatcher.task_types
                assert validate_spec(spec, app.settings.tasks, known, app.task_types) == spec
            task = await app.store.get(task_id)  # the server's own decoding of the row
            assert task is not None
            assert task.spec == spec
            stored[task_id] = task
    missing = set(fuzz.accepted) - set(stored)
    assert not missing, f"acknowledged tasks missing from the store: {sorted(missing)[:5]}"
    listed = [task.id for task in await list_all(fuzz)]
    assert sorted(listed) == sorted(stored), "List does not return exactly the stored tasks"


async def list_all(fuzz: Fuzz) -> list[pb.Task]:
    tasks: list[pb.Task] = []
    token = ""
    while True:
        request = pb.ListRequest(page_size=100, page_token=token)
        (reply,) = await fuzz.call(TASKS + "List", request)
        page = pb.ListResponse.FromString(reply)
        tasks += page.tasks
        token = page.next_page_token
        if not token:
            return tasks


def submit_request(spec: pb.TaskSpec) -> bytes:
    """SubmitRequest (and SubmitAndStreamRequest: the same field 1) around `spec`, encoded
    by hand: protobuf refuses to build the message around a spec nested near its depth
    limit, which is the case the server must survive."""
    payload = spec.SerializeToString()
    return b"\x0a" + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


async def submit_checked(fuzz: Fuzz, method: str, data: bytes) -> None:
    """Submit or SubmitAndStream one encoded request: an acknowledged task is stored (one
    row more when created), a rejected one leaves the store as it was."""
    before = fuzz.rows()
    try:
        replies = await fuzz.call_raw(method, data)
    except grpc.aio.AioRpcError as error:
        check_error(method, data, error)
        assert fuzz.rows() == before, f"a rejected {method} left a task behind"
        return
    if method == TASKS + "Submit":
        reply = pb.SubmitResponse.FromString(replies[0])
        task, created = reply.task, reply.created
    else:
        events = [pb.SubmitAndStreamResponse.FromString(r) for r in replies]
        task, created = events[0].event.snapshot, events[0].created
        assert all(e.created == created for e in events)
        last = events[-1].event
        final = last.snapshot if last.HasField("snapshot") else last.state_changed.task
        assert final.state in TERMINAL, "SubmitAndStream ended before the terminal state"
    assert task.id
    assert task.spec.type
    assert task.sequence >= 1
    assert fuzz.rows() == before + created, f"{method} created={created} but rows changed"
    if created:
        fuzz.accepted.append(task.id)
    else:
        assert task.id in fuzz.accepted, "a replay answered a task no Submit created"


async def submit_batch_checked(fuzz: Fuzz, specs: list[pb.TaskSpec]) -> None:
    """SubmitBatch of `specs` (encoded by hand, as submit_request): refused whole, it
    stores nothing; else each task's result is a task (one row more when created) or a
    refusal Submit documents, whose violations name that task of the batch."""
    data = b"".join(submit_request(spec) for spec in specs)  # field 1, repeated
    before = fuzz.rows()
    refused: Code | None = None
    try:
        (reply,) = await fuzz.call_raw(TASKS + "SubmitBatch", data)
    except grpc.aio.AioRpcError as error:
        check_error(TASKS + "SubmitBatch", data, error)
        refused = error.code()
    if refused is not None:
        assert fuzz.rows() == before, "a refused SubmitBatch left a task behind"
        # Only an empty batch is the call's fault; a bad task is refused in its result.
        assert refused is not IA or not specs, "a bad task made the whole batch fail"
        return
    results = pb.SubmitBatchResponse.FromString(reply).results
    assert len(results) == len(specs), "one result per task"
    created = 0
    for index, result in enumerate(results):
        if result.HasField("error"):
            code = next(c for c in Code if c.value[0] == result.error.code)
            assert code in ITEM_CODES, f"task {index} refused {code.name}: {result.error.message}"
            fields = [v.field for v in result.error.field_violations]
            if code is IA:
                assert fields, f"task {index}: INVALID_ARGUMENT without field violations"
            assert all(f.startswith(f"tasks[{index}]") for f in fields), fields
            continue
        assert result.task.id
        assert result.task.sequence >= 1
        if result.created:
            created += 1
            fuzz.accepted.append(result.task.id)
        else:
            assert result.task.id in fuzz.accepted, "a replay answered a task nobody created"
    assert fuzz.rows() == before + created, "SubmitBatch's created tasks and rows disagree"


ECHO = pb.TaskSpec(
    chat=pb.ChatInput(model="local-echo", messages=[pb.ChatMessage(role="user", content="hi")])
)
TERMINAL = frozenset({pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED})


async def call_checked(fuzz: Fuzz, method: str, request: Message) -> list[bytes]:
    data = request.SerializeToString()
    try:
        return await fuzz.call_raw(method, data)
    except grpc.aio.AioRpcError as error:
        check_error(method, data, error)
        return []


async def finish(fuzz: Fuzz, *, revalidate: bool = True) -> None:
    await assert_serving(fuzz)
    await assert_store_whole(fuzz, revalidate=revalidate)


# ------------------------------------------------------------------------------ tests


@FUZZ
@given(spec=task_specs(), stream=st.booleans(), replay=st.booleans())
async def test_fuzzed_submits_answer_documented_codes_and_store_only_whole_tasks(
    fuzz: Fuzz, spec: pb.TaskSpec, stream: bool, replay: bool
) -> None:
    """Submit and SubmitAndStream with odd specs: INVALID_ARGUMENT (naming fields) or
    ALREADY_EXISTS, or a stored task; a replay of an acknowledged keyed Submit is
    answered with the same task, created=false."""
    method = TASKS + ("SubmitAndStream" if stream else "Submit")
    request = submit_request(spec)
    await submit_checked(fuzz, method, request)
    if replay and spec.idempotency_key:
        before = len(fuzz.accepted)
        await submit_checked(fuzz, TASKS + "Submit", request)
        assert len(fuzz.accepted) == before, "a replay with the same key created a task"
    await assert_serving(fuzz)


@FUZZ
@given(specs=st.lists(task_specs(), max_size=4), again=st.booleans())
async def test_fuzzed_batches_answer_per_task_and_store_only_whole_tasks(
    fuzz: Fuzz, specs: list[pb.TaskSpec], again: bool
) -> None:
    """SubmitBatch of odd specs (none too): a result per task, each a stored task or its
    own documented refusal; sent again, its keyed tasks replay."""
    await submit_batch_checked(fuzz, specs)
    if again:
        await submit_batch_checked(fuzz, specs)
    await assert_serving(fuzz)


@FUZZ
@given(
    method=st.sampled_from(["Get", "Cancel", "Stream"]),
    task_id=task_ids,
    after_sequence=st.one_of(small_ints, int64s),
    fresh=st.booleans(),
)
async def test_fuzzed_task_calls_answer_documented_codes(
    fuzz: Fuzz, method: str, task_id: str, after_sequence: int, fresh: bool
) -> None:
    """Get, Cancel and Stream with odd ids and sequences, on unknown, finished and
    just-submitted tasks (Cancel and Stream race the run)."""
    if fresh:
        await submit_checked(fuzz, TASKS + "Submit", submit_request(ECHO))
        task_id = "#known-1"
    task_id = fuzz.resolve(task_id)
    request: Message
    if method == "Get":
        request = pb.GetRequest(task_id=task_id)
    elif method == "Cancel":
        request = pb.CancelRequest(task_id=task_id)
    else:
        request = pb.StreamRequest(task_id=task_id, after_sequence=after_sequence)
    replies = await call_checked(fuzz, TASKS + method, request)
    if method == "Stream" and replies:
        last = pb.StreamResponse.FromString(replies[-1])
        final = last.snapshot if last.HasField("snapshot") else last.state_changed.task
        assert final.state in TERMINAL, "Stream ended before the terminal state"


@FUZZ
@given(request=list_requests, stats=stats_requests(), use_stats=st.booleans())
async def test_fuzzed_list_and_stats_answer_documented_codes(
    fuzz: Fuzz, request: pb.ListRequest, stats: pb.StatsRequest, use_stats: bool
) -> None:
    """List (states, types, page sizes and forged tokens) and Stats (types, windows)."""
    if not fuzz.accepted:  # something to list: a few tasks of each built-in kind
        for _ in range(3):
            for spec in (ECHO, pb.TaskSpec(embed=pb.EmbedInput(model="local-hash", texts=["a"]))):
                await submit_checked(fuzz, TASKS + "Submit", submit_request(spec))
    if use_stats:
        await call_checked(fuzz, TASKS + "Stats", stats)
        return
    if request.page_token == "#next":
        request.page_token = fuzz.next_page_token
    replies = await call_checked(fuzz, TASKS + "List", request)
    if replies:
        page = pb.ListResponse.FromString(replies[0])
        assert len(page.tasks) <= (request.page_size or 50)
        fuzz.next_page_token = page.next_page_token


@FUZZ
@given(calls=st.lists(admin_calls, min_size=1, max_size=4))
async def test_fuzzed_admin_calls_keep_the_ring(
    fuzz: Fuzz, calls: list[tuple[str, Message]]
) -> None:
    """AdminService with odd names and configs: NOT_FOUND, INVALID_ARGUMENT (naming the
    field), FAILED_PRECONDITION or ALREADY_EXISTS; ListBackends always answers."""
    for method, request in calls:
        await call_checked(fuzz, ADMIN + method, request)
    (reply,) = await fuzz.call(ADMIN + "ListBackends", apb.ListBackendsRequest())
    members = apb.ListBackendsResponse.FromString(reply).backends
    assert len({m.config.name for m in members}) == len(members)


@FUZZ
@given(payload=raw_payloads())
async def test_undecodable_requests_get_grpcs_own_error(
    fuzz: Fuzz, payload: tuple[str, bytes]
) -> None:
    """Bytes that are not the method's request message answer grpc's deserializer error
    (UNKNOWN, see UNDECODABLE); bytes that happen to parse, a documented code or a reply."""
    method, data = payload
    before = fuzz.rows()
    try:
        replies = await fuzz.call_raw(method, data)
    except grpc.aio.AioRpcError as error:
        check_error(method, data, error)
        assert fuzz.rows() == before or method not in _SUBMITS
        return
    assert _decodes(method, data), "the server answered a request protobuf cannot parse"
    if method in _SUBMITS and replies:
        if method == TASKS + "Submit":
            reply = pb.SubmitResponse.FromString(replies[0])
            submitted = [(reply.task, reply.created)]
        elif method == TASKS + "SubmitBatch":
            results = pb.SubmitBatchResponse.FromString(replies[0]).results
            submitted = [(r.task, r.created) for r in results if r.HasField("task")]
        else:
            first = pb.SubmitAndStreamResponse.FromString(replies[0])
            submitted = [(first.event.snapshot, first.created)]
        fuzz.accepted += [task.id for task, created in submitted if created]


_SUBMITS = frozenset({TASKS + "Submit", TASKS + "SubmitAndStream", TASKS + "SubmitBatch"})


async def test_requests_over_the_size_limit_get_resource_exhausted(fuzz: Fuzz) -> None:
    """A request past the server's 16 MiB receive limit is refused by grpc itself with
    RESOURCE_EXHAUSTED, stores nothing, and the server keeps serving."""
    content = "x" * 999_000
    spec = pb.TaskSpec(
        chat=pb.ChatInput(
            model="local-echo",
            messages=[pb.ChatMessage(role="user", content=content) for _ in range(18)],
        )
    )
    for method in _SUBMITS:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fuzz.call(method, pb.SubmitRequest(task=spec))
        assert raised.value.code() is Code.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await fuzz.call(TASKS + "Get", pb.GetRequest(task_id="x" * (MAX_MESSAGE_BYTES + 1)))
    assert raised.value.code() is Code.RESOURCE_EXHAUSTED
    assert fuzz.rows() == 0


async def test_rejections_with_many_or_huge_violations_fit_in_the_trailers(fuzz: Fuzz) -> None:
    """Regression (found by this fuzzing): errors that quoted every bad value in full, or
    listed a violation per bad item, outgrew grpc's 8 KiB trailer limit and reached the
    client as RESOURCE_EXHAUSTED "Stream removed" instead of their own code."""
    huge = "😀" * HUGE_CHARS
    spec = pb.TaskSpec(
        type=huge,
        chat=pb.ChatInput(model="m", messages=[pb.ChatMessage(role=huge[:100])] * 1000),
        labels={huge[:i]: "" for i in range(300, 364)},
    )
    calls: list[tuple[str, bytes]] = [
        (TASKS + "Submit", submit_request(spec)),
        (TASKS + "Stats", pb.StatsRequest(types=[""] * 1000).SerializeToString()),
        (ADMIN + "DrainBackend", apb.DrainBackendRequest(name=huge).SerializeToString()),
        (
            ADMIN + "AddBackend",
            apb.AddBackendRequest(
                backend=apb.BackendConfig(name="n", kind="openai", task_types=[huge] * 10)
            ).SerializeToString(),
        ),
    ]
    for method, data in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fuzz.call_raw(method, data)
        check_error(method, data, raised.value)
        trailers = raised.value.trailing_metadata() or ()
        size = sum(len(key) + len(value) for key, value in trailers)
        size += len((raised.value.details() or "").encode())
        assert size < 4096, f"{method}: {size} bytes of trailers"


async def test_add_backend_with_an_empty_task_type_is_invalid_argument(fuzz: Fuzz) -> None:
    """Regression (found by this fuzzing): task_types [""] passed AddBackend's checks and
    the ring's ValueError escaped as UNKNOWN, with the exception's text."""
    request = apb.AddBackendRequest(backend=apb.BackendConfig(name="e", kind="local"))
    request.backend.task_types.append("")
    data = request.SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await fuzz.call_raw(ADMIN + "AddBackend", data)
    check_error(ADMIN + "AddBackend", data, raised.value)
    assert violated_fields(raised.value) == ["backend.task_types"]
