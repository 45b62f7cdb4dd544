"""docs/ against the code, wherever a table can be read mechanically.

Each test reads a table (or a list) from docs/protocol.md, docs/api.md or docs/backup.md and
the matching definitions from the code, and compares both ways, so that a constant, payload
type, error code, method, param, CLI option or setting changed on one side only fails here
(as tests/relay/test_lifecycle.py does for docs/relay-protocol.md). Nothing is hard-coded but
the places where a table lives.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import importlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import click
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from aegisd.core import errors as core_errors
from aegisd.core import wire

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _read(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The text under the first heading that starts with `heading`, up to the next heading of
    the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}.*$", text, re.M)
    assert m, f"no heading {heading!r}"
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, m.end())
    return text[m.end() : end.start() if end else len(text)]


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """Cells of every row of the tables whose first header cell is `first_header`."""
    rows: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if not inside:
            inside = cells[0] == first_header
            continue
        if set(cells[0]) <= {"-", ":"}:
            continue
        rows.append(cells)
    return rows


def _int(text: str) -> int:
    m = re.match(r"`?(0x[0-9A-Fa-f]+|\d[\d,]*)", text)
    assert m, text
    return int(m.group(1).replace(",", ""), 0)


# --- docs/protocol.md -------------------------------------------------------------------------


def test_protocol_constants_table_matches_the_code() -> None:
    """§2: every row's value is the code's, and every constant of wire.py's constants block
    has a row."""
    rows = table_rows(section(_read("protocol.md"), "2. Constants"), "Name")
    assert rows
    documented: set[str] = set()
    for name_cell, value_cell, _meaning in rows:
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", name_cell)
        module = re.search(r"\(`(\w+)\.py`\)", name_cell)
        mod = importlib.import_module(f"aegisd.core.{module.group(1) if module else 'wire'}")
        values = re.findall(r"`([^`]+)`|(\d[\d,]*)", value_cell)[: len(names)]
        for name, (quoted, plain) in zip(names, values, strict=True):
            assert hasattr(mod, name), f"docs/protocol.md §2 names {name}, {mod.__name__} has none"
            actual = getattr(mod, name)
            if isinstance(actual, bytes):
                expected: Any = bytes(int(b, 16) for b in quoted.split())
            else:
                expected = _int(quoted or plain)
            assert actual == expected, f"§2 {name}: docs {expected!r}, code {actual!r}"
            documented.add(name)
    # The constants block of wire.py: public upper-case names assigned before the reader.
    tree = ast.parse(Path(wire.__file__).read_text())
    block = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            break
        if isinstance(node, ast.Assign):
            block += [t.id for t in node.targets if isinstance(t, ast.Name)]
    missing = [n for n in block if n.isupper() and not n.startswith("_") and n not in documented]
    assert not missing, f"wire.py constants without a row in docs/protocol.md §2: {missing}"


def test_protocol_labels_are_the_code_labels() -> None:
    """§2's labels, salts and info strings are byte strings of the core, of the stated length."""
    rows = table_rows(section(_read("protocol.md"), "2. Constants"), "Where")
    source = b"".join(p.read_bytes() for p in (ROOT / "aegisd" / "core").glob("*.py"))
    labels = [label for _w, data, _n in rows for label in re.findall(r'`"([^"]+)"`', data)]
    assert len(labels) == sum(1 for r in rows if r[1].startswith('`"'))
    for _where, data, length in rows:
        for label in re.findall(r'`"([^"]+)"`', data):
            assert f'b"{label}"'.encode() in source, f"label {label!r} is not in aegisd/core"
            assert len(label) == int(length), f"label {label!r} is not {length} bytes"
    assert labels


def test_protocol_payload_types_match_the_code() -> None:
    """§17: one row per payload type byte, the same set as wire.PAYLOAD_*."""
    rows = table_rows(section(_read("protocol.md"), "17. Application payloads"), "Type")
    documented = {_int(r[0]) for r in rows}
    code = {v for k, v in vars(wire).items() if k.startswith("PAYLOAD_")}
    assert documented == code, (
        f"payload types in docs/protocol.md §17 but not in wire.py: {documented - code}; "
        f"in wire.py but not documented: {code - documented}"
    )
    for name, value in vars(wire).items():
        if name.startswith("PAYLOAD_"):
            assert any(_int(r[0]) == value for r in rows), name


