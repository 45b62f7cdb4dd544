"""JSON-RPC 2.0 to the letter, against a real aegisd on a real Unix socket."""

from __future__ import annotations

import json

import pytest

from aegis_cli.client import RpcCallError

from .conftest import PASSPHRASE


@pytest.fixture
def conn(spawn):
    d = spawn()
    c = d.client()
    yield c
    c.close()


def raw(c, text: str):
    c.send_raw(text.encode() + b"\n")
    return c.read_message()


def test_parse_error(conn):
    r = raw(conn, '{"jsonrpc": "2.0", "method": "version", "id": 1')
    assert r["error"]["code"] == -32700 and r["id"] is None
    assert r["error"]["data"] == {"error": "parse_error"}
    r = raw(conn, '{"jsonrpc": "2.0", "method": "version", "params": [NaN], "id": 1}')
    assert r["error"]["code"] == -32700
    conn.send_raw(b"\xff\xfe\n")
    assert conn.read_message()["error"]["code"] == -32700
    # The connection is still usable.
    assert conn.call("version")["api_version"] == 2


@pytest.mark.parametrize(
    "req",
    [
        "1",
        '"version"',
        '{"method": "version", "id": 1}',
        '{"jsonrpc": "1.0", "method": "version", "id": 1}',
        '{"jsonrpc": "2.0", "method": 5, "id": 1}',
        '{"jsonrpc": "2.0", "method": "version", "params": "x", "id": 1}',
    ],
)
def test_invalid_request(conn, req):
    r = raw(conn, req)
    assert r["jsonrpc"] == "2.0"
    assert r["error"]["code"] == -32600
    assert r["error"]["data"]["error"] == "invalid_request"  # one shape: data.error names it
    assert r["id"] is None


def test_method_not_found(conn):
    r = raw(conn, '{"jsonrpc": "2.0", "method": "no.such", "id": "a"}')
    assert r == {
        "jsonrpc": "2.0",
        "error": {
            "code": -32601,
            "message": "Method not found",
            "data": {"error": "method_not_found", "method": "no.such"},
        },
        "id": "a",
    }


def test_invalid_params_name_the_field(conn):
    r = raw(conn, '{"jsonrpc": "2.0", "method": "events.list", "params": {"since": "x"}, "id": 1}')
    # events.list needs the store; the params are checked first all the same.
    assert r["error"]["code"] == -32602
    assert "'since'" in r["error"]["message"] and "integer" in r["error"]["message"]
    assert r["error"]["data"] == {"error": "invalid_params", "field": "since", "reason": "type"}
    r = raw(conn, '{"jsonrpc": "2.0", "method": "unlock", "params": {"pass": "x"}, "id": 2}')
    assert r["error"]["code"] == -32602 and "'pass'" in r["error"]["message"]
    r = raw(conn, '{"jsonrpc": "2.0", "method": "events.unsubscribe", "params": {}, "id": 3}')
    assert r["error"]["code"] == -32602
    assert r["error"]["message"] == "Invalid params: 'subscription' is required"
    r = raw(conn, '{"jsonrpc": "2.0", "method": "version", "params": [1], "id": 4}')
    assert r["error"]["code"] == -32602
    r = raw(conn, '{"jsonrpc": "2.0", "method": "unlock", "params": [true], "id": 5}')
    assert r["error"]["data"]["field"] == "passphrase" and r["id"] == 5
    r = raw(conn, '{"jsonrpc": "2.0", "method": "unlock", "params": {"passphrase": ""}, "id": 6}')
    assert r["error"]["code"] == -32602 and "'passphrase'" in r["error"]["message"]


def test_positional_params(conn):
    assert conn.call("unlock", [PASSPHRASE])["locked"] is False
    assert conn.call("events.list", [0, 1])["events"][0]["type"] == "daemon.unlocked"
    # the order before groups was kept, `group` added last (review of issue 17, L10)
    with pytest.raises(RpcCallError) as err:
        conn.call("conversations.set_timer", ["nobody", 3600])
    assert err.value.code == 1020  # bound as (contact, seconds): no such contact
    with pytest.raises(RpcCallError) as err:
        conn.call("conversations.set_timer", ["nobody"])
    assert err.value.code == -32602 and err.value.data["field"] == "seconds"  # still required
    with pytest.raises(RpcCallError) as err:
        conn.call("messages.reply", ["nobody", "ab" * 16])
    assert err.value.code == -32602 and err.value.data["field"] == "text"
    with pytest.raises(RpcCallError) as err:
        conn.call("messages.reply", ["nobody", "ab" * 16, "hello"])
    assert err.value.code == 1020


