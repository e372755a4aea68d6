"""The ring's members as the dispatcher sees them: the backends, which of them may take
work now, and why not.

A member takes new work while it is healthy (its executor's health watch says SERVING),
its circuit is not open, it is not draining and not held (a 429's retry-after). The
Balancer skips the others, so only their keys move, and the keys come back when they
recover. Outcomes of attempts feed the circuit breaker here; health watches feed it from
the side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.backends.base import Backend, BackendError
from server.backends.factory import close_backend
from server.backends.remote import RemoteBackend
from server.clock import Clock
from server.model.task import Task
from server.routing.balancer import Balancer, MemberStatus, PoolMember
from server.routing.health import HealthWatcher
from server.routing.keys import routing_key

from .circuit import CircuitBreaker, CircuitSettings, CircuitState

_log = logging.getLogger(__name__)


class MembershipError(Exception):
    """An invalid change of membership (unknown or duplicate name); the message says which."""


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member for operators: the balancer's view plus health and circuit."""

    status: MemberStatus
    backend: Backend
    health_ok: bool
    circuit: CircuitState
    consecutive_failures: int


class Members:
    def __init__(
        self,
        members: Iterable[tuple[Backend, int]],
        *,
        load_factor: float | None,
        clock: Clock,
        circuit: CircuitSettings,
    ) -> None:
        """`members` are (backend, weight) pairs; `load_factor` bounds each member's load
        at that multiple of its share (None: no bound)."""
        members = list(members)
        # Built with every member at once: adding them one by one rebuilds the rings each time.
        self._balancer = Balancer(
            [PoolMember(b.name, b.task_types, b.max_concurrency, w) for b, w in members],
            load_factor=load_factor,
            clock=clock,
        )
        self._clock = clock
        self._circuit_settings = circuit
        # Called when a member may have become able to take work (it recovered, its
        # circuit half-opened, its hold ended); the dispatcher sets it to look again.
        self.on_available: Callable[[], None] = lambda: None
        self.backends: dict[str, Backend] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._health_ok: dict[str, bool] = {}
        # What the balancer was last told: whether each member may take work.
        self._available: dict[str, bool] = {}
        # Members whose half-open circuit lets one trial attempt through, now running.
        self._trials: set[str] = set()
        self._watchers: dict[str, HealthWatcher] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Removed members still finishing attempts: how many each has left.
        self._leaving: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()  # strong references until done
        self._started = False
        for backend, _ in members:
            self._track(backend)

    # -- membership ------------------------------------------------------------------------

    def add(self, backend: Backend, weight: int = 1) -> None:
        if backend.name in self.backends:
            raise MembershipError(f"a backend named {backend.name!r} is already on the ring")
        self._balancer.add(
            PoolMember(backend.name, backend.task_types, backend.max_concurrency, weight)
        )
        self._track(backend)
        self.on_available()

    def _track(self, backend: Backend) -> None:
        self.backends[backend.name] = backend
        self._breakers[backend.name] = CircuitBreaker(self._circuit_settings)
        self._health_ok[backend.name] = True
        if isinstance(backend, RemoteBackend):
            self._watchers[backend.name] = HealthWatcher(
                backend.name, backend.channel, self._health_changed
            )
            if self._started:
                self._watchers[backend.name].start()

    def start(self) -> None:
        """Starts the health watches (inside the event loop)."""
        self._started = True
        for watcher in self._watchers.values():
            watcher.start()

    def drain(self, name: str) -> None:
        self._known(name)
        self._balancer.drain(name)

    def resume(self, name: str) -> None:
        self._known(name)
        self._balancer.undrain(name)
        self.on_available()

    async def remove(self, name: str) -> MemberView:
        """Takes a member off the ring; it is closed once its last attempt releases it."""
        view = self.view(name)
        # Everything up to the first await happens at once: from here the name is gone for
        # routing and operators, and releases of its running attempts count down.
        self._balancer.remove(name)
        self._leaving[name] = view.status.load
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            await watcher.stop()
        if self._leaving.get(name) == 0:  # nothing was running: close it now
            del self._leaving[name]
            await self._forget(name)
        return view

    async def _forget(self, name: str) -> None:
        backend = self.backends.pop(name)
        self._breakers.pop(name, None)
        self._health_ok.pop(name, None)
        self._available.pop(name, None)
        self._trials.discard(name)
        await close_backend(backend)

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing)
        for watcher in self._watchers.values():
            await watcher.stop()
        for timer in self._timers.values():
            timer.cancel()
        for backend in self.backends.values():
            await close_backend(backend)

    def _known(self, name: str) -> None:
        if name not in self.backends or name in self._leaving:
            raise MembershipError(f"no backend named {name!r} on the ring")

    # -- routing ---------------------------------------------------------------------------

    @property
    def task_types(self) -> frozenset[str]:
        return self._balancer.task_types

    def free_slots(self) -> int:
        return self._balancer.free_slots()

    def types_with_room(self) -> frozenset[str]:
        return self._balancer.types_with_room()

    def acquire(self, task: Task) -> str | None:
        """Reserves a slot on the member that should run `task` now; None if none can."""
        name = self._balancer.acquire(task.spec.type, routing_key(task), task.attempt)
        if name is not None and name not in self._trials:
            breaker = self._breakers[name]
            if breaker.state(self._clock.now()) is CircuitState.HALF_OPEN:
                # One trial at a time: the member takes nothing more until it ends.
                self._trials.add(name)
                self._refresh(name)
        return name

    def release(self, name: str) -> None:
        self._balancer.release(name)
        if name in self._trials:
            # The trial ended without an outcome (cancelled, deadline, shutdown): let the
            # next attempt be the trial instead of leaving the member out for good.
            self._trials.discard(name)
            if name not in self._leaving:
                self._refresh(name)
        if name in self._leaving:
            self._leaving[name] -= 1
            if self._leaving[name] == 0:
                del self._leaving[name]
                closing = asyncio.get_running_loop().create_task(self._forget(name))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    # -- outcomes --------------------------------------------------------------------------

    def succeeded(self, name: str) -> None:
        breaker = self._breakers.get(name)
        if breaker is None or name in self._leaving:
            return  # removed meanwhile: its outcomes no longer matter
        if name not in self._trials and breaker.consecutive_failures == 0:
            return  # the common case: a healthy member stays as it was
        self._trials.discard(name)
        if breaker.success():
            _log.info("backend %s: circuit closed", name)
        self._refresh(name)

    def failed(self, name: str, error: BackendError | None) -> None:
        """An attempt on `name` failed; `error` None means the backend timed out."""
        breaker = self._breakers.get(name)
        if breaker is None or name in self._leaving:
            return  # removed meanwhile: its outcomes no longer matter
        if error is not None and error.retry_after_s is not None:
            # Asked for a pause: honour it, and it is not a failure of the backend.
            until = self._clock.now() + error.retry_after_s
            self._balancer.hold(name, until)
            self._wake_at(name, error.retry_after_s)
        if error is not None and not error.backend_fault:
            self._trials.discard(name)  # the trial said nothing about the backend
            self._refresh(name)
            return
        self._trials.discard(name)
        if breaker.failure(self._clock.now()):
            _log.warning(
                "backend %s: circuit open after %d failures; retrying in %.0fs",
                name,
                breaker.consecutive_failures,
                self._circuit_settings.reset_timeout_s,
            )
            self._wake_at(name, self._circuit_settings.reset_timeout_s)
        self._refresh(name)

    def tick(self) -> None:
        """Half-opens circuits whose reset timeout has passed by the clock. Timers do this
        on time; this periodic look (the dispatcher's sweep) follows an injected clock and
        is the safety net should a timer be lost."""
        now = self._clock.now()
        for name, breaker in self._breakers.items():
            reopens_at = breaker.reopens_at
            if reopens_at is not None and reopens_at <= now and name not in self._leaving:
                self._refresh(name)

    def _health_changed(self, name: str, healthy: bool) -> None:
        if name in self._health_ok:
            self._health_ok[name] = healthy
            if healthy:
                # Back up: an open circuit need not wait out its reset timeout; one trial
                # attempt decides.
                self._breakers[name].half_open()
            self._refresh(name)

    def _refresh(self, name: str) -> None:
        """Tells the balancer whether `name` may take work, from health and circuit."""
        breaker = self._breakers[name]
        state = breaker.state(self._clock.now())
        ok = (
            self._health_ok[name]
            and state is not CircuitState.OPEN
            and not (state is CircuitState.HALF_OPEN and name in self._trials)
        )
        if ok == self._available.get(name, True):
            return  # nothing changed: no balancer update, no extra look at the queue
        self._available[name] = ok
        self._balancer.set_healthy(name, ok)
        if ok:
            self.on_available()

    def _wake_at(self, name: str, delay_s: float) -> None:
        """Looks at `name` again after `delay_s` (a circuit half-opens, a hold ends)."""
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()

        def wake() -> None:
            self._timers.pop(name, None)
            if name not in self._breakers or name in self._leaving:
                return
            # One timer per member: a hold's may have replaced an open circuit's, so look
            # again when the circuit is due to half-open.
            reopens_at = self._breakers[name].reopens_at
            now = self._clock.now()
            if reopens_at is not None and reopens_at > now:
                self._wake_at(name, reopens_at - now)
            self._refresh(name)
            self.on_available()  # a hold may have ended, which _refresh does not see

        self._timers[name] = asyncio.get_running_loop().call_later(delay_s, wake)

    # -- operators -------------------------------------------------------------------------

    def view(self, name: str) -> MemberView:
        self._known(name)
        view = next((v for v in self.views() if v.status.name == name), None)
        if view is None:
            raise MembershipError(f"no backend named {name!r} on the ring")
        return view

    def views(self, names: Iterable[str] | None = None) -> list[MemberView]:
        now = self._clock.now()
        wanted = None if names is None else set(names)
        return [
            MemberView(
                status=status,
                backend=self.backends[status.name],
                health_ok=self._health_ok.get(status.name, True),
                circuit=self._breakers[status.name].state(now),
                consecutive_failures=self._breakers[status.name].consecutive_failures,
            )
            for status in self._balancer.snapshot()
            if status.name in self.backends
            and status.name not in self._leaving
            and status.name in self._breakers
            and (wanted is None or status.name in wanted)
        ]
