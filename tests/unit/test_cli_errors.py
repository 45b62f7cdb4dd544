"""aegis_cli/errors.py: the daemon's errors in the CLI's words, and the CLI's sizes."""

from __future__ import annotations

import click
import pytest

from aegis_cli.errors import Fail, did_you_mean, printable, user_message
from aegis_cli.units import Size, size_text
from aegis_client.errors import from_error_object


def err(code: int, message: str, data: dict[str, object], method: str, params: object):
    exc = from_error_object({"code": code, "message": message, "data": data})
    exc.method, exc.params = method, params
    return exc


def test_did_you_mean_prefers_a_case_match_then_near_misses() -> None:
    assert did_you_mean("Bob", ["alice", "bob", "Bobby"]) == ["bob"]
    assert did_you_mean("bob", ["Bob", "BOB"]) == ["Bob", "BOB"]
    assert did_you_mean("alcie", ["alice", "bob"]) == ["alice"]
    assert did_you_mean("zed", ["alice", "bob"]) == []


def test_messages_name_options_not_params() -> None:
    e = err(1033, "a file with this name exists there (use overwrite)", {"error": "exists"},
            "attachments.save", {"attachment_id": "ab", "path": "/x", "overwrite": False})
    assert user_message(e) == "a file with this name exists there: /x (use --overwrite)"
    e = err(1030, "no such file", {"error": "bad_file"}, "attachments.send",
            {"contact": "bob", "path": "/tmp/no\x1bpe.pdf"})
    assert user_message(e) == "no such file: /tmp/no?pe.pdf"
    e = err(-32602, "Invalid params: 'expires_in' must be between 60 and 7776000",
            {"error": "invalid_params", "field": "expires_in"}, "invitations.create", {})
    assert user_message(e) == "--expires must be between 60 and 7776000"
    e = err(1020, "no such request", {"error": "not_found"}, "requests.accept", {"request": 7})
    assert user_message(e) == "no such request 7"
    # The name the user typed is echoed without control characters.
    e = err(1020, "no such contact", {"error": "not_found"}, "messages.send",
            {"contact": "b\x1b[2Jo", "text": "secret words"})
    msg = user_message(e, lambda: ["bob"])
    assert "\x1b" not in msg and "secret words" not in msg
    # A failing lookup never hides the error itself.
    def broken() -> list[str]:
        raise OSError("gone")
    e = err(1020, "no such contact", {"error": "not_found"}, "contacts.remove", {"name": "x"})
    assert user_message(e, broken) == "no such contact 'x' (aegis contacts lists them)"


def test_cli_errors_have_the_one_shape() -> None:
    assert Fail("nope").to_object() == {
        "code": 2000, "message": "nope", "data": {"error": "failed"}}
    assert Fail("bad", 2).to_object()["data"] == {"error": "usage"}
    assert Fail("x", data={"attachment_id": "ab"}).to_object()["data"] == {
        "error": "failed", "attachment_id": "ab"}
    assert printable("a\nb") == "a?b"


@pytest.mark.parametrize(("text", "n"), [("1000", 1000), ("100MB", 10**8), ("1.5GB", 15 * 10**8),
                                         ("64MiB", 64 << 20), ("512 kB", 512_000)])
def test_sizes(text: str, n: int) -> None:
    assert Size().convert(text, None, None) == n


def test_bad_sizes_and_size_text() -> None:
    for bad in ("", "MB", "12XB", "0.1"):
        with pytest.raises(click.BadParameter):
            Size().convert(bad, None, None)
    assert [size_text(n) for n in (999, 1000, 134078464, 5 * 10**9)] == [
        "999 B", "1.0 kB", "134.1 MB", "5.0 GB"]


def test_a_refused_call_keeps_no_secret() -> None:
    """An error remembers the refused call for wording, never a passphrase or password in it:
    exceptions outlive the call and get logged or reported whole."""
    from aegis_client.errors import from_error_object

    exc = from_error_object({"code": 1002, "message": "wrong passphrase",
                             "data": {"error": "wrong_passphrase"}})  # fmt: skip
    exc.set_call("passphrase.change", {"old_passphrase": "s3cret one", "new_passphrase": "two",
                                       "turn_password": "t", "contact": "bob"})  # fmt: skip
    assert exc.method == "passphrase.change"
    assert exc.params == {"old_passphrase": "[hidden]", "new_passphrase": "[hidden]",
                          "turn_password": "[hidden]", "contact": "bob"}  # fmt: skip
    assert "s3cret" not in repr(exc.__dict__)


def test_every_option_that_is_an_api_param_is_worded() -> None:
    """A daemon error names the API's field; the CLI says the option the user typed. Every
    option whose value goes to a param of the same name must be in aegis_cli/errors.WORDS."""
    import json
    from pathlib import Path

    import click

    from aegis_cli.errors import WORDS
    from aegis_cli.main import cli

    doc = json.loads((Path(__file__).resolve().parents[2] / "docs/openrpc.json").read_text())
    api = {p["name"] for m in doc["methods"] for p in m.get("params", [])}

    def options(group: click.Group) -> set[str]:
        names: set[str] = set()
        for cmd in group.commands.values():
            if isinstance(cmd, click.Group):
                names |= options(cmd)
            names |= {p.name for p in cmd.params
                      if isinstance(p, click.Option) and p.name and not p.hidden}  # fmt: skip
        return names

    missing = sorted(n for n in options(cli) & api if n not in WORDS)
    assert not missing, f"options sent as API params without wording in WORDS: {missing}"
