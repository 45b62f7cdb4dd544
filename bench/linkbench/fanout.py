"""Group inference from fan-out timing, as the relay sees it (issue 16): `linkage.py --groups`.

A simulation, not a run of daemons: a day of a population with groups is far beyond what the
machine runs in real daemons, and at the default level a mailbox's slot comes every 20 minutes,
so compressing the day would change what the spread is measured against. What each deposit's
moment is follows the daemon (aegisd/services/delivery.py, cover.py, groups.py):

- Every pairwise session (a contact, or two members who are not contacts: a group contact) has
  one receiving mailbox at each end; a block from x to y is deposited into y's mailbox for x.
- **Cover off**: a one-to-one text leaves at once; its delivery receipt comes back into the
  sender's mailbox after a random 0.5 to 3 s (`privacy.receipt_delay_max`). A group message is
  one `enqueue` for every other member: each copy leaves after its own uniform draw in
  [0, spread] (`privacy.group_spread_max`; 0: all at once, destinations served concurrently, a
  few milliseconds apart), and each member's receipt comes back 0.5 to 3 s after its copy.
- **Cover on** (`default`, a mean interval of 1,200 s per session): each mailbox receives one
  deposit at each tick of its sender's Poisson process, whatever is sent; a real block (a text,
  a group copy, a receipt) waits for its session's next tick and takes a cover block's place.
  The spread does not apply (each copy already waits for its own member's slot). Gap filling
  and the pool's loop cover add deposits that depend on ticks only, not on what is sent; they
  are left out.
- Everyone is online all day; mailbox rotations (weekly) are left out. Addresses are hidden
  (Tor with isolation, `hidden` in linkage.py): without Tor the depositor's address already
  names who writes to which mailbox, and the members of a group are then a clique of that
  graph whatever the timing.

The attack: for every pair of mailboxes, the number of pairs of their deposits at most w
seconds apart, against what two independent streams of those sizes would give
(z = (C - E) / sqrt(E + 1), E = n_a n_b 2w / T), for each window w; the relay operator does not
know the spread, so every window is reported and the best after the fact (with the truth in
hand) stands for the attack. Truth: two mailboxes belong to one group when both ends of both
are members of a group. The two mailboxes of one session are left out of the pairs scored
(whether two mailboxes are one conversation is the contact graph's question, §4.3). Figures:
precision at k (k = the true pairs) and AUC, against random guessing and against the same day
without group messages.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field

from . import adversary, metrics
from .metrics import auc, precision_at_k, random_p95
from .world import RunData

WINDOWS = (0.05, 0.5, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1200.0)
RECEIPT_DELAY = (0.5, 3.0)  # aegisd/services/delivery.py: RECEIPT_DELAY_MAX, its floor
CONCURRENT = 0.02  # seconds across which one pass's concurrent deposits land (spread 0)

Session = tuple[str, str]  # (a, b) with a < b
Mailbox = tuple[str, str]  # (sender, owner): the owner's receiving mailbox for the sender


@dataclass(frozen=True)
class Params:
    users: int = 24
    contacts: int = 48  # contact pairs
    idle_fraction: float = 1 / 3
    groups: tuple[int, int, int] = (4, 3, 8)  # how many, smallest, largest
    texts: tuple[int, int] = (10, 40)  # per active contact pair per day
    group_texts: tuple[int, int] = (10, 40)  # per group per day
    burst: tuple[int, int] = (2, 8)
    gap: float = 20.0  # mean seconds between two texts of a burst
    duration: float = 86_400.0
    interval: float = 1_200.0  # the default level's mean slot interval


@dataclass(frozen=True)
class Send:
    t: float
    sender: str
    to: tuple[str, ...]  # one contact, or every other member of a group


@dataclass
class Population:
    sessions: list[Session]
    groups: list[list[str]]
    sends: list[Send] = field(default_factory=list)  # one-to-one and group, in time order
    group_sends: int = 0


def _session(a: str, b: str) -> Session:
    return (a, b) if a < b else (b, a)


def _bursts(rng: random.Random, n: int, p: Params) -> list[float]:
    times: list[float] = []
    while len(times) < n:
        t = rng.uniform(0, p.duration * 0.95)
        for _ in range(min(rng.randint(*p.burst), n - len(times))):
            times.append(min(t, p.duration))
            t += max(0.3, rng.expovariate(1 / p.gap))
    return times


def make(p: Params, seed: int) -> Population:
    rng = random.Random(seed)
    users = [f"u{i + 1}" for i in range(p.users)]
    pairs = rng.sample(list(itertools.combinations(users, 2)), p.contacts)
    active = pairs[: p.contacts - math.ceil(p.contacts * p.idle_fraction)]
    groups = [rng.sample(users, rng.randint(p.groups[1], p.groups[2])) for _ in range(p.groups[0])]
    sessions = set(pairs)
    for g in groups:  # members who are not contacts get a session of their own (§25.7)
        sessions |= {_session(a, b) for a, b in itertools.combinations(g, 2)}
    pop = Population(sorted(sessions), groups)
    for a, b in active:
        for t in _bursts(rng, rng.randint(*p.texts), p):
            s, r = (a, b) if rng.random() < 0.5 else (b, a)
            pop.sends.append(Send(t, s, (r,)))
    for g in groups:
        for t in _bursts(rng, rng.randint(*p.group_texts), p):
            s = rng.choice(g)
            pop.sends.append(Send(t, s, tuple(m for m in g if m != s)))
            pop.group_sends += 1
    pop.sends.sort(key=lambda x: x.t)
    return pop


@dataclass
class Relay:
    """What the relay sees (deposit times per mailbox), and the group copies' extra delay."""

    deposits: dict[Mailbox, list[float]]
    per_member: list[float]  # seconds from the send until a member's copy is deposited
    until_last: list[float]  # ... until the last member's