def test_protocol_call_kinds_and_signals_match_the_code() -> None:
    """§21.1: set-up kinds (wire.CALL_*) and sealed signal kinds (aegisd/calls/signaling.py)."""
    from aegisd.calls import signaling

    text = section(_read("protocol.md"), "21.1 Payloads")
    rows = table_rows(text, "Kind")
    setup = {_int(r[0]): r[1] for r in rows if len(r) == 4}
    signals = {_int(r[0]): r[1] for r in rows if len(r) == 3}
    code_kinds = {
        v: k.removeprefix("CALL_")
        for k, v in vars(wire).items()
        if k.startswith("CALL_") and not k.startswith("CALL_REASON_") and v in wire.CALL_KINDS
    }
    assert setup == code_kinds
    assert set(setup) == set(wire.CALL_KINDS)
    code_signals = {
        v: k.removeprefix("SIG_")
        for k, v in vars(signaling).items()
        if k.startswith("SIG_") and k.removeprefix("SIG_") in signals.values()
    }
    assert signals == code_signals
    assert f"`data` is at most {signaling.MAX_SIG_DATA} bytes" in " ".join(text.split())
    assert f"1 <= n <= {wire.MAX_CALL_SEALED}" in text
    # The example INVITE is what the encoder writes.
    example = re.search(r"`(01 06 [0-9a-f …]+)`", text)
    assert example
    hexed = example.group(1).replace("1111…11", "11" * wire.CALL_KEY_LEN).replace(" ", "")
    invite = wire.CallPayload(bytes(range(16)), wire.CALL_INVITE, key=b"\x11" * 32, video=True,
                              sent_at_ms=258)  # fmt: skip
    assert wire.encode_payload(invite).hex() == hexed
    assert f"`{wire.CALL_REASON_REJECTED}` rejected" in text or "1 rejected" in text
    assert f"{wire.CALL_REASON_BUSY} busy" in text


def test_protocol_error_hierarchy_matches_the_code() -> None:
    """§14's tree is aegisd/core/errors.py's classes, each under its parent."""
    text = section(_read("protocol.md"), "14. Errors")
    tree = re.search(r"```\n(.*?)```", text, re.S)
    assert tree
    parents: list[tuple[int, str]] = []
    documented = set()
    for line in tree.group(1).splitlines():
        m = re.match(r"([│ ]*)(?:[└├]── )?(\w+)\s", line + " ")
        assert m, line
        depth, name = len(m.group(1)) // 4 + (1 if "──" in line else 0), m.group(2)
        cls = getattr(core_errors, name, None)
        assert isinstance(cls, type), f"§14 names {name}, aegisd/core/errors.py has none"
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if parents:
            assert cls.__bases__ == (getattr(core_errors, parents[-1][1]),), name
        parents.append((depth, name))
        documented.add(name)
    code = {
        n
        for n, c in vars(core_errors).items()
        if isinstance(c, type) and issubclass(c, core_errors.AegisError)
    }
    assert documented == code, f"undocumented error classes: {code - documented}"


def test_byte_ranges_are_inclusive_as_section_1_says() -> None:
    """§1: X[a..b] is inclusive. A range used as associated data or a digest input must have
    the length of the prefix it names (the off-by-one of §23.1 was `block[0..33]` for 33
    bytes)."""
    text = _read("protocol.md")
    assert "`X[a..b]` are bytes `a` to `b`\n  inclusive" in text
    assert "[0:" not in text and not re.search(r"\w\[\d+:\d+\]", text), "slice notation"
    prefixes = {
        "block[0..1132]": wire.FIRST_CONTACT_PREFIX_LEN,
        "block[0..32]": 1 + 32,  # renewal block: version and salt
        "block[1..2341]": wire.ENC_HEADER_LEN,
        "block[1133..16383]": wire.BLOCK_SIZE - wire.FIRST_CONTACT_PREFIX_LEN,
        "inner[0..127]": wire.IDENTITY_LEN,
        "inner[128..15234]": wire.FIRST_CONTACT_INNER_LEN - wire.IDENTITY_LEN,
        "enc_header[12..2340]": wire.ENC_HEADER_LEN - wire.NONCE_LEN,
    }
    from aegisd.core import renewal

    assert prefixes["block[0..32]"] == renewal.PREFIX_LEN
    for expr, length in prefixes.items():
        assert expr in text, expr
        a, b = map(int, re.findall(r"\d+", expr.split("[")[1]))
        assert b - a + 1 == length, expr
    for a, b in re.findall(r"block\[(\d+)\.\.(\d+)\]", text):
        assert f"block[{a}..{b}]" in prefixes, f"block[{a}..{b}] is not checked here"


