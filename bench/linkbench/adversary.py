"""The adversary: the relay's operator, with a capture of its connections and its data directory.

It never sees the ground truth. What it does:

1. **What the relay knows anyway** (`View`): which owner_id goes with which deposit_id (the
   relay answers CREATE with both; its database keeps their hashes side by side), every
   successful deposit into each mailbox and when, every delivery (MSG) and when, which
   connection subscribed which mailbox and when it closed, each connection's source address,
   and the mailboxes' order in its database: row numbers when they are a sequence, else the
   order in which rows sharing a page of the file were written (pages.py).

2. **Ownership**: which mailboxes belong to the same person (`owners_*`), by address (the same
   source address or connection subscribes or manages them) and by timing (their subscription
   connections close together and subscribe again together: a daemon that stops and starts).

3. **Conversations** (`ROUTES`): a score for every pair of candidate mailboxes (not public,
   not deleted: contact mailboxes as far as the relay can tell) saying how likely the two are
   the two directions of one conversation:

   - `address`   the owner's address of one deposits into the other (and back);
   - `echo`      a delivery on one is followed, within seconds, by a deposit into the other
                 (a delivery receipt), more often than chance (windows 1, 4, 16 s);
   - `lag`       the same from deposits only (deposit into one, deposit into the other within
                 2, 8 or 32 s: replies and receipts), for when delivery times say little;
   - `counts`    running-count tracking: the two mailboxes' deposit counts stay together
                 (each text draws one receipt the other way), much tighter than two
                 independent streams, which drift apart like a random walk;
   - `absence`   while a mailbox's owner is away (its subscription closed until it comes
                 back), deposits into the other stop (no texts, no cover): the deficit against
                 its usual rate, both ways;
   - `db-order`  the relay's database: the two mailboxes of a new contact are created together
                 and get neighbouring row numbers, or neighbouring places in a page;
   - `timing`    echo, lag, counts and absence combined (no address, no database);
   - `combined`  all of them: per route, each pair's margin (its score minus the best score
                 either mailbox has with another, in units of that mailbox's spread of
                 scores; positive only for a mutual best match, since a mailbox is in one
                 conversation), at most 10, weighted by how many more mailboxes the route
                 matches than random scores would, summed; never two mailboxes of one
                 ownership cluster.

   A user pair's score is the best score of a mailbox pair between their ownership clusters;
   a pair's message count is estimated from the mailbox pairs the route is confident about
   (z >= 3, each mailbox in at most one pair): half their deposits.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from relay import wire

from .capture import Capture
from .world import RelayDb

Pair = tuple[bytes, bytes]
Scores = dict[Pair, float]

ECHO_WINDOWS = (1.0, 4.0, 16.0)
LAG_WINDOWS = (2.0, 8.0, 32.0)
CO_CLOSE = 0.25  # seconds: connections of one daemon that stops close within this
CO_OPEN = 1.5  # seconds: and subscribe again within this once it is back
AWAY_SETTLE = 1.0  # seconds after a close before deposits in flight are done
Z_CONFIDENT = 3.0
Z_CLIP = 10.0
TIE_WEIGHT = 0.01
MIN_WEIGHT = 0.05
NULL_DRAWS = 30


def pair(a: bytes, b: bytes) -> Pair:
    return (a, b) if a < b else (b, a)


def owner_key(owner_id: bytes) -> bytes:
    return hashlib.sha256(b"aegis-relay owner\x00" + owner_id).digest()


def deposit_key(deposit_id: bytes) -> bytes:
    return hashlib.sha256(b"aegis-relay deposit\x00" + deposit_id).digest()


@dataclass
class Mailbox:
    owner: bytes
    deposit: bytes | None = None
    public: bool | None = None
    created: float | None = None
    deleted: float | None = None
    row: int | None = None  # its position in the relay's table
    place: tuple[int, int] | None = None  # (leaf page, rank of writing within it): pages.py
    deposits: list[float] = field(default_factory=list)  # successful deposits into it
    deposit_conns: list[int] = field(default_factory=list)
    deliveries: list[float] = field(default_factory=list)  # MSG frames to its owner
    subs: list[tuple[int, float]] = field(default_factory=list)  # (connection, SUBSCRIBE time)
    owner_conns: set[int] = field(default_factory=set)  # connections that managed it


class View:
    """The capture and the database, organised by mailbox."""

    def __init__(self, cap: Capture, db: RelayDb) -> None:
        self.conns = {c.id: c for c in cap.conns}
        self.start = min((c.opened for c in cap.conns), default=0.0)
        self.end = max((f.t for f in cap.frames), default=self.start)
        self.mailboxes: dict[bytes, Mailbox] = {}
        self.db_error = db.error
        by_deposit: dict[bytes, bytes] = {}
        unknown_deposits: dict[bytes, list[tuple[float, int]]] = {}
        flags: dict[tuple[int, int], int] = {}
        pending: dict[tuple[int, int], tuple[int, bytes, float]] = {}

        def mb(owner: bytes) -> Mailbox:
            if owner not in self.mailboxes:
                self.mailboxes[owner] = Mailbox(owner)
            return self.mailboxes[owner]

        for f in sorted(cap.frames, key=lambda f: f.t):
            key = (f.conn, f.rid)
            if f.up:
                if f.type == wire.CREATE and f.other:
                    flags[key] = f.other[0]
                elif f.mailbox and f.type in (*wire.SIGNED_OWNER_TYPES, wire.DEPOSIT):
                    pending[key] = (f.type, f.mailbox, f.t)
                continue
            if f.type == wire.CREATED:
                m = mb(f.mailbox)
                m.deposit, m.created = f.other, f.t
                m.public = bool(flags.pop(key, 0) & 1)
                m.owner_conns.add(f.conn)
                by_deposit[f.other] = f.mailbox
            elif f.type == wire.MSG:
                mb(f.mailbox).deliveries.append(f.t)
            elif f.type in (wire.OK, wire.BUNDLE_COUNT) and f.rid and key in pending:
                ftype, ident, t = pending.pop(key)
                if ftype == wire.DEPOSIT:
                    owner = by_deposit.get(ident)
                    if owner is None:
                        unknown_deposits.setdefault(ident, []).append((t, f.conn))
                    else:
                        mb(owner).deposits.append(t)
                        mb(owner).deposit_conns.append(f.conn)
                    continue
                m = mb(ident)
                m.owner_conns.add(f.conn)
                if ftype == wire.SUBSCRIBE:
                    m.subs.append((f.conn, t))
                elif ftype == wire.DELETE:
                    m.deleted = f.t
            elif f.type == wire.ERROR and f.rid:
                pending.pop(key, None)

        # The database: row order, and owner/deposit ids for mailboxes whose CREATE we missed.
        self.db_rows = 0
        if db.rows:
            okeys = {owner_key(o): o for o in self.mailboxes}
            dkeys = {deposit_key(d): d for d in unknown_deposits}
            for i, row in enumerate(db.rows):
                order = row.get("_rowid", i)
                owner = okeys.get(_bytes(row.get("owner_key")))
                dep = dkeys.get(_bytes(row.get("deposit_key")))
                if owner is None:
                    continue
                self.db_rows += 1
                m = self.mailboxes[owner]
                m.row = int(order) if isinstance(order, int) else i
                if row.get("_page") is not None:
                    m.place = (int(row["_page"]), int(row["_cell"]))
                if m.public is None and "public" in row:
                    m.public = bool(row["public"])
                if dep is not None and m.deposit is None:
                    m.deposit = dep
                    for t, c in unknown_deposits.pop(dep):
                        m.deposits.append(t)
                        m.deposit_conns.append(c)
        for m in self.mailboxes.values():
            m.deposits.sort()
            m.deliveries.sort()
        self.candidates = sorted(
            o for o, m in self.mailboxes.items()
            if m.deposit is not None and not m.public and m.deleted is None
        )  # fmt: skip

    @property
    def duration(self) -> float:
        return max(1e-3, self.end - self.start)

    def ip(self, conn: int) -> str:
        return self.conns[conn].src[0]

    def pairs(self) -> list[Pair]:
        c = self.candidates
        return [pair(c[i], c[j]) for i in range(len(c)) for j in range(i + 1, len(c))]


def _bytes(v: object) -> bytes:
    return bytes(v) if isinstance(v, bytes | bytearray | memoryview) else b""


# --- ownership -----------------------------------------------------------------------------------


class _Union:
    def __init__(self) -> None:
        self.parent: dict[object, object] = {}

    def find(self, x: object) -> object:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: object, b: object) -> None:
        self.parent[self.find(a)] = self.find(b)


def _clusters(v: View, links: list[tuple[object, object]]) -> list[set[bytes]]:
    u = _Union()
    for a, b in links:
        u.join(a, b)
    groups: dict[object, set[bytes]] = {}
    for o, m in v.mailboxes.items():
        if m.deleted is None:
            groups.setdefault(u.find(o), set()).add(o)
    return sorted(groups.values(), key=lambda g: min(g))


def owners_by_address(v: View) -> list[set[bytes]]:
    """Mailboxes managed or subscribed from one address (or one connection) are one person's."""
    links: list[tuple[object, object]] = []
    for o, m in v.mailboxes.items():
        for c in m.owner_conns | {c for c, _ in m.subs}:
            links.append((o, ("ip", v.ip(c))))
    return _clusters(v, links)


