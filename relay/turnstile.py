"""The turnstile new connections pass to be set up: at most `per_turn` of them per turn of the
event loop, first come first served (issue 15, item 3, scenario 3t of bench/attack.py).

Setting a connection up (aiohttp's request handler, the upgrade, the connection's state, and the
HELLO and SUBSCRIBE that follow) costs the relay's one thread about a millisecond. A connection
flood keeps dozens of them ready at once, and the event loop runs everything ready in one turn:
every established connection's frame waited for all of them (stalls of 20 to 60 ms while a flood
ramped up). Through the turnstile a turn sets up `per_turn` connections at most; the rest wait
here, in arrival order, and between two turns the loop reads the sockets and serves the frames
of established connections. A newcomer still waits for those ahead of it (as many as the flood
keeps opening at once): fairness is per connection and by kind of work, since behind Tor or a
proxy an attacker's connections and a user's look alike.

What waits here is a ticket per connection whose request head is complete, nothing else. A
connection that ends while it waits (evicted, timed out) cancels its ticket: skipped at its turn
without using up a place of it, and the deque is compacted once the cancelled ones are half of
it, so it holds at most about twice the live ones, which the gate bounds (max_connections). A
callback that finds its connection gone at its turn (a reset noticed only then) says so, and
uses up no place either."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Ticket:
    """A place in the queue; `callback` is None once cancelled."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], bool]) -> None:
        self.callback: Callable[[], bool] | None = callback


class Turnstile:
    __slots__ = ("_dead", "_loop", "_scheduled", "_used", "_waiting", "passed", "per_turn")

    def __init__(self, per_turn: int) -> None:
        #: Callbacks let through per turn of the event loop (0: no bound).
        self.per_turn = per_turn
        self._waiting: deque[Ticket] = deque()
        self._dead = 0  # cancelled tickets still in _waiting
        self._used = 0
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.passed = 0  # callbacks that did their work, in all (the tests)

    def __len__(self) -> int:
        """Live tickets waiting."""
        return len(self._waiting) - self._dead

    def enter(self, callback: Callable[[], bool]) -> Ticket | None:
        """Run `callback` now if this turn has room and nobody waits (None), else in a later
        turn in arrival order (its ticket, to cancel). A callback must return quickly (the work
        it starts runs as tasks), check that its connection is still there, and return whether
        it did anything: only those that did use up a place of the turn."""
        if self.per_turn <= 0:
            self._pass(callback)
            return None
        if not self._waiting and self._used < self.per_turn:
            self._schedule()
            if self._pass(callback):
                self._used += 1
            return None
        ticket = Ticket(callback)
        self._waiting.append(ticket)
        self._schedule()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Its connection ended while it waited."""
        if ticket.callback is None:
            return
        ticket.callback = None
        self._dead += 1
        if self._dead > len(self._waiting) // 2:
            self._waiting = deque(t for t in self._waiting if t.callback is not None)
            self._dead = 0

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            # call_soon: it runs in the loop's next turn, after the sockets have been read.
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        self._used = 0
        while self._waiting and self._used < self.per_turn:
            ticket = self._waiting.popleft()
            callback, ticket.callback = ticket.callback, None
            if callback is None:
                self._dead -= 1
            elif self._pass(callback):
                self._used += 1
        if self._used:
            self._schedule()  # the next turn starts counting afresh (and serves who waits)

    def _pass(self, callback: Callable[[], bool]) -> bool:
        try:
            did = callback()
        except Exception as exc:  # one connection's failure must not strand the others
            loop = self._loop or asyncio.get_running_loop()
            loop.call_exception_handler({"message": "connection set-up failed",
                                         "exception": exc})
            did = True  # it did work before it failed
        if did:
            self.passed += 1
        return did
