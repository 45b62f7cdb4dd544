"""`aegis group ...` against a real daemon (one profile: what needs no other member)."""

from __future__ import annotations

import json

from .test_cli import aegis, home, one_line_error  # noqa: F401 - the fixture


def test_group_commands(home, short_tmp, cli_env):  # noqa: F811
    h = str(home)
    pf = str(short_tmp / "pf")
    assert aegis("daemon", "--detach", "--home", h, env=cli_env).returncode == 0
    try:
        assert aegis("unlock", "--home", h, "--passphrase-file", pf).returncode == 0
        r = aegis("group", "list", "--home", h)
        assert r.returncode == 0 and r.stdout.strip() == "no groups yet"
        r = aegis("group", "create", "Hikers", "--home", h)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "created group #1 Hikers"
        r = aegis("group", "members", "Hikers", "--home", h)
        assert r.stdout.splitlines() == ["#1  Hikers", "  you  (owner)"]
        r = aegis("group", "send", "#1", "hello, nobody", "--home", h)
        assert r.returncode == 0 and r.stdout.strip().endswith("to 0 members"), r.stdout
        r = aegis("group", "messages", "Hikers", "--home", h)
        assert "me: hello, nobody  [delivered to 0 of 0]" in r.stdout
        r = aegis("send", "--group", "Hikers", "second", "--home", h)
        assert r.returncode == 0 and "to 0 members" in r.stdout, r.stderr
        r = aegis("messages", "--group", "Hikers", "--home", h)
        assert [line.split("  ", 1)[1] for line in r.stdout.splitlines()] == [
            "me: hello, nobody  [delivered to 0 of 0]", "me: second  [delivered to 0 of 0]"]
        one_line_error(aegis("messages", "--home", h), 2)  # neither NAME nor --group
        one_line_error(aegis("send", "--group", "Hikers", "a", "b", "--home", h), 2)
        # A file to the group: one copy per other member (none here), shown in the history.
        photo = short_tmp / "summit.jpg"
        photo.write_bytes(b"\xff\xd8 not much of a photo")
        r = aegis("send", "--group", "Hikers", "--file", str(photo), "--home", h)
        assert r.returncode == 0 and "[file] summit.jpg to 0 members" in r.stdout, r.stderr
        r = aegis("messages", "--group", "Hikers", "--home", h)
        assert "me: [file] summit.jpg  [delivered to 0 of 0]" in r.stdout
        one_line_error(aegis("send", "--group", "Hikers", "--file", str(photo), "x", "--home", h),
                       2)  # fmt: skip
        one_line_error(aegis("send", "--home", h), 2)  # neither NAME nor --group
        line = one_line_error(aegis("send", "--group", "Hikers", "--file",
                                    str(short_tmp / "missing.jpg"), "--home", h))  # fmt: skip
        assert "no such file" in line
        r = aegis("group", "rename", "Hikers", "Walkers", "--home", h)
        assert r.stdout.strip() == "renamed to Walkers"
        line = one_line_error(aegis("group", "members", "Hikers", "--home", h))
        assert "no such group 'Hikers'" in line
        line = one_line_error(aegis("group", "invite", "Walkers", "nobody", "--home", h))
        assert "nobody" in line
        r = aegis("group", "role", "Walkers", "nobody", "admin", "--home", h, "--json")
        assert json.loads(r.stdout)["error"]["data"]["error"] == "not_found"
        r = aegis("group", "leave", "Walkers", "--home", h)
        assert r.stdout.strip() == "deleted the group"
        assert aegis("group", "list", "--home", h).stdout.strip() == "no groups yet"
    finally:
        aegis("stop", "--home", h, env=cli_env)
