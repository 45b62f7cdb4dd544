"""The messaging methods of the JSON-RPC API (docs/api.md). Thin: checks params, calls the
Messenger, shapes results. Every method here needs an unlocked profile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aegisd.core.devices import MAX_DEVICES
from aegisd.netmode import SETTING_ISOLATION, SETTING_MODE, SETTING_PROXY, SETTING_TOR_PATH
from aegisd.rpc import REQUIRED, AppError, CallContext, InvalidParamsError, Registry
from aegisd.rpc.methods import Handler
from aegisd.store import attachments as attachment_store
from aegisd.store.devices import SETTING_MAX_LINKED
from aegisd.store.groups import group_contact_ids
from aegisd.transport.network import ProxyUrlError, check_proxy_url

from .address import INVITE_TTL_DEFAULT
from .contacts import SETTING_NAME
from .delivery import (
    GROUP_SPREAD_MAX,
    SETTING_GROUP_SPREAD,
    SETTING_RECEIPT_DELAY,
    SETTING_SEND_JITTER,
)
from .disappearing import SETTING_DEFAULT as SETTING_DISAPPEARING
from .disappearing import check_seconds as check_timer
from .disappearing_api import one_conversation
from .groups_state import INTRO_KEY, SETTING_READ_RECEIPTS
from .message_view import message_objects
from .messenger import (
    SETTING_ADDRESS,
    Messenger,
)
from .names import clean_name

MAX_HISTORY_PAGE = 500
MAX_NAME = 64



def _ms_expiry(invitation: dict[str, Any]) -> dict[str, Any]:
    """Every API timestamp is in ms (docs/api.md, "Messaging"); the store keeps an
    invitation's expiry in seconds, as the relay and the link do."""
    expires = invitation.get("expires_at")
    return {**invitation, "expires_at": None if expires is None else int(expires) * 1000}

def _check_name(field: str, name: str) -> str:
    name = " ".join(name.split())
    if not name or len(name) > MAX_NAME or clean_name(name, "") != name:
        raise InvalidParamsError(field, f"must be 1 to {MAX_NAME} printable characters")
    return name


