"""EventHub: fan-out, bounded coalescing buffers and history for resume."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import pytest

from server.events.hub import EventHub, EventKind, TaskEvent, Watch
from server.model.task import ChatInput, ChatMessage, ChatOutput, Task, TaskSpec, TaskState

SPEC = TaskSpec(type="chat", input=ChatInput("m", (ChatMessage("user", "hi"),)))


def event(
    sequence: int, kind: EventKind = EventKind.OUTPUT, state: TaskState = TaskState.RUNNING
) -> TaskEvent:
    task = Task(
        id="t", client_id="c", spec=SPEC, state=state, created_at=0, deadline=9, sequence=sequence
    )
    return TaskEvent(kind, task, f"<{sequence}>" if kind is EventKind.OUTPUT else "")


async def drain(watch: Watch, count: int) -> list[TaskEvent]:
    events = []
    for _ in range(count):
        event = await watch.next_event()
        assert event is not None, "the watch ended early"
        events.append(event)
    return events


async def test_every_watcher_gets_every_event_in_order() -> None:
    """Two watchers of one task both receive all events, in publish order."""
    hub = EventHub()
    with hub.subscribe("t") as a, hub.subscribe("t") as b:
        for seq in range(1, 6):
            hub.publish(event(seq))
        assert [e.sequence for e in await drain(a, 5)] == [1, 2, 3, 4, 5]
        assert [e.sequence for e in await drain(b, 5)] == [1, 2, 3, 4, 5]


async def test_slow_watcher_gets_output_coalesced_but_every_state_change() -> None:
    """Past the buffer bound, deltas merge (no text lost); state changes are kept."""
    hub = EventHub(coalesce_after=2)
    with hub.subscribe("t") as watch:
        hub.publish(event(1, EventKind.STATE))
        for seq in range(2, 50):
            hub.publish(event(seq))
        hub.publish(event(50, EventKind.STATE, TaskState.SUCCEEDED))
        assert watch.pending == 3
        got = await drain(watch, 3)
    assert [e.kind for e in got] == [EventKind.STATE, EventKind.OUTPUT, EventKind.STATE]
    assert got[1].text == "".join(f"<{s}>" for s in range(2, 50))
    assert got[1].sequence == 49
    assert got[2].task.state is TaskState.SUCCEEDED


def test_history_replays_exactly_the_missed_events_or_nothing() -> None:
    """history() returns the complete run after a sequence, or None when part is gone."""
    hub = EventHub(history_per_task=10)
    for seq in range(1, 21):
        hub.publish(event(seq))
    replay = hub.history("t", 14, 20)
    assert replay is not None
    assert [e.sequence for e in replay] == [15, 16, 17, 18, 19, 20]
    assert hub.history("t", 5, 20) is None  # 6..10 fell out of the bounded history
    assert hub.history("unknown", 0, 1) is None


async def test_close_ends_every_watch() -> None:
    """Shutdown closes watches so open Streams end instead of hanging."""
    hub = EventHub()
    with hub.subscribe("t") as watch:
        hub.close()
        assert await watch.next_event() is None


def test_finished_tasks_are_forgotten_beyond_the_bound() -> None:
    """Memory stays bounded: only the newest finished tasks keep their history."""
    hub = EventHub(finished_tasks_kept=2)
    for n in range(5):
        task = Task(
            id=f"t{n}",
            client_id="c",
            spec=SPEC,
            state=TaskState.SUCCEEDED,
            created_at=0,
            deadline=9,
        )
        hub.publish(TaskEvent(EventKind.STATE, task))
    assert [hub.latest(f"t{n}") is not None for n in range(5)] == [False, False, False, True, True]


@pytest.mark.parametrize("coalesce_after", [1, 16])
async def test_unsubscribed_watch_receives_nothing(coalesce_after: int) -> None:
    """After the watcher leaves, publishing does not touch it."""
    hub = EventHub(coalesce_after=coalesce_after)
    with hub.subscribe("t") as watch:
        pass
    hub.publish(event(1))
    assert watch.pending == 0


def test_a_finished_task_keeps_one_copy_of_its_output_not_one_per_event() -> None:
    """Every event holds the task as it was then: 200 finished replies of 400 deltas each
    would keep 80,000 copies of growing text (about 90 MiB here). Finished, each keeps its
    final task only; a resume gets it as a snapshot."""
    hub = EventHub(history_per_task=256)
    tracemalloc.start()
    try:
        for n in range(200):
            text = ""
            task = Task(f"t{n}", "c", SPEC, TaskState.RUNNING, 0, 9, sequence=1)
            for sequence in range(2, 402):
                text += "word "
                task = replace(task, sequence=sequence, output=ChatOutput(text, ""))
                hub.publish(TaskEvent(EventKind.OUTPUT, task, "word "))
            hub.publish(
                TaskEvent(EventKind.STATE, replace(task, state=TaskState.SUCCEEDED, sequence=402))
            )
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 5 * 1024 * 1024, f"{held / 2**20:.1f} MiB held for 200 finished tasks"
    assert hub.history("t0", 100, 402) is None  # resumed by snapshot
    latest = hub.latest("t0")
    assert latest is not None
    assert isinstance(latest.output, ChatOutput)
    assert latest.output.text == "word " * 400


def test_a_running_task_keeps_one_copy_of_its_output_not_one_per_event() -> None:
    """A long reply still streaming: each delta's task holds the whole output so far, so a
    history of 256 such tasks would hold 256 copies of it (25 MiB for a 100 KiB reply, per
    running task). The history keeps each delta's text and number; the latest task keeps
    the output, once; a resume still replays exactly the missed deltas."""
    hub = EventHub(history_per_task=256)
    text = "x" * 100_000
    task = Task("t", "c", SPEC, TaskState.RUNNING, 0, 9, sequence=1, output=ChatOutput(text, ""))
    tracemalloc.start()
    try:
        with hub.subscribe("t") as watch:
            for sequence in range(2, 302):
                text += f"<{sequence}>"
                task = replace(task, sequence=sequence, output=ChatOutput(text, ""))
                hub.publish(TaskEvent(EventKind.OUTPUT, task, f"<{sequence}>"))
            held, _ = tracemalloc.get_traced_memory()
            assert watch.pending == 16  # a watcher that reads none: coalesced past 16
    finally:
        tracemalloc.stop()
    assert held < 2 * 1024 * 1024, f"{held / 2**20:.1f} MiB held for one running task"
    replay = hub.history("t", 250, 301)
    assert replay is not None
    assert [(e.sequence, e.text) for e in replay] == [(s, f"<{s}>") for s in range(251, 302)]
    latest = hub.latest("t")
    assert latest is not None
    assert latest.output == ChatOutput(text, "")