def _near(a: list[float], b: list[float], d: float) -> int:
    """How many of `a` have a partner in `b` within `d` (each used once)."""
    used: set[int] = set()
    n = 0
    for t in a:
        i = bisect.bisect_left(b, t - d)
        while i < len(b) and b[i] <= t + d:
            if i not in used:
                used.add(i)
                n += 1
                break
            i += 1
    return n


def timing_events(v: View) -> dict[bytes, tuple[list[float], list[float]]]:
    """Per mailbox: when its subscriptions were made, and when their connections closed."""
    out = {}
    for o, m in v.mailboxes.items():
        if m.deleted is not None or not m.subs:
            continue
        opens = sorted(t for _, t in m.subs)
        closes = sorted({c.closed for c in (v.conns[cid] for cid, _ in m.subs)
                         if c.closed is not None and c.closed < v.end - 0.5})  # fmt: skip
        out[o] = (opens, closes)
    return out


def timing_links(v: View) -> list[tuple[object, object]]:
    """Two mailboxes whose subscriptions dropped together and came back together."""
    ev = timing_events(v)
    keys = sorted(ev)
    links: list[tuple[object, object]] = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if (_near(ev[a][1], ev[b][1], CO_CLOSE) >= 1
                    and _near(ev[a][0][1:], ev[b][0][1:], CO_OPEN) >= 1):  # fmt: skip
                links.append((a, b))
    return links