def deposits(pop: Population, p: Params, cover: bool, spread: float, seed: int,
             with_groups: bool = True) -> Relay:  # fmt: skip
    rng = random.Random(seed * 7919 + int(spread * 1000) + (1 if cover else 0))
    # (time, mailbox, send index or -1): every real block, at the moment it is queued
    real: list[tuple[float, Mailbox, int]] = []
    for i, s in enumerate(pop.sends):
        if len(s.to) > 1 and not with_groups:
            continue
        group = len(s.to) > 1
        for m in s.to:
            if cover:
                t = s.t  # waits for the slot below
            elif group:
                t = s.t + (rng.uniform(0, spread) if spread > 0 else rng.uniform(0, CONCURRENT))
            else:
                t = s.t
            real.append((t, (s.sender, m), i if group else -1))
            if not cover:  # the receipt follows the copy's arrival
                real.append((t + rng.uniform(*RECEIPT_DELAY), (m, s.sender), -1))
    out: dict[Mailbox, list[float]] = {}
    left: dict[int, list[float]] = {}
    if not cover:
        for t, mb, i in real:
            out.setdefault(mb, []).append(t)
            if i >= 0:
                left.setdefault(i, []).append(t - pop.sends[i].t)
    else:
        queued: dict[Mailbox, list[tuple[float, int]]] = {}
        for t, mb, i in sorted(real):
            queued.setdefault(mb, []).append((t, i))
        for a, b in pop.sessions:
            for mb in ((a, b), (b, a)):
                # Ticks past the day too: a copy sent late still gets its wait measured.
                ticks, t = [], rng.expovariate(1 / p.interval)
                while t < p.duration + 20 * p.interval:
                    ticks.append(t)
                    t += rng.expovariate(1 / p.interval)
                out[mb] = [x for x in ticks if x < p.duration]
                # The oldest waiting block takes each tick; receipts with cover on ride the
                # other direction's ticks and do not change any deposit's moment.
                waiting = sorted(queued.get(mb, []))
                j = 0
                for tick in ticks:
                    if j < len(waiting) and waiting[j][0] <= tick:
                        if waiting[j][1] >= 0:
                            i = waiting[j][1]
                            left.setdefault(i, []).append(tick - pop.sends[i].t)
                        j += 1
    for v in out.values():
        v.sort()
    per_member = [d for ds in left.values() for d in ds]
    until_last = [max(ds) for i, ds in left.items() if len(ds) == len(pop.sends[i].to)]
    return Relay(out, per_member, until_last)


def co_occurrence(dep: dict[Mailbox, list[float]], w: float, T: float,
                  pairs: list[tuple[Mailbox, Mailbox]]) -> list[float]:  # fmt: skip
    """The attack's score of each pair at window w: coincidences above chance."""
    events = sorted((t, mb) for mb, ts in dep.items() for t in ts)
    times = [t for t, _ in events]
    count: Counter[tuple[Mailbox, Mailbox]] = Counter()
    for i, (t, a) in enumerate(events):
        for j in range(i + 1, bisect.bisect_right(times, t + w, lo=i + 1)):
            b = events[j][1]
            if a != b:
                count[(a, b) if a < b else (b, a)] += 1
    scores = []
    for a, b in pairs:
        e = len(dep.get(a, ())) * len(dep.get(b, ())) * 2 * w / T
        scores.append((count[(a, b)] - e) / math.sqrt(e + 1))
    return scores


def universe(pop: Population) -> tuple[list[tuple[Mailbox, Mailbox]], list[bool]]:
    return _universe(sorted(mb for a, b in pop.sessions for mb in ((a, b), (b, a))), pop.groups)


def _universe(boxes: list[Mailbox], groups: list[list[str]]
              ) -> tuple[list[tuple[Mailbox, Mailbox]], list[bool]]:  # fmt: skip
    pairs = [(x, y) for x, y in itertools.combinations(boxes, 2) if set(x) != set(y)]
    truth = [any(set(x) <= set(g) and set(y) <= set(g) for g in groups) for x, y in pairs]
    return pairs, truth


