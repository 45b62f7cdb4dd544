"""docs/openrpc.json against the methods a running daemon actually serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.rpc.openrpc import schema_of
from aegisd.store import create_profile

from .conftest import DaemonProc

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "openrpc.json"
FIX = "regenerate it: python -m aegisd.rpc.openrpc > docs/openrpc.json (and update docs/api.md)"


def _by_name(doc: dict[str, Any]) -> dict[str, Any]:
    return {m["name"]: m for m in doc["methods"]}


@pytest.fixture
def daemon(short_tmp: Path) -> Any:
    home = short_tmp / "p"
    create_profile(home, None).close()
    d = DaemonProc(home, [], None)  # a normal daemon: no test methods
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def test_docs_openrpc_matches_the_running_daemon(daemon: DaemonProc) -> None:
    committed = json.loads(DOC.read_text())
    with daemon.client() as c:
        served = c.call("rpc.discover")
    want, got = _by_name(committed), _by_name(served)
    assert sorted(got) == sorted(want), (
        f"methods served but not in docs/openrpc.json: {sorted(set(got) - set(want))}; "
        f"described but not served: {sorted(set(want) - set(got))}; {FIX}"
    )
    for name in sorted(want):
        assert got[name] == want[name], f"{name} differs from docs/openrpc.json; {FIX}"
    assert served == committed, f"docs/openrpc.json differs; {FIX}"


def test_every_described_method_is_served_and_no_other(daemon: DaemonProc) -> None:
    """Independent of rpc.discover: each described method exists (a bad param is refused with
    -32602 before the method runs, so nothing happens), and an undescribed one does not."""
    doc = json.loads(DOC.read_text())
    with daemon.client() as c:
        for m in doc["methods"]:
            with pytest.raises(RpcCallError) as err:
                c.call(m["name"], {"no_such_param_": 1})
            assert err.value.code == -32602, (m["name"], err.value.message)
            required = [p["name"] for p in m["params"] if p["required"]]
            if required:
                with pytest.raises(RpcCallError) as err:
                    c.call(m["name"], {})
                assert err.value.code == -32602
                assert err.value.data["field"] == required[0]
        for name in ("debug.emit", "rpc.nothing", "messages.sendd"):
            with pytest.raises(RpcCallError) as err:
                c.call(name)
            assert err.value.code == -32601


def test_script_writes_the_committed_document() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aegisd.rpc.openrpc"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out) == json.loads(DOC.read_text()), FIX


def test_schemas_of_annotations() -> None:
    assert schema_of(str) == {"type": "string"}
    assert schema_of(int | None) == {"type": ["integer", "null"]}
    assert schema_of(float | int | None) == {"type": ["number", "integer", "null"]}
    assert schema_of(list[str] | None) == {
        "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]
    }
    assert schema_of(dict[str, Any]) == {"type": "object"}
    doc = json.loads(DOC.read_text())
    events_list = _by_name(doc)["events.list"]
    assert events_list["x-needs-unlock"] is True
    assert {p["name"]: p["required"] for p in events_list["params"]} == {
        "since": False, "limit": False, "types": False,
    }  # fmt: skip
    assert _by_name(doc)["messages.send"]["params"][0] == {
        "name": "contact", "required": True, "schema": {"type": "string"},
    }  # fmt: skip