def owners_by_timing(v: View) -> list[set[bytes]]:
    return _clusters(v, timing_links(v))


def owners_combined(v: View) -> list[set[bytes]]:
    links: list[tuple[object, object]] = list(timing_links(v))
    for o, m in v.mailboxes.items():
        for c in m.owner_conns | {c for c, _ in m.subs}:
            links.append((o, ("ip", v.ip(c))))
    return _clusters(v, links)


OWNERSHIP: dict[str, Callable[[View], list[set[bytes]]]] = {
    "address": owners_by_address,
    "co-conn": owners_by_timing,
    "combined": owners_combined,
}


# --- conversation routes ---------------------------------------------------------------------


def route_address(v: View) -> Scores:
    own: dict[bytes, set[str]] = {}
    dep: dict[bytes, Counter[str]] = {}
    for o in v.candidates:
        m = v.mailboxes[o]
        own[o] = {v.ip(c) for c in m.owner_conns | {c for c, _ in m.subs}}
        dep[o] = Counter(v.ip(c) for c in m.deposit_conns)
    out = {}
    for a, b in v.pairs():
        d1 = sum(dep[b][ip] for ip in own[a])  # a's owner deposits into b
        d2 = sum(dep[a][ip] for ip in own[b])
        # Both ways is a conversation; one way only is rarer (an idle contact's hello), and
        # a user's other mailboxes also see one way (their owner deposits to this one's).
        out[(a, b)] = math.log1p(d1) + math.log1p(d2) + 2 * math.log1p(min(d1, d2))
    return out


