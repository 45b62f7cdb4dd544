"""Hypothesis stateful test: Alice and Bob send, deliver, drop, duplicate and reorder at random.

Every delivered message decrypts to its plaintext; a duplicate or replay is rejected and leaves
the receiver's state unchanged; a message past the skip bound is rejected with no state change.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aegisd.core import ratchet
from aegisd.core.errors import DecryptionError
from aegisd.core.session import Session
from tests.support.parties import make_pair

# Lower than the default keeps the "past the bound" rule cheap; higher than the most messages one
# run can send (40 steps x 3), so the main conversation never reaches it.
SMALL_SKIP = 150


class Conversation(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.pair = make_pair()
        self.sessions = {"alice": self.pair.a, "bob": self.pair.b}
        self.in_flight: list[tuple[str, bytes, bytes]] = []  # (receiver, block, plaintext)
        self.delivered: list[tuple[str, bytes]] = []
        self.counter = 0

    def _send(self, sender: str) -> None:
        receiver = "bob" if sender == "alice" else "alice"
        self.counter += 1
        text = f"{sender} #{self.counter}".encode()
        (block,) = self.sessions[sender].encrypt(self.pair.entropy, text)
        self.in_flight.append((receiver, block, text))

    @rule(sender=st.sampled_from(["alice", "bob"]), count=st.integers(1, 3))
    def send(self, sender: str, count: int) -> None:
        for _ in range(count):
            self._send(sender)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.in_flight) - 1))  # any order: reordering
        receiver, block, text = self.in_flight.pop(index)
        fragment = self.sessions[receiver].decrypt(self.pair.entropy, block)
        assert fragment.data == text
        self.delivered.append((receiver, block))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        receiver, block = data.draw(st.sampled_from(self.delivered))
        session = self.sessions[receiver]
        before = session.to_bytes()
        with pytest.raises(DecryptionError):
            session.decrypt(self.pair.entropy, block)
        assert session.to_bytes() == before

    @rule(sender=st.sampled_from(["alice", "bob"]))
    def past_the_skip_bound(self, sender: str) -> None:
        """On copies (the main conversation goes on): a jump beyond MAX_SKIP is refused."""
        receiver = "bob" if sender == "alice" else "alice"
        s_copy = Session.from_bytes(self.sessions[sender].to_bytes())
        r_copy = Session.from_bytes(self.sessions[receiver].to_bytes())
        blocks = [s_copy.encrypt(self.pair.entropy, b"x")[0] for _ in range(SMALL_SKIP + 2)]
        before = r_copy.to_bytes()
        with pytest.raises(DecryptionError):
            r_copy.decrypt(self.pair.entropy, blocks[-1])
        assert r_copy.to_bytes() == before

    @invariant()
    def serialisation_round_trips(self) -> None:
        if hasattr(self, "sessions"):
            for s in self.sessions.values():
                assert Session.from_bytes(s.to_bytes()).to_bytes() == s.to_bytes()


@pytest.fixture(autouse=True)
def small_skip_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratchet, "MAX_SKIP", SMALL_SKIP)


Conversation.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_conversation(small_skip_bound: None) -> None:
    Conversation.TestCase().runTest()
