"""aegis_client against real aegisd processes: typed results and errors, events across
daemon restarts (nothing missed, nothing twice), and no cryptography imported."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

import aegis_client
from aegis_client import (
    Client,
    DaemonNotRunning,
    Event,
    InvalidParams,
    Locked,
    MethodNotFound,
    NotFound,
    WrongPassphrase,
)
from aegis_client.errors import AppError, from_error_object

from .conftest import run

PASSPHRASE = "tr0ub4dor & 3"  # tests/daemon/conftest.py's


def test_typed_results_and_errors(spawn, short_tmp: Path) -> None:
    d = spawn()  # a passphrase: the daemon starts locked

    async def scenario() -> None:
        async with await Client.connect(d.home) as c:
            v = await c.version()
            assert v["api_version"] == 2 and isinstance(v["version"], str)
            st = await c.status()
            assert st["locked"] is True and st["has_passphrase"] is True
            with pytest.raises(Locked) as locked:
                await c.call("events.list")
            assert locked.value.code == 1001 and locked.value.error == "locked"
            with pytest.raises(WrongPassphrase):
                await c.unlock("not it")
            await c.unlock(PASSPHRASE)
            assert (await c.status())["locked"] is False
            with pytest.raises(MethodNotFound):
                await c.call("no.such.method")
            with pytest.raises(InvalidParams) as bad:
                await c.call("events.list", {"limit": "ten"})
            assert bad.value.field == "limit"
            with pytest.raises(NotFound):
                await c.send("nobody", "hello")
            assert await c.contacts() == []
            assert await c.conversations() == []
            assert await c.search("hello") == {"results": [], "next_offset": None}
            with pytest.raises(InvalidParams) as bad:
                await c.search('"" !!')  # nothing to search for: a clear -32602
            assert bad.value.field == "query"
            # Several calls at once on one connection: answered to the right callers.
            results = await asyncio.gather(
                *[c.call("debug.emit", {"type": "debug.n", "data": {"i": i}}) for i in range(20)]
            )
            assert len({r["seq"] for r in results}) == 20

        with pytest.raises(DaemonNotRunning):
            await Client.connect(short_tmp / "nobody-here")

    run(scenario())


def test_default_profile_from_environment(spawn, short_tmp: Path, monkeypatch) -> None:
    d = spawn(passphrase=None)
    monkeypatch.setenv("AEGIS_HOME", str(d.home))
    assert aegis_client.socket_path() == d.sock

    async def scenario() -> None:
        async with await Client.connect() as c:
            assert (await c.status())["locked"] is False

    run(scenario())


def test_error_classes_by_name() -> None:
    e = from_error_object({"code": 1024, "message": "x", "data": {"error": "no_relay"}})
    assert isinstance(e, aegis_client.NoRelay) and isinstance(e, aegis_client.NotReady)
    e = from_error_object({"code": 1099, "message": "new", "data": {"error": "future"}})
    assert type(e) is AppError and e.error == "future"
    e = from_error_object({"code": 1010, "message": "m", "data": {"error": "relay_unavailable"}})
    assert isinstance(e, aegis_client.RelayUnavailable)


def _emit(d, n: int, start: int) -> list[int]:
    with d.client() as c:
        return [
            c.call("debug.emit", {"type": "debug.tick", "data": {"i": i}})["seq"]
            for i in range(start, start + n)
        ]


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_events_across_daemon_restarts(spawn, short_tmp: Path, how: str) -> None:
    """Events emitted before, during and after restarts arrive once each, in order; some were
    still unread in the stream's buffer when the daemon went away."""
    home = short_tmp / "p"
    d = spawn(home=home, passphrase=None)
    first = _emit(d, 3, 0)

    async def scenario() -> None:
        nonlocal d
        client = await Client.connect(home)
        stream = client.events(types=["debug.*"], since=first[0] - 1, max_delay=0.2)
        got: list[Event] = []
        for _ in range(2):
            got.append(await anext(stream))
        _emit(d, 4, 3)  # 1 + 4 now unread, some already in the stream's buffer
        got.append(await anext(stream))
        (d.stop if how == "stop" else d.kill)()
        d = spawn(home=home, passphrase=None)
        _emit(d, 3, 7)
        while len(got) < 10:
            got.append(await anext(stream))
        # A second restart while the stream waits for the next event.
        d.stop()
        d = spawn(home=home, passphrase=None)
        _emit(d, 2, 10)
        while len(got) < 12:
            got.append(await anext(stream))
        await stream.aclose()
        await client.close()
        assert [e.data["i"] for e in got] == list(range(12))
        seqs = [e.seq for e in got]
        assert seqs == sorted(set(seqs))
        assert all(e.type == "debug.tick" for e in got)
        assert stream.subscriptions == 3
        assert stream.last_seq == seqs[-1]

    run(scenario())


def test_events_from_now_and_no_reconnect(spawn) -> None:
    d = spawn(passphrase=None)
    _emit(d, 2, 0)  # before the subscription: not delivered

    async def scenario() -> None:
        client = await Client.connect(d.home)
        stream = client.events(types=["debug.tick"], reconnect=False)
        first = anext(stream)
        task = asyncio.ensure_future(first)
        await asyncio.sleep(0.5)
        _emit(d, 1, 2)
        ev = await task
        assert ev.data == {"i": 2}
        d.stop()
        with pytest.raises(aegis_client.ConnectionLost):
            await anext(stream)
        await client.close()

    run(scenario())


FORBIDDEN = ("cryptography", "nacl", "sqlcipher3", "aiohttp", "aiortc", "argon2", "jsonrpcserver")


@pytest.mark.parametrize("module", ["aegis_client", "aegis_bridge.main", "contrib.echo_bot"])
def test_thin_clients_import_no_crypto(module: str) -> None:
    root = Path(__file__).resolve().parents[2]
    if module == "contrib.echo_bot" and not (root / "contrib" / "echo_bot.py").exists():
        pytest.skip("contrib/echo_bot.py not written yet")
    code = (
        "import importlib, json, sys, runpy\n"
        f"m = {module!r}\n"
        "if m.startswith('contrib.'):\n"
        "    runpy.run_path(m.replace('.', '/') + '.py', run_name='not_main')\n"
        "else:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    mods = json.loads(out)
    bad = [m for m in mods if m.split(".")[0] in FORBIDDEN]
    assert not bad, bad
    daemon_internals = [m for m in mods if m.startswith("aegisd.") and m != "aegisd.paths"]
    assert not daemon_internals, daemon_internals


def test_file_caption_batch_and_typing_wrappers(spawn, short_tmp: Path) -> None:
    """The typed wrappers of issue 17 (files) reach the daemon's methods and their errors."""
    d = spawn()
    src = short_tmp / "a.txt"
    src.write_text("a")

    async def scenario() -> None:
        async with await Client.connect(d.home) as c:
            await c.unlock(PASSPHRASE)
            cfg = await c.typing_config()
            assert cfg["enabled"] is False and cfg["interval"] == 5.0
            assert (await c.typing_config(True))["enabled"] is True
            assert (await c.typing_config(False))["counts"]["sent"] == 0
            with pytest.raises(NotFound):
                await c.typing("nobody", True)
            with pytest.raises(InvalidParams) as bad:
                await c.send_file("nobody", str(src), caption="x" * 2049)
            assert bad.value.field == "caption"
            with pytest.raises(InvalidParams) as bad:
                await c.send_files("nobody", [str(src)] * 33)
            assert bad.value.field == "paths"
            with pytest.raises(NotFound):
                await c.send_files("nobody", [str(src), str(src)], caption="two")

    asyncio.run(scenario())