def _follow_z(cause: list[float], effect: list[float], window: float, span: float) -> float:
    """How much more often than chance an `effect` follows a `cause` within `window`."""
    if not cause or not effect:
        return 0.0
    hits = 0
    for t in cause:
        i = bisect.bisect_right(effect, t)
        if i < len(effect) and effect[i] <= t + window:
            hits += 1
    p = 1.0 - math.exp(-len(effect) * window / span)
    expected = len(cause) * p
    return (hits - expected) / math.sqrt(expected * (1 - p) + 1.0)


def route_echo(v: View) -> Scores:
    out = {}
    for a, b in v.pairs():
        ma, mb = v.mailboxes[a], v.mailboxes[b]
        out[(a, b)] = max(
            _follow_z(ma.deliveries, mb.deposits, w, v.duration)
            + _follow_z(mb.deliveries, ma.deposits, w, v.duration)
            for w in ECHO_WINDOWS
        )
    return out


def route_lag(v: View) -> Scores:
    out = {}
    for a, b in v.pairs():
        da, db = v.mailboxes[a].deposits, v.mailboxes[b].deposits
        out[(a, b)] = max(
            _follow_z(da, db, w, v.duration) + _follow_z(db, da, w, v.duration)
            for w in LAG_WINDOWS
        )
    return out


def route_counts(v: View) -> Scores:
    """How much tighter than two independent streams the two running counts stay together:
    sqrt(n) / (1 + mean |d - m|), n the deposits into both, d the difference of the counts
    after each, m its median (an offset of one, the first hello, is free). Independent
    streams drift apart like a random walk (|d| ~ sqrt(n)); a conversation's stay within the
    texts whose receipt has not come back yet; few events prove little either way."""
    out = {}
    for a, b in v.pairs():
        events = sorted([(t, 1) for t in v.mailboxes[a].deposits]
                        + [(t, -1) for t in v.mailboxes[b].deposits])  # fmt: skip
        if not events:
            out[(a, b)] = 0.0
            continue
        d, ds = 0, []
        for _, step in events:
            d += step
            ds.append(d)
        mid = round(statistics.median(ds))
        spread = sum(abs(x - mid) for x in ds) / len(ds) + max(0, abs(mid) - 1)
        out[(a, b)] = math.sqrt(len(ds)) / (1 + spread)
    return out


def away_windows(v: View, owner: bytes) -> list[tuple[float, float]]:
    """When the owner of a mailbox was away: from a close of its subscription's connection
    to its next subscription (its daemon stopped, its network went down)."""
    m = v.mailboxes[owner]
    subs = sorted(t for _, t in m.subs)
    out = []
    for cid, _ in m.subs:
        closed = v.conns[cid].closed
        if closed is None:
            continue
        back = next((t for t in subs if t > closed), v.end)
        if back - closed > 2 * AWAY_SETTLE:
            out.append((closed + AWAY_SETTLE, back))
    return out


