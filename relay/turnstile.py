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

What waits here is a callback per connection whose request head is complete, nothing else; it
is dropped if the connection ends first. The count is bounded by the gate's (max_connections
and the refused ones it holds)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Turnstile:
    __slots__ = ("_loop", "_scheduled", "_used", "_waiting", "passed", "per_turn")

    def __init__(self, per_turn: int) -> None:
        #: Callbacks let through per turn of the event loop (0: no bound).
        self.per_turn = per_turn
        self._waiting: deque[Callable[[], None]] = deque()
        self._used = 0
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.passed = 0  # in all (the tests)

    def __len__(self) -> int:
        return len(self._waiting)

    def enter(self, callback: Callable[[], None]) -> None:
        """Run `callback` now if this turn has room and nobody waits, else in a later turn in
        arrival order. A callback must return quickly (the work it starts runs as tasks) and
        check that its connection is still there."""
        if self.per_turn <= 0:
            self._pass(callback)
            return
        if not self._waiting and self._used < self.per_turn:
            self._used += 1
            self._schedule()
            self._pass(callback)
            return
        self._waiting.append(callback)
        self._schedule()

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
            self._used += 1
            self._pass(self._waiting.popleft())
        if self._used:
            self._schedule()  # the next turn starts counting afresh (and serves who waits)

    def _pass(self, callback: Callable[[], None]) -> None:
        self.passed += 1
        try:
            callback()
        except Exception as exc:  # one connection's failure must not strand the others
            loop = self._loop or asyncio.get_running_loop()
            loop.call_exception_handler({"message": "connection set-up failed",
                                         "exception": exc})
