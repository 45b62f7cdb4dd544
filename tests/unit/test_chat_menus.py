"""aegis_cli/chat/menus.py: the group, file and settings dialogs' text and how an answer is
read (the Pilot tests in tests/functional/test_chat_tui.py drive them against real daemons)."""

from __future__ import annotations

from aegis_cli.chat import menus
from aegis_cli.chat.app import MAIN_SCREEN_ONLY, ChatApp
from aegis_cli.chat.screens import picked_emoji

HOSTILE = "\x1b[2J[bold]x[/]\u202eevil\n"


def group(members: list[dict[str, object]]) -> dict[str, object]:
    return {"group": 1, "name": HOSTILE, "role": "owner", "members": members}


def test_group_prompt_numbers_members_and_shows_names_inert() -> None:
    g = group([
        {"key": "aa" * 32, "role": "owner", "you": True, "contact": None},
        {"key": "bb" * 32, "role": "member", "you": False, "contact": HOSTILE},
        {"key": "cc" * 32, "role": "admin", "you": False, "contact": None, "reachable": False},
    ])  # fmt: skip
    text = menus.group_prompt(g, ["dave"], note=HOSTILE)
    assert " 1 me (owner)" in text
    assert " 3 cccccccccccc… (admin) (not reachable yet)" in text
    assert "Contacts to invite: dave" in text
    for ch in ("\x1b", "\u202e"):
        assert ch not in text
    assert text.count("\n") == 6  # no line break from a name: one line per entry


def test_group_prompt_lists_at_most_ten_members() -> None:
    many = [{"key": f"{i:064x}", "role": "member", "contact": f"c{i}"} for i in range(25)]
    text = menus.group_prompt(group(many), [])
    assert "c9 (member)" in text and "c10" not in text and "… and 15 more" in text


def test_commands_and_member_references() -> None:
    g = group([{"key": "aa" * 32, "role": "owner", "you": True, "contact": None},
               {"key": "bb" * 32, "role": "member", "contact": "bob"}])  # fmt: skip
    cmd = menus.parse("  Invite  carol smith ")
    assert cmd == menus.Command("invite", "carol smith")
    assert menus.parse("explode 1") is None
    assert menus.member_ref(g, "2") == ("bb" * 32, "bob")
    assert menus.member_ref(g, "3") is None and menus.member_ref(g, "0") is None
    assert menus.member_ref(g, "bob") == ("bob", "bob") and menus.member_ref(g, "") is None
    # Digits int() rejects (str.isdigit takes them): no member, never a ValueError.
    for odd in ("²", "①", "٢", "1²"):
        assert menus.number(odd) is None and menus.member_ref(g, odd) is None


def test_only_listed_members_are_referred_to_by_number() -> None:
    many = [{"key": f"{i:064x}", "role": "member", "contact": f"c{i}"} for i in range(25)]
    assert menus.member_ref(group(many), "10") == (f"{9:064x}", "c9")
    assert menus.member_ref(group(many), "11") is None  # not shown: not acted on


def test_odd_digits_in_the_other_number_fields() -> None:
    files = [{"attachment_id": "1", "name": "a", "state": "complete"}]
    assert menus.pick(files, "²") is None and menus.pick(files, " 1 ") is files[0]
    assert picked_emoji("①") == "①" and picked_emoji("1") == "👍"
    assert menus.number(" 3 ") == 3 and menus.number("-1") is None
    # Every key that reaches the app past a dialog (a priority binding) acts on the main
    # screen only, but quitting.
    priority = {b.action for b in ChatApp.BINDINGS if getattr(b, "priority", False)}
    assert priority - {"quit"} <= set(MAIN_SCREEN_ONLY)


def test_files_prompt_and_pick() -> None:
    files = [
        {"attachment_id": str(i), "name": f"f{i}.txt", "size": 2048 * i, "state": "complete",
         "created_at": 0}
        for i in range(1, 13)
    ]  # fmt: skip
    files[-1].update(state="downloading", blocks=4, done=1, name=HOSTILE)
    text = menus.files_prompt(files)
    assert "(2 older ones not listed" in text and "  1 f1.txt" not in text
    assert "  3 f3.txt  6.0 KB  complete" in text and "downloading 25%" in text
    assert "\x1b" not in text and "\u202e" not in text
    assert menus.pick(files, "") is files[-1]
    assert menus.pick(files, "1") is files[0] and menus.pick(files, "13") is None
    assert menus.pick(files, "x") is None and menus.pick([], "") is None


def test_settings_prompt() -> None:
    text = menus.settings_prompt(True, 86400)
    assert "typing indicators: on" in text and "new conversations: 1 day" in text
    assert menus.timer_choices().startswith("0 off  1 5 minutes")