def register(registry: Registry, m: Messenger) -> None:
    def method(name: str) -> Callable[[Handler], Handler]:
        return registry.method(name, unlocked=True)  # "unlocked": needs an unlocked profile

    @method("identity.get")
    async def identity_get(ctx: CallContext) -> dict[str, Any]:
        store = m.store
        return {
            "address": store.get_setting(SETTING_ADDRESS),
            "display_name": store.get_setting(SETTING_NAME, ""),
            "identity_key": m.identity().public.encode().hex(),
        }

    @method("identity.set_name")
    async def identity_set_name(ctx: CallContext, display_name: str) -> dict[str, Any]:
        if len(display_name.encode()) > 64 or clean_name(display_name, "") != " ".join(
            display_name.split()
        ):
            raise InvalidParamsError(
                "display_name", "must be at most 64 bytes of printable characters"
            )
        display_name = " ".join(display_name.split())
        with m.store.transaction():  # the name and its sync (0x49) at once
            m.store.set_setting(SETTING_NAME, display_name)
            m.sync_settings.changed("display_name")  # on our other devices too
        return {"display_name": display_name}

    @method("invitations.create")
    async def invitations_create(
        ctx: CallContext, expires_in: int = INVITE_TTL_DEFAULT
    ) -> dict[str, Any]:
        return _ms_expiry(await m.address.create_invitation(expires_in))

    @method("invitations.list")
    async def invitations_list(ctx: CallContext) -> dict[str, Any]:
        return {"invitations": [  # not the one-time links made for group introductions
            _ms_expiry(i) for i in m.address.list_invitations()
            if m.store.get_setting(f"{INTRO_KEY}{i['invitation']}") is None
        ]}  # fmt: skip

    @method("invitations.revoke")
    async def invitations_revoke(ctx: CallContext, invitation: str) -> dict[str, Any]:
        await m.address.revoke_invitation(invitation)
        return {"revoked": True}

    @method("address.get")
    async def address_get(ctx: CallContext) -> dict[str, Any]:
        return await m.address.link_text()

    @method("address.rotate")
    async def address_rotate(ctx: CallContext) -> dict[str, Any]:
        return await m.address.link_text(rotate=True)

    @method("requests.list")
    async def requests_list(ctx: CallContext) -> dict[str, Any]:
        return {"requests": m.contacts.list_requests()}

    @method("requests.accept")
    async def requests_accept(
        ctx: CallContext, request: int, name: str | None = None
    ) -> dict[str, Any]:
        if name is not None:
            name = _check_name("name", name)
        return await m.contacts.accept_request(request, name)

    @method("requests.reject")
    async def requests_reject(ctx: CallContext, request: int) -> dict[str, Any]:
        m.contacts.reject_request(request)
        return {"rejected": True}

    @method("contacts.add")
    async def contacts_add(ctx: CallContext, name: str, link: str) -> dict[str, Any]:
        return await m.contacts.add(_check_name("name", name), link)

    @method("contacts.list")
    async def contacts_list(ctx: CallContext) -> dict[str, Any]:
        hidden = group_contact_ids(m.store)  # group contacts serve their groups only
        return {"contacts": [m.contacts.describe(c) for c in m.store.list_contacts()
                             if c.id not in hidden]}  # fmt: skip

    @method("contacts.rename")
    async def contacts_rename(ctx: CallContext, name: str, new_name: str) -> dict[str, Any]:
        c = m.contacts.by_name(name)
        new_name = _check_name("new_name", new_name)
        if m.store.contact_by_name(new_name) is not None:
            raise InvalidParamsError("new_name", "is already the name of a contact")
        with m.store.transaction():  # the change and its sync, or neither
            m.store.update_contact(c.id, name=new_name)
            m.own_sync.contact_changed(m.store.get_contact(c.id) or c)  # the other own devices
        return {"name": new_name}

    @method("contacts.remove")
    async def contacts_remove(ctx: CallContext, name: str) -> dict[str, Any]:
        await m.contacts.remove(name)
        return {"removed": True}

    @method("contacts.block")
    async def contacts_block(ctx: CallContext, name: str, blocked: bool = True) -> dict[str, Any]:
        c = await m.contacts.block(name, blocked)
        return {"name": c.name, "blocked": blocked}

    @method("contacts.safety_number")
    async def contacts_safety_number(ctx: CallContext, name: str) -> dict[str, Any]:
        return m.contacts.safety(name)

    @method("contacts.verify")
    async def contacts_verify(ctx: CallContext, name: str, verified: bool = True) -> dict[str, Any]:
        c = m.contacts.by_name(name)
        with m.store.transaction():  # the change and its sync, or neither
            m.store.update_contact(c.id, verified=verified)
            m.own_sync.contact_changed(m.store.get_contact(c.id) or c)  # the other own devices
        return {"name": c.name, "verified": verified}

    @method("contacts.rotate_mailbox")
    async def contacts_rotate_mailbox(ctx: CallContext, name: str) -> dict[str, Any]:
        return await m.rotation.rotate(name)

    @method("messages.send")
    async def messages_send(ctx: CallContext, contact: str, text: str) -> dict[str, Any]:
        return await m.send_text(contact, text)

    @method("messages.history")
    async def messages_history(
        ctx: CallContext, contact: str, before: int | None = None, limit: int = 50
    ) -> dict[str, Any]:
        if not 1 <= limit <= MAX_HISTORY_PAGE:
            raise InvalidParamsError("limit", f"must be between 1 and {MAX_HISTORY_PAGE}")
        c = m.contacts.by_name(contact)
        # one more than asked: whether an older page exists (next_before null when not)
        page = m.store.history(c.id, before_seq=before, limit=limit + 1)
        more = len(page) > limit
        page = page[1:] if more else page
        return {
            "messages": message_objects(m.store, page),
            "next_before": page[0].seq if more else None,
        }

    @method("messages.reply")
    async def messages_reply(
        ctx: CallContext, contact: str | None = None, message_id: str = REQUIRED,
        text: str = REQUIRED, group: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        # (contact, message_id, text) was the positional order before groups: kept
        target = one_conversation(contact, group)
        if isinstance(target, int):
            result = await m.groups.actions.reply(target, message_id, text)
        else:
            result = await m.actions.reply(target, message_id, text)
        m.disappearing.wake()  # its deadline, if the conversation has a timer
        return result

    @method("messages.react")
    async def messages_react(
        ctx: CallContext, message_id: str, emoji: str, group: int | None = None
    ) -> dict[str, Any]:
        if group is not None:
            return await m.groups.actions.react(group, message_id, emoji)
        return await m.actions.react(message_id, emoji)

    @method("messages.edit")
    async def messages_edit(
        ctx: CallContext, message_id: str, text: str, group: int | None = None
    ) -> dict[str, Any]:
        if group is not None:
            return await m.groups.actions.edit(group, message_id, text)
        return await m.actions.edit(message_id, text)

    @method("messages.mark_read")
    async def messages_mark_read(
        ctx: CallContext, contact: str, message_ids: list[str] | None = None
    ) -> dict[str, Any]:
        return await m.mark_read(contact, message_ids)

    @method("messages.delete")
    async def messages_delete(
        ctx: CallContext, message_id: str, for_everyone: bool = False, group: int | None = None
    ) -> dict[str, Any]:
        if group is not None:
            return await m.groups.actions.delete(group, message_id, for_everyone is True)
        if for_everyone is False and isinstance(message_id, str):
            await m.attachments.forget([message_id])  # a file's row, caption and copy go too
        return await m.actions.delete(message_id, for_everyone)

    @method("conversations.delete")
    async def conversations_delete(ctx: CallContext, contact: str) -> dict[str, Any]:
        c = m.contacts.by_name(contact)
        await m.attachments.forget(attachment_store.of_conversation(m.store, c.id))
        # A file that arrived meanwhile: listed and its message deleted under the lock (no
        # other can come in between), then its row, transfer and copy go like the others.
        async with m.lock:
            late = attachment_store.of_conversation(m.store, c.id)
            deleted = m.store.delete_conversation(c.id)
        await m.attachments.forget(late)
        return {"deleted": deleted}

    @method("settings.get")
    async def settings_get(ctx: CallContext) -> dict[str, Any]:
        store = m.store
        result = {
            "read_receipts": bool(store.get_setting(SETTING_READ_RECEIPTS, True)),
            "receipt_delay_max": float(store.get_setting(SETTING_RECEIPT_DELAY, 3.0)),
            "disappearing_default": int(store.get_setting(SETTING_DISAPPEARING, 0) or 0),
        }
        # The network and jitter settings appear once any of them is set (absent: the
        # defaults, no proxy, no isolation, no jitter), so older clients see the same result.
        if any(store.get_setting(k) is not None for k in (SETTING_SEND_JITTER, SETTING_PROXY,
                                                           SETTING_ISOLATION,
                                                           SETTING_GROUP_SPREAD)):
            result.update(
                send_jitter_max=float(store.get_setting(SETTING_SEND_JITTER, 0.0)),
                group_spread_max=float(store.get_setting(SETTING_GROUP_SPREAD,
                                                         GROUP_SPREAD_MAX)),
                proxy=store.get_setting(SETTING_PROXY),
                isolation=m.network().isolation,
            )
        linked = store.get_setting(SETTING_MAX_LINKED)
        if linked is not None:  # shown once set, as the network settings above
            result["max_linked_devices"] = int(linked)
        return result

    @method("settings.set")
    async def settings_set(
        ctx: CallContext,
        read_receipts: bool | None = None,
        receipt_delay_max: float | int | None = None,
        send_jitter_max: float | int | None = None,
        group_spread_max: float | int | None = None,
        proxy: str | None = None,
        isolation: bool | None = None,
        disappearing_default: int | None = None,
        max_linked_devices: int | None = None,
    ) -> dict[str, Any]:
        store = m.store
        # Every parameter checked before anything is written: a refused call changes nothing.
        if max_linked_devices is not None and (
            type(max_linked_devices) is not int
            or not 1 <= max_linked_devices <= MAX_DEVICES - 1
        ):
            raise InvalidParamsError("max_linked_devices", f"must be 1 to {MAX_DEVICES - 1}")
        if disappearing_default is not None:
            check_timer("disappearing_default", disappearing_default)
        if proxy is not None and proxy != "":
            try:
                proxy = check_proxy_url(proxy)
            except ProxyUrlError as exc:
                raise InvalidParamsError("proxy", str(exc)) from None
        if isolation is not None and not isinstance(isolation, bool):
            raise InvalidParamsError("isolation", "must be true or false")
        if send_jitter_max is not None and not 0 <= send_jitter_max <= 3600:
            raise InvalidParamsError("send_jitter_max", "must be between 0 and 3600")
        if group_spread_max is not None and not 0 <= group_spread_max <= 3600:
            raise InvalidParamsError("group_spread_max", "must be between 0 and 3600")
        if receipt_delay_max is not None and not 0.5 <= receipt_delay_max <= 3600:
            raise InvalidParamsError("receipt_delay_max", "must be between 0.5 and 3600")
        if proxy == "" and store.get_setting(SETTING_MODE) in ("proxy", None):
            # Removing the proxy leaves the mode to its default, which may be Tor.
            from aegisd.netmode import effective_mode, find_tor, tor_missing_message
            from aegisd.relayurl import SETTING_URL

            after = effective_mode(None, None, store.get_setting(SETTING_URL))
            if after == "tor" and find_tor(store.get_setting(SETTING_TOR_PATH)) is None:
                raise AppError(1012, "no_tor", tor_missing_message())
        synced = [f for f, v in (("read_receipts", read_receipts),
                                 ("disappearing_default", disappearing_default)) if v is not None]
        with store.transaction():  # the profile's settings and their sync (0x49) at once
            if max_linked_devices is not None:
                store.set_setting(SETTING_MAX_LINKED, max_linked_devices)
            if send_jitter_max is not None:
                store.set_setting(SETTING_SEND_JITTER, float(send_jitter_max))
            if group_spread_max is not None:
                store.set_setting(SETTING_GROUP_SPREAD, float(group_spread_max))
            if read_receipts is not None:
                store.set_setting(SETTING_READ_RECEIPTS, read_receipts)
            if disappearing_default is not None:  # 0 (off): the default's default
                store.set_setting(SETTING_DISAPPEARING, disappearing_default or None)
            if receipt_delay_max is not None:
                store.set_setting(SETTING_RECEIPT_DELAY, float(receipt_delay_max))
            if synced:
                m.sync_settings.changed(*synced)  # on our other devices too (0x49)
        if proxy is not None or isolation is not None:
            # The older form of network.set: a proxy means mode proxy; removing the proxy
            # of a profile in mode proxy leaves the mode to its default (docs/api.md).
            with store.transaction():
                if proxy:
                    store.set_setting(SETTING_MODE, "proxy")
                elif proxy == "" and store.get_setting(SETTING_MODE) == "proxy":
                    store.set_setting(SETTING_MODE, None)
                if proxy is not None:  # "" removes the proxy
                    store.set_setting(SETTING_PROXY, proxy or None)
                if isolation is not None:
                    store.set_setting(SETTING_ISOLATION, isolation)
            await m.ctx.reconfigure()  # Tor and every connection anew
        result: dict[str, Any] = await settings_get(ctx)
        return result

    from . import attachments_api  # its methods: docs/api.md, "Attachments"

    attachments_api.register(registry, m)
    from . import typing_api  # messages.typing, typing.config: docs/api.md, "Typing"

    typing_api.register(registry, m)

    from . import disappearing_api  # its methods: docs/api.md, "Disappearing messages"

    disappearing_api.register(registry, m)
    from . import groups_api  # its methods: docs/api.md, "Groups"

    groups_api.register(registry, m)
    from . import conversations_api  # conversations.list, messages.search

    conversations_api.register(registry, m)