def _deficit(deposits: list[float], windows: list[tuple[float, float]], span: float) -> float:
    """How many fewer deposits than its usual rate a mailbox got during `windows`."""
    inside = sum(b - a for a, b in windows)
    if inside <= 0 or span - inside <= 0 or not deposits:
        return 0.0
    n_in = sum(1 for t in deposits for a, b in windows if a <= t < b)
    expected = (len(deposits) - n_in) / (span - inside) * inside
    return (expected - n_in) / math.sqrt(expected + 1.0)


def route_absence(v: View) -> Scores:
    """While someone is away they deposit nothing: the mailboxes that go quiet when the owner
    of another goes away are that owner's contacts' (and the other way round)."""
    away = {o: away_windows(v, o) for o in v.candidates}
    out = {}
    for a, b in v.pairs():
        ma, mb = v.mailboxes[a], v.mailboxes[b]
        d1 = _deficit(mb.deposits, away[a], v.duration)  # b goes quiet while a's owner is away
        d2 = _deficit(ma.deposits, away[b], v.duration)
        # Both ways: every contact of a's owner goes quiet while that owner is away, but only
        # the partner's own mailbox goes quiet when the partner is.
        out[(a, b)] = min(d1, d2) + 0.1 * max(d1, d2)
    return out


def route_db_order(v: View) -> Scores | None:
    rows = {o: v.mailboxes[o].row for o in v.candidates}
    if not rows or any(r is None for r in rows.values()):
        return None
    keys = sorted(int(r or 0) for r in rows.values())
    if keys and keys[-1] - keys[0] < 4 * len(keys):  # row numbers in sequence: creation order
        return {(a, b): 1.0 / max(1, abs(int(rows[a] or 0) - int(rows[b] or 0)))
                for a, b in v.pairs()}  # fmt: skip
    # Random row keys: where the rows sit instead. Among rows sharing a leaf page, the order
    # in which their cells were written (pages.py); nothing between pages.
    places = {o: v.mailboxes[o].place for o in v.candidates}
    out: Scores = {}
    for a, b in v.pairs():
        pa, pb = places[a], places[b]
        same = pa is not None and pb is not None and pa[0] == pb[0]
        out[(a, b)] = 1.0 / max(1, abs(pa[1] - pb[1])) if same and pa and pb else 0.0
    return out


ROUTES: dict[str, Callable[[View], Scores | None]] = {
    "address": route_address,
    "echo": route_echo,
    "lag": route_lag,
    "counts": route_counts,
    "absence": route_absence,
    "db-order": route_db_order,
}
# Routes made of others: timing alone (no address, no database), and everything.
COMPOSITES: dict[str, tuple[str, ...]] = {
    "timing": ("echo", "lag", "counts", "absence"),
    "combined": tuple(ROUTES),
}


def _scale(vals: list[float]) -> float:
    med = statistics.median(vals)
    mad = statistics.median(abs(x - med) for x in vals) * 1.4826
    if mad > 0:
        return mad
    sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return sd if sd > 0 else 1.0


def robust_z(scores: Scores) -> Scores:
    vals = list(scores.values())
    if not vals:
        return {}
    med, scale = statistics.median(vals), _scale(vals)
    return {k: (x - med) / scale for k, x in scores.items()}


def margins(scores: Scores) -> Scores:
    """How far each pair's score stands above the best score either of its mailboxes has with
    any other mailbox, in units of that mailbox's spread of scores (the smaller of the two
    sides): positive only for a mutual best match. A mailbox belongs to one conversation, so
    a route that scores a user's other mailboxes as high (one way only), or many pairs alike,
    says little about any one of them."""
    if not scores:
        return {}
    rows: dict[bytes, list[tuple[float, bytes]]] = {}
    for (a, b), x in scores.items():
        rows.setdefault(a, []).append((x, b))
        rows.setdefault(b, []).append((x, a))
    overall = _scale(list(scores.values()))
    top, scale = {}, {}
    for me, row in rows.items():
        row.sort(key=lambda e: -e[0])
        top[me] = row[:2]
        vals = [x for x, _ in row]
        scale[me] = _scale(vals) if len(vals) > 2 else overall
    floor = min(scores.values())

    def side(me: bytes, other: bytes, x: float) -> float:
        best = next((y for y, o in top[me] if o != other), floor)
        return (x - best) / scale[me]

    return {(a, b): min(side(a, b, x), side(b, a, x)) for (a, b), x in scores.items()}