REAL_WINDOWS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def from_run(data: RunData) -> Figures | None:
    """The same attack on a run of real daemons (linkage.py --with-groups): the successful
    deposits the capture shows into each contact mailbox during the messaging phase."""
    truth = data.truth
    if not truth.groups:
        return None
    view = adversary.View(data.capture, data.db)
    dep: dict[Mailbox, list[float]] = {}
    for (owner, contact), oid in metrics.contact_mailboxes(truth).items():
        m = view.mailboxes.get(oid)
        ts = [] if m is None else m.deposits
        dep[(contact, owner)] = sorted(t for t in ts if truth.t_start <= t <= truth.t_end)
    pairs, flags = _universe(sorted(dep), truth.groups)
    k = sum(flags)
    fig = Figures({}, {}, k, len(pairs))
    for w in REAL_WINDOWS:
        sc = co_occurrence(dep, w, truth.t_end - truth.t_start, pairs)
        fig.p_at_k[w] = precision_at_k(sc, flags, k)
        fig.auc[w] = auc(sc, flags)
    return fig


@dataclass
class Figures:
    p_at_k: dict[float, float]  # by window
    auc: dict[float, float]
    k: int
    n: int

    def best(self) -> tuple[float, float, float]:
        """(window, P@k, AUC) of the window with the best AUC, picked with the truth in hand."""
        w = max(self.auc, key=lambda x: self.auc[x])
        return w, self.p_at_k[w], self.auc[w]


def attack(pop: Population, relay: Relay, p: Params) -> Figures:
    pairs, truth = universe(pop)
    k = sum(truth)
    fig = Figures({}, {}, k, len(pairs))
    for w in WINDOWS:
        s = co_occurrence(relay.deposits, w, p.duration, pairs)
        fig.p_at_k[w] = precision_at_k(s, truth, k)
        fig.auc[w] = auc(s, truth)
    return fig


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _cell(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    return f"{m:4.2f} [{min(xs):.2f},{max(xs):.2f}]" if len(xs) > 1 else f"{m:4.2f}"


def run(seeds: list[int], spreads: list[float], levels: list[str], p: Params) -> None:
    """Print the figures: per level and spread, the attack's best window over the seeds, beside
    the same days without group messages and random guessing; then the latency cost."""
    pops = {s: make(p, s) for s in seeds}
    pop0 = pops[seeds[0]]
    sizes = [len(g) for g in pop0.groups]
    print(f"\n== groups by fan-out timing (simulated, addresses hidden): {p.users} users, "
          f"{p.contacts} contact pairs, {p.groups[0]} groups of {p.groups[1]} to {p.groups[2]} "
          f"(seed {seeds[0]}: {sizes}), {p.duration / 3600:.0f} h, {len(seeds)} seed(s) "
          f"[{','.join(map(str, seeds))}]")  # fmt: skip
    print("  mailbox pairs (two mailboxes of one group vs not); mean [min,max] over seeds; "
          "best window picked after the fact")
    print(f"  {'level':8} {'spread':>7} {'P@k':17} {'AUC':17} {'window (s)':12} "
          f"{'no groups: P@k':17} {'AUC':17} {'random P@k':11} {'p95':6} {'AUC at 0.05 s'}")
    lat: dict[tuple[str, float], tuple[list[float], list[float]]] = {}
    for level in levels:
        cover = level != "off"
        base = [attack(pops[s], deposits(pops[s], p, cover, 0.0, s, False), p) for s in seeds]
        for spread in spreads if not cover else [0.0]:
            figs, per, last = [], [], []
            for s in seeds:
                r = deposits(pops[s], p, cover, spread, s)
                figs.append(attack(pops[s], r, p))
                per += r.per_member
                last += r.until_last
            lat[(level, spread)] = (per, last)
            # The window is picked once for all seeds (the best mean AUC), as an attacker
            # who knew the spread would fix it.
            w = max(WINDOWS, key=lambda x: statistics.fmean(f.auc[x] for f in figs))
            wb = max(WINDOWS, key=lambda x: statistics.fmean(f.auc[x] for f in base))
            rnd = statistics.fmean(f.k / f.n for f in figs)
            p95 = statistics.fmean(random_p95(f.n, f.k, f.k) for f in figs)
            label = f"{spread:g} s" if not cover else "slots"
            print(f"  {level:8} {label:>7} {_cell([f.p_at_k[w] for f in figs]):17} "
                  f"{_cell([f.auc[w] for f in figs]):17} {w:<12g} "
                  f"{_cell([f.p_at_k[wb] for f in base]):17} "
                  f"{_cell([f.auc[wb] for f in base]):17} {rnd:<11.3f} {p95:<6.3f} "
                  f"{_cell([f.auc[WINDOWS[0]] for f in figs])}")
    print("  latency added to a group message (seconds from the send until a member's copy is "
          "deposited; until the last member's)")
    print(f"  {'level':8} {'spread':>7} {'per member: median':>19} {'p95':>8} "
          f"{'until last: median':>19} {'p95':>8}")
    for (level, spread), (per, last) in lat.items():
        label = f"{spread:g} s" if level == "off" else "slots"
        print(f"  {level:8} {label:>7} {_pct(per, 0.5):19.2f} {_pct(per, 0.95):8.2f} "
              f"{_pct(last, 0.5):19.2f} {_pct(last, 0.95):8.2f}")