def test_renewal_payload_table_matches_the_encoder() -> None:
    """§23.1's field table, prefix included, is the order encode_payload writes."""
    text = section(_read("protocol.md"), "23.1 The renewal request")
    fields = [r[0].strip("`") for r in table_rows(text, "Field")]
    assert fields == ["version", "type", "renew_id", "created_at", "reply_to",
                      "bundle_address", "display_name"]  # fmt: skip
    reply_to = wire.MailboxAddress("ws://127.0.0.1/v1/ws", b"d" * 16, b"")
    payload = wire.encode_payload(wire.RenewPayload(b"r" * 16, 7, reply_to, b"b" * 16, "n"))
    assert payload[:2] == bytes([wire.VERSION, wire.PAYLOAD_RENEW])
    assert payload[2:18] == b"r" * 16 and payload[18:26] == struct.pack(">Q", 7)


def test_test_vector_randomness_is_drawn_as_section_16_says() -> None:
    """§16: output block k is HMAC-SHA256(seed, u64 k); every draw starts on a fresh block (a
    draw of n bytes takes ceil(n/32) blocks and discards the rest). Rebuilt here from that
    description alone, the draws named in §16 give the public values in the vectors."""
    vectors = json.loads((ROOT / "tests" / "vectors" / "protocol_v1.json").read_text())
    seed = bytes.fromhex(vectors["seed"])
    text = section(_read("protocol.md"), "16. Test vectors")
    assert seed.decode() in text and str(vectors["now"]) in text

    def draw(first: int, n: int) -> bytes:
        blocks = -(-n // 32)
        out = b"".join(
            hmac.digest(seed, struct.pack(">Q", k), "sha256") for k in range(first, first + blocks)
        )
        return out[:n]

    def x_pub(k: int) -> bytes:
        priv = X25519PrivateKey.from_private_bytes(draw(k, 32))
        return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def ed_pub(k: int) -> bytes:
        priv = Ed25519PrivateKey.from_private_bytes(draw(k, 32))
        return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def kem_ek(k: int) -> bytes:
        return MLKEM768PrivateKey.from_seed_bytes(draw(k, 64)).public_key().public_bytes_raw()

    def prekey_id(k: int) -> int:
        return int(struct.unpack(">I", draw(k, 4))[0])

    alice = wire.IdentityRecord.from_bytes(bytes.fromhex(vectors["alice_identity"]))
    bob = wire.IdentityRecord.from_bytes(bytes.fromhex(vectors["bob_identity"]))
    assert (alice.ed_pub, alice.x_pub, bob.ed_pub, bob.x_pub) == (
        ed_pub(1), x_pub(2), ed_pub(3), x_pub(4),
    )  # fmt: skip
    base = wire.BundleBase.from_bytes(bytes.fromhex(vectors["bundle_base"]))
    assert (base.spk_pub, base.spk_id) == (x_pub(5), prekey_id(6))
    assert (base.lrk_ek, base.lrk_id) == (kem_ek(7), prekey_id(9))
    opk = wire.OneTimeX25519.from_bytes(bytes.fromhex(vectors["one_time_x25519"]))
    opq = wire.OneTimeMlkem.from_bytes(bytes.fromhex(vectors["one_time_mlkem"]))
    assert (opk.pub, opk.prekey_id) == (x_pub(10), prekey_id(11))  # the first pair is used
    assert (opq.ek, opq.prekey_id) == (kem_ek(12), prekey_id(14))
    fc = bytes.fromhex(vectors["first_contact_block"])
    prefix = wire.FirstContactPrefix.from_block(fc)
    assert prefix.ephemeral_pub == x_pub(20)
    assert (prefix.opk_id, prefix.pqpk_id) == (opk.prekey_id, opq.prekey_id)
    # The first recorded encapsulation is the handshake's, to the one-time ML-KEM key.
    first = vectors["encapsulations"][0]
    assert first["ek_sha256"] == hashlib.sha256(opq.ek).hexdigest()
    assert bytes.fromhex(first["ciphertext"]) == prefix.kem_ct
    assert len(vectors["encapsulations"]) == 5
    # Each message block's header nonce is the start of the block §16 names.
    nonces = [30, 35, 37, 42, 44]
    for message, k in zip(vectors["messages"], nonces, strict=True):
        assert bytes.fromhex(message["block"])[1:13] == draw(k, 12)
    # ... and the document names those same blocks.
    named = [
        "key [5], its ID [6]", "seed [7\u20138], its ID [9]", "[10], [11], [12\u201313], [14]",
        "`EK_A` [20]", "header nonce [25]", *(f"[{k - 1}, {k}]" for k in nonces),
    ]  # fmt: skip
    for phrase in named:
        assert phrase in " ".join(text.split()), phrase


def test_stored_lists_are_written_in_the_documented_order() -> None:
    """§13.3: one replay-cache entry per last-resort key (also an empty one), in the order of
    the last-resort list; lists in creation order."""
    from aegisd.core.identity import IdentityKeyPair
    from aegisd.core.prekeys import ROTATION_PERIOD, PrekeyStore
    from tests.support.entropy import DeterministicEntropy

    text = section(_read("protocol.md"), "13.3 Prekey store")
    assert "exactly one entry per last-resort key" in text
    assert "strictly ascending" in text and "appears twice" in text
    entropy = DeterministicEntropy(b"docs order")
    store = PrekeyStore.create(entropy, IdentityKeyPair.generate(entropy), 1000)
    store.rotate(entropy, 1000 + ROTATION_PERIOD)
    xs, kems = store.generate_one_time(entropy, 3)
    rec = wire.PrekeyStoreRecord.from_bytes(store.to_bytes())
    assert [r.prekey_id for r in rec.last_resort] == list(store.last_resort)
    assert len(rec.last_resort) == 2 and [r.created for r in rec.last_resort] == sorted(
        r.created for r in rec.last_resort
    )
    assert list(rec.replay_cache) == [r.prekey_id for r in rec.last_resort]
    assert all(d == [] for d in rec.replay_cache.values())
    assert [pid for pid, _ in rec.one_time_x25519] == [x.prekey_id for x in xs]
    assert [r.prekey_id for r in rec.one_time_mlkem] == [k.prekey_id for k in kems]


def test_section_18_does_not_call_defined_things_undefined() -> None:
    text = _read("protocol.md")
    assert "not defined yet" not in text
    for heading in ("21. Calls signaling", "22. Attachments", "23. Session renewal"):
        assert re.search(rf"^## {re.escape(heading)}", text, re.M), heading


def test_error_classes_agree_between_sections() -> None:
    """§7.1 and §14 give the same class for an unusable key at handshake start."""
    text = _read("protocol.md")
    s71 = section(text, "7.1 Initiator")
    s14 = section(text, "14. Errors")
    assert "unusable ML-KEM key aborts with\n   `BundleError`" in s71
    m = re.search(r"Starting a handshake.*?raises\s+`(\w+)`", s14, re.S)
    assert m and m.group(1) == "BundleError"


# --- docs/api.md ------------------------------------------------------------------------------


def _api() -> str:
    return _read("api.md")


def _method_sections() -> dict[str, str]:
    parts = re.split(r"^(#{2,3} .*)$", _api(), flags=re.M)
    out = {}
    for i in range(1, len(parts), 2):
        m = re.match(r"### `([a-z_.]+)`", parts[i])
        if m:
            out[m.group(1)] = parts[i + 1]
    return out


def _openrpc() -> dict[str, Any]:
    return dict(json.loads((DOCS / "openrpc.json").read_text()))


@functools.cache
def _registered() -> dict[str, Any]:
    """The methods a normal daemon registers, described from its registry (a real daemon
    object on a throwaway profile, as `python -m aegisd.rpc.openrpc` builds it)."""
    from aegisd.rpc.openrpc import generate

    return dict(generate())


def test_api_documents_every_method_and_no_other() -> None:
    """One `### \\`name\\`` per method of docs/openrpc.json (which tests/integration/
    test_openrpc.py checks against the running daemon), plus the tests-only debug.emit."""
    documented = set(_method_sections())
    served = {m["name"] for m in _openrpc()["methods"]}
    assert documented - {"debug.emit"} == served, (
        f"documented, not served: {sorted(documented - served - {'debug.emit'})}; "
        f"served, not documented: {sorted(served - documented)}"
    )


def test_api_methods_match_the_registry() -> None:
    """docs/api.md headings against the methods the daemon registers."""
    registered = {m["name"] for m in _registered()["methods"]}
    assert set(_method_sections()) - {"debug.emit"} == registered


def _documented_params(body: str) -> tuple[list[str], bool]:
    params: list[str] = []
    first_paragraph = body.strip().split("\n\n", 1)[0]
    for row in table_rows(body, "param"):
        params += re.findall(r"`([a-z_]+)`", row[0])
    for line in first_paragraph.splitlines():  # prose form: "`call_id` (string or null). ..."
        m = re.match(r"`([a-z_]+)` \(", line)
        if m:
            params.append(m.group(1))
    return params, first_paragraph.startswith("No params")


def test_api_params_match_the_methods() -> None:
    """Each method's param table names exactly the params the registered method takes."""
    sections = _method_sections()
    problems = []
    for m in _registered()["methods"]:
        params, no_params = _documented_params(sections[m["name"]])
        code = [p["name"] for p in m["params"]]
        if sorted(params) != sorted(code) or (no_params and code):
            problems.append(f"{m['name']}: docs {sorted(params)}, code {sorted(code)}")
    assert not problems, "\n".join(problems)


def _code_app_errors() -> set[tuple[int, str]]:
    """(code, data.error) of every application error the daemon raises, read from the source:
    calls whose first argument is a code in 1000..1999 (a literal or a named constant) and
    whose name is a string literal (AppError(code, name, ...)) or the `error` member of a dict
    literal (RpcError(code, message, {"error": name}))."""
    files = list((ROOT / "aegisd").rglob("*.py"))
    consts: dict[str, set[int]] = {}
    trees = {}
    for f in files:
        tree = ast.parse(f.read_text())
        trees[f] = tree
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and type(node.value.value) is int
            ):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        consts.setdefault(t.id, set()).add(node.value.value)

    def code_of(node: ast.expr) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        name = node.id if isinstance(node, ast.Name) else (
            node.attr if isinstance(node, ast.Attribute) else None
        )  # fmt: skip
        values = consts.get(name or "", set())
        return next(iter(values)) if len(values) == 1 else None

    found = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            code = code_of(node.args[0])
            if code is None or not 1000 <= code <= 1999:
                continue
            names = [
                a.value for a in node.args[1:2] if isinstance(a, ast.Constant)
                and isinstance(a.value, str)
            ]  # fmt: skip
            for a in node.args[1:]:
                if isinstance(a, ast.Dict):
                    for k, v in zip(a.keys, a.values, strict=True):
                        if (
                            isinstance(k, ast.Constant)
                            and k.value == "error"
                            and isinstance(v, ast.Constant)
                        ):
                            names.append(v.value)
            for n in names:
                if re.fullmatch(r"[a-z_]+", n):
                    found.add((code, n))
    return found