def _matched_share(m: Scores) -> float:
    """The share of mailboxes in a mutual best match (a positive margin)."""
    boxes = {x for k in m for x in k}
    matched = {x for k, z in m.items() if z > 0 for x in k}
    return len(matched) / len(boxes) if boxes else 0.0


def decisiveness(m: Scores, rng: random.Random) -> float:
    """How much more of the mailboxes a route pairs as mutual best matches than scores drawn
    at random for the same pairs would (0: no better than noise, 1: every mailbox)."""
    share = _matched_share(m)
    null = statistics.fmean(_matched_share(margins({k: rng.random() for k in m}))
                            for _ in range(NULL_DRAWS))  # fmt: skip
    return max(0.0, (share - null) / (1.0 - null)) if null < 1 else 0.0


def combine(routes: dict[str, Scores | None], same_owner: set[Pair]) -> Scores:
    """The sum over routes of their positive margins (mutual best matches; at most Z_CLIP
    each), each route weighted by its decisiveness (how many more mailboxes it matches than
    noise would), the negative margins only breaking ties
    (a pair whose mailboxes have better partners elsewhere ranks below one that is merely
    unexplained). So a decisive route is not outvoted by routes that are noise. Two mailboxes
    the ownership step gave one owner are never a conversation: they rank last and are no
    one's partner."""
    out: Scores = {}
    rng = random.Random(0)
    for scores in routes.values():
        if scores is None:
            continue
        m = margins({k: x for k, x in scores.items() if k not in same_owner})
        w = max(MIN_WEIGHT, decisiveness(m, rng))
        for k, z in m.items():
            out[k] = out.get(k, 0.0) + w * (min(Z_CLIP, z) if z > 0
                                            else TIE_WEIGHT * max(-Z_CLIP, z))  # fmt: skip
    low = min(out.values(), default=0.0) - 1.0
    for scores in routes.values():
        for k in scores or {}:
            out.setdefault(k, low)
    return out


def matched_counts(v: View, scores: Scores) -> dict[Pair, float]:
    """The mailbox pairs the route is confident about, each mailbox in one pair at most, with
    the number of texts each carried (half the deposits into the two)."""
    z = robust_z(scores)
    used: set[bytes] = set()
    out = {}
    for (a, b), s in sorted(z.items(), key=lambda kv: -kv[1]):
        if s < Z_CONFIDENT:
            break
        if a in used or b in used:
            continue
        used |= {a, b}
        out[(a, b)] = (len(v.mailboxes[a].deposits) + len(v.mailboxes[b].deposits)) / 2
    return out


@dataclass
class Attack:
    view: View
    owners: dict[str, list[set[bytes]]]  # ownership method -> clusters
    routes: dict[str, Scores | None]  # route -> mailbox pair scores (None: not available)
    counts: dict[str, dict[Pair, float]]  # route -> confident mailbox pairs, texts each


def attack(cap: Capture, db: RelayDb) -> Attack:
    v = View(cap, db)
    owners = {name: fn(v) for name, fn in OWNERSHIP.items()}
    routes: dict[str, Scores | None] = {name: fn(v) for name, fn in ROUTES.items()}
    cluster = {o: i for i, c in enumerate(owners["combined"]) for o in c}
    same = {p for p in v.pairs() if cluster.get(p[0], -1) == cluster.get(p[1], -2)}
    for name, parts in COMPOSITES.items():
        routes[name] = combine({p: routes[p] for p in parts}, same)
    counts = {name: matched_counts(v, s) for name, s in routes.items() if s is not None}
    return Attack(v, owners, routes, counts)
