"""How well the adversary did, against the ground truth and against random guessing.

- **Precision at k**, k = the true number of pairs: the share of true pairs among its k best
  scored candidates (ties at the cut count in expectation). Random guessing: k/N on average;
  its 95th percentile (hypergeometric) is printed too, since N is small.
- **AUC**: the probability that a true pair scores above a false one (ties count half;
  Mann-Whitney). Random: 0.5.
- **Count correlation**: over the true contact pairs (idle ones included; whether a pair is
  a contact at all is what P@k and AUC measure), the adversary's estimate of the number of
  texts each exchanged (0 for a pair it did not find) against the true number; Pearson's r
  (and Spearman's rho, ranks with ties averaged). Random: 0. "-" when the estimate is the
  same for every pair.
- **When**: given the conversation (the true mailbox a text went to), how close the nearest
  deposit into it comes to the moment the text was sent (median, 90th percentile); and the
  resolution: the smallest time bin at which the deposits per bin into those mailboxes
  correlate (r >= 0.5) with the texts sent per bin.

Two levels: **mailbox** pairs (the two directions of one conversation among the true contact
mailboxes) and **user** pairs (the contact graph). User pairs need the adversary's ownership
clusters: each is mapped to at most one user and each user to at most one cluster (the largest
overlaps first), which is the best the adversary could hope for when naming them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from .adversary import Attack, Pair, Scores, pair
from .world import RunData, Truth

RESOLUTION_R = 0.5
WIDTHS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
          1000.0, 2000.0, 5000.0)  # fmt: skip


# --- plain statistics ---------------------------------------------------------------------------


def precision_at_k(scores: list[float], truth: list[bool], k: int) -> float:
    if k <= 0:
        return float("nan")
    order = sorted(zip(scores, truth, strict=True), key=lambda st: -st[0])
    cut = order[k - 1][0]
    above = [t for s, t in order if s > cut]
    tied = [t for s, t in order if s == cut]
    need = k - len(above)
    return (sum(above) + need * sum(tied) / len(tied)) / k


def auc(scores: list[float], truth: list[bool]) -> float:
    pos = [s for s, t in zip(scores, truth, strict=True) if t]
    neg = [s for s, t in zip(scores, truth, strict=True) if not t]
    if not pos or not neg:
        return float("nan")
    r = ranks(scores)
    rpos = sum(ri for ri, t in zip(r, truth, strict=True) if t)
    return (rpos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            out[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: list[float], y: list[float]) -> float | None:
    return pearson(ranks(x), ranks(y))


def random_p95(n: int, k_true: int, k: int) -> float:
    """95th percentile of the precision at k of a random ranking (hypergeometric)."""
    total = math.comb(n, k)
    cdf = 0.0
    for x in range(0, min(k, k_true) + 1):
        cdf += math.comb(k_true, x) * math.comb(n - k_true, k - x) / total
        if cdf >= 0.95:
            return x / k
    return min(k, k_true) / k


# --- the figures of one run ---------------------------------------------------------------------


@dataclass
class Figures:
    mbox_p: float = float("nan")
    mbox_auc: float = float("nan")
    user_p: float = float("nan")
    user_auc: float = float("nan")
    count_r: float | None = None
    count_rho: float | None = None
    available: bool = True


@dataclass
class Ownership:
    clusters: int
    accuracy: float  # mailboxes attributed to their true owner under the 1-1 mapping
    pair_precision: float  # of "same owner" links among mailbox pairs
    pair_recall: float


@dataclass
class When:
    median_ms: float | None
    p90_ms: float | None
    resolution_s: float | None


@dataclass
class Result:
    routes: dict[str, Figures]
    random: Figures
    random_p95: tuple[float, float]  # mailbox, user
    ownership: dict[str, Ownership]
    when: When
    k_mbox: int
    n_mbox: int
    k_user: int
    n_user: int
    texts: int
    true_counts: dict[tuple[str, str], int] = field(default_factory=dict)


def true_owners(data: RunData) -> dict[bytes, str]:
    """Every mailbox's owner: from the profiles, and from which user's forwarder carried the
    CREATED answer (mailboxes deleted since, such as used invitations)."""
    label = {lb.src: lb.user for lb in data.truth.labels}
    conn_user = {c.id: label.get(c.src) for c in data.capture.conns}
    owners: dict[bytes, str] = {}
    for f in data.capture.frames:
        if not f.up and f.type == 0x82:  # CREATED
            user = conn_user.get(f.conn)
            if user is not None:
                owners[f.mailbox] = user
    for p in data.truth.profiles.values():
        for _, _, owner_id, _ in p.owned:
            owners[owner_id] = p.user
    return owners


def contact_mailboxes(truth: Truth) -> dict[tuple[str, str], bytes]:
    """(owner, contact) -> owner_id of the contact mailbox `owner` receives `contact` on."""
    out = {}
    for p in truth.profiles.values():
        for role, contact, owner_id, _ in p.owned:
            if role == "contact" and contact is not None:
                out[(p.user, contact)] = owner_id
    return out


def map_clusters(clusters: list[set[bytes]], owners: dict[bytes, str]) -> dict[str, set[bytes]]:
    """Each user gets at most one cluster and each cluster one user, largest overlaps first."""
    overlaps = []
    for i, c in enumerate(clusters):
        for user, n in Counter(owners[o] for o in c if o in owners).items():
            overlaps.append((n, -len(c), i, user))
    overlaps.sort(reverse=True)
    taken: set[int] = set()
    out: dict[str, set[bytes]] = {}
    for _, _, i, user in overlaps:
        if i in taken or user in out:
            continue
        taken.add(i)
        out[user] = clusters[i]
    return out


def ownership_figures(clusters: list[set[bytes]], owners: dict[bytes, str]) -> Ownership:
    mapped = map_clusters(clusters, owners)
    known = [o for c in clusters for o in c if o in owners]
    right = sum(1 for user, c in mapped.items() for o in c if owners.get(o) == user)
    cluster_of = {o: i for i, c in enumerate(clusters) for o in c}
    tp = fp = fn = 0
    for i, a in enumerate(known):
        for b in known[i + 1 :]:
            same, linked = owners[a] == owners[b], cluster_of[a] == cluster_of[b]
            tp += same and linked
            fp += linked and not same
            fn += same and not linked
    return Ownership(
        len(clusters), right / len(known) if known else float("nan"),
        tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"),
    )  # fmt: skip


def _score_list(scores: Scores | None, universe: list[Pair]) -> list[float]:
    if scores is None:
        return [0.0] * len(universe)
    low = min(scores.values(), default=0.0) - 1.0
    return [scores.get(p, low) for p in universe]


def when_figures(data: RunData, attack: Attack, cm: dict[tuple[str, str], bytes]) -> When:
    truth = data.truth
    sends: dict[bytes, list[float]] = {}
    for s in truth.sent:
        box = cm.get((s.recipient, s.sender))
        if box is not None:
            sends.setdefault(box, []).append(s.t)
    deps = {box: attack.view.mailboxes[box].deposits if box in attack.view.mailboxes else []
            for box in sends}  # fmt: skip
    errors = []
    for box, ts in sends.items():
        d = deps[box]
        for t in ts:
            if d:
                errors.append(min(abs(x - t) for x in d))
    errors.sort()
    med = errors[len(errors) // 2] * 1000 if errors else None
    p90 = errors[min(len(errors) - 1, int(len(errors) * 0.9))] * 1000 if errors else None
    resolution = None
    span = truth.t_end - truth.t_start
    for w in WIDTHS:
        if w > span / 2:
            break
        bins = math.ceil(span / w) * len(sends)
        x: Counter[tuple[bytes, int]] = Counter()
        y: Counter[tuple[bytes, int]] = Counter()
        for box, ts in sends.items():
            for t in ts:
                x[(box, int((t - truth.t_start) // w))] += 1
            for t in deps[box]:
                if truth.t_start <= t < truth.t_end:
                    y[(box, int((t - truth.t_start) // w))] += 1
        r = _sparse_pearson(x, y, bins)
        if r is not None and r >= RESOLUTION_R:
            resolution = w
            break
    return When(med, p90, resolution)


def _sparse_pearson(x: Counter[tuple[bytes, int]], y: Counter[tuple[bytes, int]], n: int
                    ) -> float | None:  # fmt: skip
    if n < 2:
        return None
    sx, sy = sum(x.values()), sum(y.values())
    sxx = sum(v * v for v in x.values())
    syy = sum(v * v for v in y.values())
    sxy = sum(v * y.get(k, 0) for k, v in x.items())
    cov = sxy - sx * sy / n
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    if vx <= 0 or vy <= 0:
        return None
    return cov / math.sqrt(vx * vy)


def evaluate(data: RunData, attack: Attack) -> Result:
    truth = data.truth
    owners = true_owners(data)
    cm = contact_mailboxes(truth)
    boxes = sorted(cm.values())
    mbox_universe = [pair(boxes[i], boxes[j]) for i in range(len(boxes))
                     for j in range(i + 1, len(boxes))]  # fmt: skip
    true_mbox = {pair(cm[(a, b)], cm[(b, a)]) for a, b in truth.pairs
                 if (a, b) in cm and (b, a) in cm}  # fmt: skip
    users = truth.users
    user_universe = [(users[i], users[j]) for i in range(len(users))
                     for j in range(i + 1, len(users))]  # fmt: skip
    true_user = {tuple(sorted(p)) for p in truth.pairs}
    counts: Counter[tuple[str, str]] = Counter()
    for sent in truth.sent:
        counts[(min(sent.sender, sent.recipient), max(sent.sender, sent.recipient))] += 1

    mapped = map_clusters(attack.owners["combined"], owners)
    user_of = {o: u for u, c in mapped.items() for o in c}
    mbox_truth = [p in true_mbox for p in mbox_universe]
    user_truth = [p in true_user for p in user_universe]
    k_m, k_u = len(true_mbox), len(true_user)

    routes = {}
    for name, scores in attack.routes.items():
        f = Figures(available=scores is not None)
        ms = _score_list(scores, mbox_universe)
        f.mbox_p, f.mbox_auc = precision_at_k(ms, mbox_truth, k_m), auc(ms, mbox_truth)
        best: dict[tuple[str, str], float] = {}
        for (ma, mb), score in (scores or {}).items():
            ua, ub = user_of.get(ma), user_of.get(mb)
            if ua is None or ub is None or ua == ub:
                continue
            key = (min(ua, ub), max(ua, ub))
            best[key] = max(best.get(key, -math.inf), score)
        low = min(best.values(), default=0.0) - 1.0
        us = [best.get(p, low) for p in user_universe]
        f.user_p, f.user_auc = precision_at_k(us, user_truth, k_u), auc(us, user_truth)
        est: dict[tuple[str, str], float] = {}
        for (ma, mb), n in attack.counts.get(name, {}).items():
            ua, ub = user_of.get(ma), user_of.get(mb)
            if ua is not None and ub is not None and ua != ub:
                key = (min(ua, ub), max(ua, ub))
                est[key] = est.get(key, 0.0) + n
        contacts = [p for p in user_universe if p in true_user]
        xs = [est.get(p, 0.0) for p in contacts]
        ys = [float(counts[p]) for p in contacts]
        f.count_r, f.count_rho = pearson(xs, ys), spearman(xs, ys)
        routes[name] = f

    n_m, n_u = len(mbox_universe), len(user_universe)
    rnd = Figures(k_m / n_m if n_m else float("nan"), 0.5, k_u / n_u if n_u else float("nan"),
                  0.5, 0.0, 0.0)  # fmt: skip
    p95 = (random_p95(n_m, k_m, k_m) if n_m else float("nan"),
           random_p95(n_u, k_u, k_u) if n_u else float("nan"))  # fmt: skip
    own = {name: ownership_figures(c, owners) for name, c in attack.owners.items()}
    return Result(routes, rnd, p95, own, when_figures(data, attack, cm), k_m, n_m, k_u, n_u,
                  len(truth.sent), dict(counts))  # fmt: skip

