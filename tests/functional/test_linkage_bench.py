"""bench/linkage.py --smoke: the linkage benchmark runs end to end (a relay, three daemons in
network namespaces, both configurations), and on today's system the adversary recovers the
graph in the "direct" configuration far better than random guessing.

The full benchmark (six users, five seeds, minutes per run) is not part of the test suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="bench/linkage.py needs root (a network namespace per user)"
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("linkage") / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "linkage.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== direct, level off" in r.stdout and "== hidden, level off" in r.stdout
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _run(doc: dict[str, Any], config: str) -> dict[str, Any]:
    (run,) = [r for r in doc["runs"] if r["config"] == config]
    result: dict[str, Any] = run["result"]
    return result


def test_direct_graph_recovered_far_above_random(smoke: dict[str, Any]) -> None:
    res = _run(smoke, "direct")
    assert res["texts"] >= 5 and res["k_user"] == 2 and res["k_mbox"] == 2
    combined, rnd = res["routes"]["combined"], res["random"]
    # 2 true mailbox pairs among 6: random guessing finds 1/3 of them.
    assert rnd["mbox_p"] == pytest.approx(1 / 3)
    assert combined["mbox_p"] >= rnd["mbox_p"] + 0.5
    assert combined["mbox_auc"] >= 0.9
    assert combined["user_auc"] >= 0.9
    # Each user from its own address: the address alone names both contact pairs.
    assert res["routes"]["address"]["user_auc"] == 1.0
    assert res["ownership"]["address"]["accuracy"] == 1.0
    # A text is dated to within a fraction of a second by the deposit that carries it.
    assert res["when"]["median_ms"] is not None and res["when"]["median_ms"] < 500


def test_hidden_addresses_say_nothing(smoke: dict[str, Any]) -> None:
    res = _run(smoke, "hidden")
    # Every connection from a fresh address: no deposit shares an address with a mailbox's
    # owner, so the address route scores every pair alike.
    address = res["routes"]["address"]
    assert address["mbox_auc"] == 0.5 and address["user_auc"] == 0.5
    assert res["ownership"]["address"]["pair_recall"] == 0.0
