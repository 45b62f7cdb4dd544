"""The workload: a seeded random contact graph and message schedule, and when users go away.

Times are seconds from the start of the messaging phase. Every active pair exchanges at least
`min_messages` texts, in bursts (a conversation: a few texts back and forth, a few seconds
apart); idle pairs are contacts that never write. Each user goes offline (its daemon stopped)
`offline` times for a while; what it would have sent meanwhile leaves when it is back.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Params:
    users: int = 6
    pairs: int = 7
    idle_fraction: float = 1 / 3  # at least this share of the pairs never write
    min_messages: int = 10  # per active pair, over the run
    max_messages: int = 40
    duration: float = 120.0  # seconds of messaging
    burst: tuple[int, int] = (2, 8)  # texts per burst
    gap: float = 3.0  # mean seconds between two texts of a burst (exponential, 0.3 s at least)
    offline: int = 1  # times each user goes offline
    offline_length: tuple[float, float] = (6.0, 15.0)
    groups: int = 0  # groups of members who are all contacts (missing pairs added, idle)
    group_size: tuple[int, int] = (3, 4)
    group_messages: tuple[int, int] = (10, 40)  # per group over the run

    def scaled(self, scale: float) -> Params:
        """`scale` times the observation: longer, with as many more messages and absences
        (the same rates)."""
        return Params(
            self.users, self.pairs, self.idle_fraction,
            max(1, round(self.min_messages * scale)), max(1, round(self.max_messages * scale)),
            self.duration * scale, self.burst, self.gap, round(self.offline * scale),
            self.offline_length, self.groups, self.group_size,
            (max(1, round(self.group_messages[0] * scale)),
             max(1, round(self.group_messages[1] * scale))),
        )  # fmt: skip


@dataclass(frozen=True)
class Send:
    t: float
    sender: str
    recipient: str


@dataclass(frozen=True)
class Away:
    t: float
    user: str
    length: float


@dataclass
class Workload:
    users: list[str]
    pairs: list[tuple[str, str]]  # (adder, invitee): the adder uses the invitee's invitation
    active: list[tuple[str, str]]
    sends: list[Send] = field(default_factory=list)
    away: list[Away] = field(default_factory=list)
    duration: float = 0.0
    groups: list[list[str]] = field(default_factory=list)  # a Send to "#i" goes to groups[i]

    def events(self, user: str) -> list[Send | Away]:
        """One user's own events in time order: what it sends, and when it goes away."""
        mine: list[Send | Away] = [s for s in self.sends if s.sender == user]
        mine += [a for a in self.away if a.user == user]
        return sorted(mine, key=lambda e: e.t)


def user_names(n: int) -> list[str]:
    return [f"u{i + 1}" for i in range(n)]


def make(p: Params, seed: int) -> Workload:
    rng = random.Random(seed)
    users = user_names(p.users)
    every = list(itertools.combinations(users, 2))
    if not 1 <= p.pairs <= len(every):
        raise ValueError(f"--pairs must be between 1 and {len(every)} for {p.users} users")
    # Prefer a graph where everyone has a contact, when there are enough pairs for that.
    for _ in range(200):
        chosen = rng.sample(every, p.pairs)
        if p.pairs * 2 < p.users or {u for pair in chosen for u in pair} == set(users):
            break
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen]
    n_idle = min(p.pairs - 1, math.ceil(p.pairs * p.idle_fraction - 1e-9)) if p.pairs > 1 else 0
    idle = set(rng.sample(range(p.pairs), n_idle))
    active = [pair for i, pair in enumerate(pairs) if i not in idle]
    w = Workload(users, pairs, active, duration=p.duration)

    for a, b in active:
        total = rng.randint(p.min_messages, max(p.min_messages, p.max_messages))
        while total > 0:
            size = min(total, rng.randint(*p.burst))
            total -= size
            t = rng.uniform(0.0, p.duration * 0.9)
            sender = rng.choice((a, b))
            for _ in range(size):
                w.sends.append(Send(round(min(t, p.duration), 3), sender,
                                    b if sender == a else a))  # fmt: skip
                t += max(0.3, min(4 * p.gap, rng.expovariate(1 / p.gap)))
                if rng.random() < 0.65:
                    sender = b if sender == a else a
    w.sends.sort(key=lambda s: s.t)

    for u in users:
        taken: list[tuple[float, float]] = []
        for _ in range(p.offline):
            for _ in range(100):
                length = rng.uniform(*p.offline_length)
                t = rng.uniform(0.05 * p.duration, max(0.05 * p.duration, 0.85 * p.duration
                                                       - length))  # fmt: skip
                if all(t + length + 2 < s or e + 2 < t for s, e in taken):
                    taken.append((t, t + length))
                    w.away.append(Away(round(t, 3), u, round(length, 3)))
                    break
    w.away.sort(key=lambda x: x.t)

    # Groups last, so that a workload without them is the one the same seed always made.
    for gi in range(p.groups):
        members = rng.sample(users, min(p.users, rng.randint(*p.group_size)))
        w.groups.append(members)
        known = {frozenset(pair) for pair in w.pairs}
        for a, b in itertools.combinations(members, 2):
            if frozenset((a, b)) not in known:
                w.pairs.append((a, b))  # idle contacts: a group's members are contacts here
        total = rng.randint(*p.group_messages)
        while total > 0:
            size = min(total, rng.randint(*p.burst))
            total -= size
            t = rng.uniform(0.0, p.duration * 0.9)
            for _ in range(size):
                w.sends.append(Send(round(min(t, p.duration), 3), rng.choice(members), f"#{gi}"))
                t += max(0.3, min(4 * p.gap, rng.expovariate(1 / p.gap)))
    w.sends.sort(key=lambda s: s.t)
    return w