def _documented_app_errors() -> dict[tuple[int, str], str]:
    """(code, data.error) -> meaning, from the application rows of the "Errors" table: the
    name column, and any other name the meaning gives as "`data.error` is `NAME`"."""
    rows = table_rows(section(_api(), "Errors"), "code")
    out = {}
    for row in rows:
        if row[0].lstrip("-").isdigit() and int(row[0]) >= 1000:
            names = [row[1].strip("`")]
            names += re.findall(r"`data\.error` is `([a-z_]+)`", row[2])
            for name in names:
                out[(int(row[0]), name)] = row[2]
    return out


def test_api_error_table_matches_the_errors_the_daemon_raises() -> None:
    documented = _documented_app_errors()
    raised = _code_app_errors()
    assert raised, "found no application error in aegisd/"
    undocumented = raised - set(documented)
    assert not undocumented, f"raised but not in docs/api.md 'Errors': {sorted(undocumented)}"
    never = {
        pair for pair, meaning in documented.items()
        if pair not in raised and not meaning.startswith("reserved")
    }  # fmt: skip
    assert not never, f"in docs/api.md 'Errors' but raised nowhere: {sorted(never)}"


def test_api_error_table_matches_the_client_and_openrpc() -> None:
    """The client library's error classes and the OpenRPC error list name documented errors."""
    import aegis_client.errors as client_errors
    from aegisd.rpc import errors as rpc_errors
    from aegisd.rpc.openrpc import APP_ERRORS

    documented = set(_documented_app_errors())
    client = {
        (c.code, c.name)
        for c in vars(client_errors).values()
        if isinstance(c, type) and isinstance(getattr(c, "code", None), int)
        and isinstance(getattr(c, "name", None), str) and c.code >= 1000
    }  # fmt: skip
    assert client and client <= documented, sorted(client - documented)
    listed = set(APP_ERRORS)
    assert listed == documented, (
        f"in aegisd/rpc/openrpc.py APP_ERRORS, not documented: {sorted(listed - documented)}; "
        f"documented, not in APP_ERRORS: {sorted(documented - listed)}"
    )
    components = _openrpc()["components"]["errors"]
    assert {(e["code"], e["data"]["error"]) for e in components.values()} == documented
    protocol_rows = table_rows(section(_api(), "Errors"), "code")
    protocol = {int(r[0]) for r in protocol_rows if r[0].startswith("-")}
    code = {v for k, v in vars(rpc_errors).items() if k.isupper() and type(v) is int and v < 0}
    assert protocol == code