def test_notifications_get_no_response(conn):
    conn.send_raw(b'{"jsonrpc": "2.0", "method": "version"}\n')
    conn.send_raw(b'{"jsonrpc": "2.0", "method": "no.such"}\n')
    conn.send_raw(b'{"jsonrpc": "2.0", "method": "unlock", "params": {"x": 1}}\n')
    # The next thing on the wire is the answer to this request, not to the notifications.
    r = raw(conn, '{"jsonrpc": "2.0", "method": "version", "id": 42}')
    assert r["id"] == 42 and "result" in r


def test_batches(conn):
    r = raw(conn, "[]")
    assert r["error"]["code"] == -32600 and r["id"] is None
    r = raw(conn, "[1, 2, 3]")
    assert isinstance(r, list) and len(r) == 3
    assert all(x["error"]["code"] == -32600 and x["id"] is None for x in r)
    batch = [
        {"jsonrpc": "2.0", "method": "version", "id": 1},
        {"jsonrpc": "2.0", "method": "version"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "no.such", "id": "5"},
        {"jsonrpc": "2.0", "method": "status", "id": 9},
    ]
    r = raw(conn, json.dumps(batch))
    assert [x["id"] for x in r] == [1, None, "5", 9]
    assert r[0]["result"]["api_version"] == 2
    assert r[1]["error"]["code"] == -32600
    assert r[2]["error"]["code"] == -32601
    assert r[3]["result"]["locked"] is True
    # A batch of notifications only: no response at all.
    conn.send_raw(
        b'[{"jsonrpc": "2.0", "method": "version"}, {"jsonrpc": "2.0", "method": "status"}]\n'
    )
    assert raw(conn, '{"jsonrpc": "2.0", "method": "version", "id": 7}')["id"] == 7


def test_oversized_request_gets_an_error_and_the_daemon_goes_on(spawn):
    d = spawn()
    with d.client() as c, d.client() as other:
        big = '{"jsonrpc": "2.0", "method": "version", "params": ["' + "x" * (3 << 20) + '"]}'
        c.send_raw(big.encode() + b"\n")
        r = c.read_message()
        assert r["error"]["code"] == -32600 and r["id"] is None
        assert r["error"]["data"] == {"error": "request_too_large", "limit": 1 << 20}
        # The same connection, and others, keep working.
        assert c.call("version")["api_version"] == 2
        assert other.call("version")["api_version"] == 2
        # Just under the limit is accepted (and answered with invalid params, not an error).
        pad = (1 << 20) - len('{"jsonrpc":"2.0","method":"version","params":[""],"id":1}')
        ok = '{"jsonrpc":"2.0","method":"version","params":["' + "y" * pad + '"],"id":1}'
        assert len(ok) == 1 << 20
        c.send_raw(ok.encode() + b"\n")
        assert c.read_message()["error"]["code"] == -32602
    assert d.proc.poll() is None


def test_application_errors_are_in_range_with_data(conn):
    with pytest.raises(RpcCallError) as exc:
        conn.call("events.subscribe")
    assert exc.value.code == 1001 and exc.value.data == {"error": "locked"}
    with pytest.raises(RpcCallError) as exc:
        conn.call("unlock", {"passphrase": "wrong"})
    assert exc.value.code == 1002 and exc.value.data == {"error": "wrong_passphrase"}
    assert exc.value.message == "wrong passphrase"
    with pytest.raises(RpcCallError) as exc:
        conn.call("events.unsubscribe", {"subscription": "nope"})
    assert exc.value.code == 1005 and exc.value.data["error"] == "no_such_subscription"


def test_crlf_and_blank_lines_are_tolerated(conn):
    conn.send_raw(b"\n\r\n")
    conn.send_raw(b'{"jsonrpc": "2.0", "method": "version", "id": 3}\r\n')
    assert conn.read_message()["id"] == 3


def test_deeply_nested_json_is_an_error_not_a_crash(spawn):
    d = spawn()
    with d.client() as c:
        deep = "[" * 200_000 + "]" * 200_000
        r = raw(c, deep)
        assert r["error"]["code"] == -32700
        params = "[" * 900 + "]" * 900
        r = raw(c, '{"jsonrpc": "2.0", "method": "version", "params": ' + params + ', "id": 1}')
        assert "error" in r
        assert c.call("version")["api_version"] == 2
    assert d.proc.poll() is None


def test_many_clients_at_once(spawn):
    import threading

    d = spawn(passphrase=None)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with d.client() as c:
                for i in range(20):
                    assert c.call("debug.emit", {"type": "debug.load", "data": {"i": i}})["seq"]
                    assert c.call("version")["api_version"] == 2
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with d.client() as c:
        r = c.call("events.list", {"types": ["debug.load"], "limit": 1000})
        seqs = [e["seq"] for e in r["events"]]
        assert len(seqs) == 24 * 20 and seqs == sorted(set(seqs))
