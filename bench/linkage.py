"""Linkage benchmark: can the relay's operator tell who talks to whom, when and how often?

    sudo .venv/bin/python bench/linkage.py [--seeds 5] [--configs direct,hidden] [--levels off]
    sudo .venv/bin/python bench/linkage.py --smoke          # 3 users, a few texts, < 1 min
    .venv/bin/python bench/linkage.py --groups --levels off,default [--spreads 0,2,10,30]

Root is needed (a network namespace per user). Per run: one real relay (`python -m relay.main`,
cheap proofs of work) and one real daemon per user (`aegis init --no-passphrase --direct`),
each inside its own network namespace where 127.0.0.1:PORT is a forwarder of ours, so that
every user has the same relay URL (ws://127.0.0.1:PORT/v1/ws, as invitation links carry it)
and yet reaches the relay from an address we choose:

  direct   each user from its own 127.0.0.N (the daemon's defaults: one connection for all);
  hidden   every connection from a fresh random 127.a.b.c, with `isolation` on (one connection
           per mailbox, deposits on short-lived connections): Tor's circuits as the relay sees
           them.

A seeded random contact graph (`--pairs` of `--users`, at least a third idle) and schedule
(active pairs exchange `--messages` texts in bursts over `--duration` seconds; each user goes
offline `--offline` times); every text is delivered and its receipt back before the capture
ends. Then the adversary (bench/linkbench/adversary.py) gets only what the relay sees (a
capture in front of it: each connection's source address and times, each frame's type, size,
mailbox id and time) and the relay's data directory, and tries every route: by address, by
timing (receipt echo, deposit lags, running counts, deposits that stop while someone is away,
and connections that close and come back together, which group mailboxes by owner) and by
the database's row order. Figures (bench/linkbench/metrics.py): precision
at k and AUC at the mailbox and the user level against random guessing, the correlation of
the per-pair counts it recovers with the truth, and how precisely it dates a text.

`--groups` measures something else, without root and without daemons: how well the relay
infers which mailboxes belong to one group from the timing of group fan-outs, with and
without a spread of the fan-out (`privacy.group_spread_max`), for each level given, and what
the spread costs in latency (a simulation that follows the daemon: bench/linkbench/fanout.py).
`--with-groups N` adds N groups (3 or 4 members, made contacts of one another) sending group
messages to the real runs and runs the same attack on their capture (`--group-spread S` sets
the spread on every daemon).

Progress goes to stderr, figures to stdout (`--json FILE`: every figure of every run).
`--scale S` observes S times longer at the same rates (S times the duration, texts and
absences); `--compress C` says the run stands for C times its length of use, and divides the
daemon's own time settings of a level (`Scaled` below) by C, so that a run of minutes stands
for days (with the daemon started with --test-methods, which such settings need).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.linkbench import adversary, fanout, metrics  # noqa: E402
from bench.linkbench import workload as wl  # noqa: E402
from bench.linkbench.world import BenchError, Call, Config, Scaled, log, run  # noqa: E402

# --- what a level and a configuration ask of every daemon (edit here) -------------------------
#
# A level is the JSON-RPC calls made on every daemon after it starts, before any contact. A
# daemon that does not know a method or a parameter fails the run with a message saying so,
# unless the call is optional. A `Scaled(seconds)` value is sent divided by --compress, and
# only when --compress is not 1.
LEVELS: dict[str, list[Call]] = {
    "off": [Call("privacy.set", {"level": "off"}, optional=True)],  # today: nothing to set
    "default": [Call("privacy.set", {"level": "default", "interval": Scaled(1200.0)})],
    "strong": [Call("privacy.set", {"level": "strong", "interval": Scaled(120.0)})],
}
CONFIGS: dict[str, Config] = {
    "direct": Config("per-user"),
    "hidden": Config("per-connection", (Call("settings.set", {"isolation": True}),)),
}
# Issue 13's target, with addresses hidden at the default level (user pairs, combined route).
TARGET_P_OVER_RANDOM, TARGET_AUC, TARGET_R = 0.1, 0.6, 0.2

FIGURES = ("mbox_p", "mbox_auc", "user_p", "user_auc", "count_r", "count_rho")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=7, help="contact pairs (default 7)")
    ap.add_argument("--idle-fraction", type=float, default=1 / 3,
                    help="share of the pairs that never write (default 1/3, at least)")
    ap.add_argument("--messages", type=int, nargs=2, default=(10, 40), metavar=("MIN", "MAX"),
                    help="texts per active pair over the run (default 10 40)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of messaging")
    ap.add_argument("--offline", type=int, default=1, help="absences per user (default 1)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="observe S times longer: duration, texts and absences times S")
    ap.add_argument("--compress", type=float, default=1.0,
                    help="the run stands for C times its length: level timers divided by C")
    ap.add_argument("--seeds", type=int, default=5, help="runs per configuration and level")
    ap.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    ap.add_argument("--configs", default="direct,hidden", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--levels", default="off", help=f"of {', '.join(LEVELS)} (default off)")
    ap.add_argument("--drain", type=float, default=None,
                    help="seconds to wait for every text and receipt after the schedule "
                         "(default 60, or half the duration if longer)")  # fmt: skip
    ap.add_argument("--groups", action="store_true",
                    help="group inference from fan-out timing (simulated; no root needed)")
    ap.add_argument("--spreads", default="0,2,10,30,60",
                    help="with --groups: fan-out spreads to measure with cover off, seconds")
    ap.add_argument("--with-groups", type=int, default=0, metavar="N",
                    help="real runs: N groups of 3 or 4 members (made contacts) who send "
                         "10 to 40 group messages each; reports the group attack too")
    ap.add_argument("--group-spread", type=float, default=None, metavar="SECONDS",
                    help="real runs: privacy.group_spread_max on every daemon (divided by "
                         "--compress)")
    ap.add_argument("--group-texts", type=int, nargs=2, default=(10, 40), metavar=("MIN", "MAX"),
                    help="messages per group per day with --groups, per run with "
                         "--with-groups (default 10 40; 0 0: groups made, nothing sent)")
    ap.add_argument("--no-bursts", action="store_true",
                    help="with --groups: every text and group message alone, not in bursts")
    ap.add_argument("--smoke", action="store_true",
                    help="3 users, 2 pairs, a few texts, one seed: a check that it all runs")
    ap.add_argument("--json", type=Path, help="write every figure of every run here")
    ap.add_argument("--keep", action="store_true", help="keep the runs' directories (logs)")
    ap.add_argument("--save", type=Path, metavar="DIR",
                    help="pickle each run's capture, database rows and truth into DIR")
    ap.add_argument("--reanalyze", type=Path, nargs="+", metavar="PICKLE",
                    help="no run: attack and report runs saved with --save")
    args = ap.parse_args(argv)
    if args.smoke:
        args.users, args.pairs, args.messages, args.duration = 3, 2, (5, 6), 10.0
        args.seeds = 1
    for name, table, given in (("--configs", CONFIGS, args.configs),
                               ("--levels", LEVELS, args.levels)):  # fmt: skip
        unknown = [x for x in given.split(",") if x not in table]
        if unknown:
            ap.error(f"{name}: unknown {', '.join(unknown)} (known: {', '.join(table)})")
    if args.compress <= 0 or args.scale <= 0:
        ap.error("--compress and --scale must be positive")
    return args


def workload_params(args: argparse.Namespace) -> wl.Params:
    p = wl.Params(
        users=args.users, pairs=args.pairs, idle_fraction=args.idle_fraction,
        min_messages=args.messages[0], max_messages=args.messages[1], duration=args.duration,
        offline=args.offline,
        offline_length=(3.0, 5.0) if args.smoke else wl.Params.offline_length,
        groups=args.with_groups, group_messages=tuple(args.group_texts),
    )  # fmt: skip
    return p.scaled(args.scale) if args.scale != 1 else p


# --- reporting ---------------------------------------------------------------------------------


def _fmt(xs: list[float | None], width: int = 15) -> str:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    if not vals:
        return "-".ljust(width)
    mean = statistics.fmean(vals)
    if len(vals) == 1 or max(vals) - min(vals) < 0.005:
        return f"{mean:5.2f}".ljust(width)
    return f"{mean:5.2f} [{min(vals):.2f},{max(vals):.2f}]".ljust(width)


def report(config: str, level: str, args: argparse.Namespace, p: wl.Params,
           runs: list[dict[str, Any]]) -> None:  # fmt: skip
    results: list[metrics.Result] = [r["result"] for r in runs]
    r0 = results[0]
    idle = r0.k_user - len(runs[0]["active"])
    texts = statistics.fmean(r.texts for r in results)
    secs = statistics.fmean(r["seconds"] for r in runs)
    seeds = ",".join(str(r["seed"]) for r in runs)
    stands = (f"; stands for {p.duration * args.compress / 3600:.1f} h of use (--compress "
              f"{args.compress:g})" if args.compress != 1 else "")  # fmt: skip
    print(f"\n== {config}, level {level}: {p.users} users, {r0.k_user} contact pairs ({idle} idle)"
          f", {len(runs)} seed(s) [{seeds}] x {p.duration:.0f} s of messaging{stands}; "
          f"{texts:.0f} texts per run; {secs:.0f} s per run")
    print("  mean over seeds [min,max]; k = true pairs: mailbox level "
          f"k={r0.k_mbox} of {r0.n_mbox}, user level k={r0.k_user} of {r0.n_user}")
    print(f"  {'route':10} {'mailbox P@k':15} {'mailbox AUC':15} {'user P@k':15} "
          f"{'user AUC':15} {'count r':15} {'count rho':15}")
    for route in r0.routes:
        cells = [_fmt([getattr(r.routes[route], f) for r in results]) for f in FIGURES]
        avail = all(r.routes[route].available for r in results)
        print(f"  {route:10} {' '.join(cells)}{'' if avail else '  (not available)'}")
    rnd = [_fmt([getattr(r.random, f) for r in results]) for f in FIGURES]
    print(f"  {'random':10} {' '.join(rnd)}")
    p95m = statistics.fmean(r.random_p95[0] for r in results)
    p95u = statistics.fmean(r.random_p95[1] for r in results)
    print(f"  {'random p95':10} {p95m:5.2f}{'':10} {'':15} {p95u:5.2f}")
    for name in r0.ownership:
        os_ = [r.ownership[name] for r in results]
        print(f"  owners by {name:9} {statistics.fmean(o.clusters for o in os_):4.1f} clusters "
              f"for {p.users} users; mailboxes attributed right {_fmt([o.accuracy for o in os_])}"
              f" same-owner links: precision {_fmt([o.pair_precision for o in os_])} "
              f"recall {_fmt([o.pair_recall for o in os_])}".rstrip())
    w = [r.when for r in results]
    res = [x.resolution_s for x in w]
    res_s = ("none" if all(x is None for x in res) else
             "/".join("none" if x is None else f"{x:g} s" for x in res))  # fmt: skip
    print(f"  when: nearest deposit to a text {_fmt([x.median_ms for x in w]).strip()} ms "
          f"median, {_fmt([x.p90_ms for x in w]).strip()} ms p90 (given its conversation); "
          f"resolution (deposits per bin vs texts per bin, r >= 0.5): {res_s}")
    gf: list[fanout.Figures] = [r["groups"] for r in runs if r.get("groups") is not None]
    if gf:
        gw = max(fanout.REAL_WINDOWS, key=lambda x: statistics.fmean(f.auc[x] for f in gf))
        print(f"  groups by fan-out timing (mailbox pairs of one group, first seed k={gf[0].k} of "
              f"{gf[0].n}): window {gw:g} s, P@k {_fmt([f.p_at_k[gw] for f in gf]).strip()}, "
              f"AUC {_fmt([f.auc[gw] for f in gf]).strip()}; at 0.05 s AUC "
              f"{_fmt([f.auc[0.05] for f in gf]).strip()}; random P@k "
              f"{statistics.fmean(f.k / f.n for f in gf):.2f}")
    comb = [r.routes["combined"] for r in results]
    p_over = statistics.fmean(c.user_p - r.random.user_p for c, r in zip(comb, results,
                                                                         strict=True))
    auc_m = statistics.fmean(c.user_auc for c in comb)
    rs = [c.count_r for c in comb]
    r_m = statistics.fmean(x if x is not None else 0.0 for x in rs)
    met = p_over <= TARGET_P_OVER_RANDOM and auc_m <= TARGET_AUC and r_m < TARGET_R
    print(f"  target (issue 13; for hidden at level default): user P@k - random "
          f"{p_over:+.2f} (<= {TARGET_P_OVER_RANDOM}), AUC {auc_m:.2f} (<= {TARGET_AUC}), "
          f"count r {r_m:.2f} (< {TARGET_R}): {'met' if met else 'NOT met'}")
    sys.stdout.flush()


def to_json(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: to_json(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k) if not isinstance(k, tuple) else "-".join(k): to_json(v)
                for k, v in x.items()}  # fmt: skip
    if isinstance(x, list | tuple):
        return [to_json(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# --- main --------------------------------------------------------------------------------------


def analyze(saved: dict[str, Any]) -> dict[str, Any]:
    """Attack one run and score the attack; the figures as `report` wants them."""
    data = saved["data"]
    result = metrics.evaluate(data, adversary.attack(data.capture, data.db))
    c = result.routes["combined"]
    log(f"  {saved['config']}, level {saved['level']}, seed {saved['seed']}: "
        f"{data.seconds:.0f} s; combined: mailbox P@k {c.mbox_p:.2f} AUC {c.mbox_auc:.2f}, "
        f"user P@k {c.user_p:.2f} AUC {c.user_auc:.2f}")
    groups = fanout.from_run(data)
    if groups is not None:
        w, p_k, a = groups.best()
        log(f"    groups by fan-out: best window {w:g} s, mailbox P@k {p_k:.2f} AUC {a:.2f} "
            f"(random {groups.k / groups.n:.2f})")
    return {"seed": saved["seed"], "seconds": data.seconds, "result": result,
            "active": saved["active"], "config": saved["config"], "level": saved["level"],
            "groups": groups}


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.groups:
        seeds = list(range(args.seed, args.seed + args.seeds))
        fanout.run(seeds, [float(x) for x in args.spreads.split(",")], args.levels.split(","),
                   fanout.Params(group_texts=tuple(args.group_texts),
                                 burst=(1, 1) if args.no_bursts else (2, 8)))  # fmt: skip
        return 0
    if os.geteuid() != 0 and not args.reanalyze:
        print("bench/linkage.py needs root: it makes a network namespace per user",
              file=sys.stderr)  # fmt: skip
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    # The children import this tree (not whatever the interpreter's site-packages point at).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    p = workload_params(args)
    drain = args.drain if args.drain is not None else max(60.0, p.duration / 2)
    seeds = list(range(args.seed, args.seed + args.seeds))
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    t_all = time.monotonic()
    try:
        if args.reanalyze:
            groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
            for path in args.reanalyze:
                with open(path, "rb") as f:
                    saved = pickle.load(f)
                key = (saved["config"], saved["level"], repr(saved["params"]))
                groups.setdefault(key, []).append(saved)
            for (config, level, _), saved_runs in groups.items():
                runs = [analyze(s) for s in saved_runs]
                report(config, level, args, saved_runs[0]["params"], runs)
                out["runs"] += [{**r, "result": to_json(r["result"])} for r in runs]
            return 0
        for config in args.configs.split(","):
            for level in args.levels.split(","):
                runs = []
                for seed in seeds:
                    work = wl.make(p, seed)
                    base = Path(tempfile.mkdtemp(prefix="lk", dir="/tmp"))
                    log(f"{config}, level {level}, seed {seed}: {base}")
                    try:
                        calls = list(LEVELS[level])
                        if args.group_spread is not None:
                            calls.append(Call("settings.set", {
                                "group_spread_max": args.group_spread / args.compress}))
                        data = run(base, work, CONFIGS[config], calls, args.compress,
                                   seed, drain)  # fmt: skip
                    finally:
                        if not args.keep:
                            shutil.rmtree(base, ignore_errors=True)
                    saved = {"seed": seed, "config": config, "level": level, "params": p,
                             "active": work.active, "data": data}
                    if args.save is not None:
                        args.save.mkdir(parents=True, exist_ok=True)
                        with open(args.save / f"{config}-{level}-{seed}.pickle", "wb") as f:
                            pickle.dump(saved, f)
                    runs.append(analyze(saved))
                report(config, level, args, p, runs)
                out["runs"] += [{**r, "result": to_json(r["result"])} for r in runs]
    except BenchError as exc:
        print(f"bench/linkage.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/linkage.py: interrupted; everything it started is stopped",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        if args.json is not None:
            with contextlib.suppress(OSError):
                args.json.write_text(json.dumps(to_json(out), indent=1))
    log(f"done in {time.monotonic() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