def _cli_commands() -> dict[str, click.Command]:
    from aegis_cli.main import cli

    out: dict[str, click.Command] = {}

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out[" ".join(path)] = cmd

    walk(cli, [])
    return out


def _documented_cli() -> dict[str, set[str]]:
    """Command path -> the options its synopsis names, from the CLI table of docs/api.md."""
    commands = _cli_commands()
    out: dict[str, set[str]] = {}
    for row in table_rows(section(_api(), "The `aegis` CLI"), "command"):
        for synopsis in re.findall(r"`(aegis [^`]*)`", row[0]):
            words = synopsis.split()[1:]
            path = next(
                (" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in commands), None
            )
            assert path, f"docs/api.md CLI table: no command for {synopsis!r}"
            out.setdefault(path, set()).update(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", synopsis))
    return out


def test_cli_table_matches_click() -> None:
    """Every command has a synopsis; every visible option is in it and every option the
    synopsis names exists (--home and --json are documented once, for every command)."""
    text = section(_api(), "The `aegis` CLI")
    assert "`--home DIR`" in text and "`--json`" in text
    documented = _documented_cli()
    commands = _cli_commands()
    assert set(documented) == set(commands), (
        f"commands without a synopsis: {sorted(set(commands) - set(documented))}"
    )
    problems = []
    for path, cmd in commands.items():
        names: set[str] = set()
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            opts = set(p.opts) | set(p.secondary_opts)
            names |= opts
            if not opts & (documented[path] | {"--home", "--json"}):
                problems.append(f"aegis {path}: {'/'.join(sorted(opts))} not documented")
        for opt in documented[path] - names:
            problems.append(f"aegis {path}: documented {opt} does not exist")
    assert not problems, "\n".join(problems)


def test_identity_get_documents_what_it_returns() -> None:
    """identity_key is Encode(IK), 66 bytes: not the 128-byte record."""
    text = _method_sections()["identity.get"]
    assert "`Encode(IK)`" in text and "66 bytes" in text and "132 hex digits" in text
    from aegisd.core.identity import IdentityKeyPair
    from tests.support.entropy import DeterministicEntropy

    ik = IdentityKeyPair.generate(DeterministicEntropy(b"docs")).public
    assert len(ik.encode()) == 66 and ik.encode()[0] == wire.TAG_ED25519
    assert ik.encode()[33] == wire.TAG_X25519
    source = (ROOT / "aegisd" / "services" / "api.py").read_text()
    assert '"identity_key": m.identity().public.encode().hex()' in source


def test_relay_url_path_is_stated() -> None:
    relay_path = re.search(r'add_get\("(/[^"]+)"', (ROOT / "relay" / "app.py").read_text())
    assert relay_path
    intro = _api().split("\n## ", 1)[0]
    assert f"`{relay_path.group(1)}`" in intro
    readme = (ROOT / "README.md").read_text()
    assert f"ends in the path `{relay_path.group(1)}`" in readme


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", ["api.md", "protocol.md", "backup.md", "threat-model.md"])
def test_section_links_point_at_headings(doc: str) -> None:
    text = _read(doc)
    anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links - anchors == set(), f"docs/{doc} links to no heading: {sorted(links - anchors)}"
    for target, anchor in re.findall(r"\]\((\w[\w-]*\.md)#([^)]+)\)", text):
        headings = re.findall(r"^#+ (.*)$", _read(target), re.M)
        assert anchor in {_slug(h) for h in headings}, f"docs/{doc}: {target}#{anchor}"


# --- settings ---------------------------------------------------------------------------------


def _setting_keys() -> set[str]:
    keys = set()
    for f in (ROOT / "aegisd").rglob("*.py"):
        keys |= set(re.findall(r'^\s*SETTING_\w+ = "([a-z_.]+)"', f.read_text(), re.M))
    return keys


def test_backup_settings_list_is_the_restorable_set() -> None:
    from aegisd.services.backup import RESTORABLE

    text = _read("backup.md")
    m = re.search(r"Settings: (.*?)\. Not the relay URL", text, re.S)
    assert m
    assert set(re.findall(r"`([a-z_.]+)`", m.group(1))) == set(RESTORABLE)
    assert set(RESTORABLE) <= _setting_keys()


@pytest.mark.parametrize("doc", ["api.md", "protocol.md", "backup.md", "threat-model.md"])
def test_setting_keys_named_in_docs_exist(doc: str) -> None:
    """A `privacy.x`/`network.x`/... that is neither a method, an event nor a status member
    must be a setting the daemon stores."""
    api = _api()
    methods = set(_method_sections())
    events = {r[0].strip("`") for r in table_rows(section(api, "Events"), "type")}
    status_rows = table_rows(_method_sections()["status"], "member")
    members = {f"{r[0].strip('`')}.{k}" for r in status_rows for k in re.findall(r'"(\w+)":', r[2])}
    named = set(re.findall(
        r"`((?:privacy|network|calls|relay|attachments|events|profile|backup)\.[a-z_]+)`",
        _read(doc),
    ))  # fmt: skip
    unknown = named - methods - events - members - _setting_keys()
    assert not unknown, f"docs/{doc} names settings the code does not have: {sorted(unknown)}"


def _emitted_event_types(emits: tuple[str, ...] = ("emit", "emit_live")) -> set[str]:
    """Event types the daemon emits: string literals handed to an `emit` or `emit_live`
    (directly, through a conditional, or to a callback that calls it); only to the ``emits``
    named."""
    found: set[str] = set()

    def literals(node: ast.expr) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.IfExp):
            return literals(node.body) + literals(node.orelse)
        return []

    for f in (ROOT / "aegisd").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            direct = (isinstance(node.func, ast.Attribute) and node.func.attr in emits) or (
                isinstance(node.func, ast.Name) and node.func.id in emits
            )
            args = node.args if direct else node.args[1:]
            via = any(isinstance(a, ast.Attribute) and a.attr in emits for a in node.args[:1])
            if direct or via:
                for value in literals(args[0]) if args else []:
                    if re.fullmatch(r"[a-z]+\.[a-z_]+", value):
                        found.add(value)
    return found


def test_api_events_table_matches_the_events_emitted() -> None:
    documented = {r[0].strip("`") for r in table_rows(section(_api(), "Events"), "type")}
    emitted = _emitted_event_types()
    assert emitted, "found no emitted event"
    assert documented == emitted, (
        f"emitted, not documented: {sorted(emitted - documented)}; "
        f"documented, never emitted: {sorted(documented - emitted)}"
    )


def test_api_marks_live_the_events_never_stored() -> None:
    """An event sent with emit_live (never stored) says **live** in the events table, and is
    named in "Live events"; no stored one says so."""
    rows = table_rows(section(_api(), "Events"), "type")
    marked = {r[0].strip("`") for r in rows if "**live**" in " ".join(r)}
    live = _emitted_event_types(("emit_live",))
    assert live and marked == live
    assert not live & _emitted_event_types(("emit",))
    live_section = section(_api(), "Live events")
    assert all(f"`{t}`" in live_section for t in live)


def test_backup_byte_ranges_are_inclusive() -> None:
    """docs/backup.md uses protocol.md's inclusive X[a..b] (it wrote okm[0..32] for 32 bytes)."""
    from aegisd.core import backup

    text = _read("backup.md")
    assert "`X[a..b]` are bytes `a` to `b` inclusive" in text
    ranges = re.findall(r"okm\[(\d+)\.\.(\d+)\]", text)
    assert len(ranges) == 2
    assert [int(b) - int(a) + 1 for a, b in ranges] == [backup.KEY_LEN, backup.KEY_LEN]
    (end,) = re.findall(r"bytes 0\.\.(\d+) of the file", text)
    assert int(end) + 1 == backup.HEADER_MAC_OFFSET
