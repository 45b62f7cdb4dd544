"""The store's side of linking a device (aegisd/services/devices.py): what the new device's
install writes besides the Store's own methods, and the names of the device settings (this
module owns them: services/devices.py, fanout.py, inbox.py and device_reset.py import them)."""

from __future__ import annotations

from aegisd.core.devices import DELETE_KEYS_SETTING

from .db import Store

#: This profile's own device list (hex of its bytes, docs/devices.md §3.1), this device's ID
#: (hex) and its own Ed25519 device key (raw private, hex, never sent): docs/devices.md §4.5.
SETTING_OWN_LIST = "devices.list"
SETTING_SELF = "devices.self"
SETTING_KEY = "devices.key"
#: The contacts a list this device sent has not been acknowledged by yet: {contact id: version}.
#: Sent again at the next unlock (a stop before the deposits, a contact's lost block).
SETTING_AWAITING = "devices.awaiting"
#: The list requests this device sent (§28.3): {contact id: [version, digest hex]}, the highest
#: asked of each contact. An acknowledgement naming no higher list asks nothing.
SETTING_REQUESTED = "devices.requested"
#: The list requests answered: {contact id: version of the list sent}. Once per version.
SETTING_ANSWERED = "devices.answered"
#: Set with the install, cleared once E's "listed" came: E may not list this device.
SETTING_UNCONFIRMED = "devices.unconfirmed"
#: Every mailbox a link made and a crash would leave (E's link mailbox, N's reply mailbox and
#: N's device mailbox until the install stores it), a list of descriptors in hex, so that
#: each one a restart orphaned is deleted at the relay on the next connection (not left to
#: its TTL, a link that waits for nobody). Owner keys only; the link secret is never stored.
SETTING_LINK_MB = "devices.link_mailbox"
#: How many devices may be linked to the first one (settings.set max_linked_devices, 1 to 5);
#: the protocol's bound is MAX_DEVICES in all.
SETTING_MAX_LINKED = "devices.max_linked"
#: The delete capabilities this device holds for its other devices' mailboxes (docs/devices.md
#: §6, §7): {device ID hex: [DeleteCap.to_json(), ...]}; `devices.remove` uses and drops them.
#: A link's profile carries E's own under the same name, as a setting N never installs as one
#: (the core names it: it reads a profile's).
SETTING_DELETE_KEYS = DELETE_KEYS_SETTING


def has_messages(store: Store) -> bool:
    return store.query("SELECT 1 FROM messages LIMIT 1").fetchone() is not None


def retire_mailbox(store: Store, descriptor: bytes) -> tuple[int, bytes]:
    """A mailbox of ours to delete at its relay (now or on a later connection): its row."""
    cur = store.query(
        "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (NULL, ?)", (descriptor,)
    )
    return int(cur.lastrowid), descriptor


def unretire_mailbox(store: Store, row_id: int) -> None:
    """A queued mailbox deleted at its relay: out of the queue."""
    store.query("DELETE FROM retired_mailboxes WHERE id = ?", (row_id,))


def set_contact_flags(
    store: Store, contact_id: int, verified: bool, blocked: bool, created_at: int
) -> None:
    store.query(
        "UPDATE contacts SET verified = ?, blocked = ?, created_at = ? WHERE id = ?",
        (int(verified), int(blocked), created_at, contact_id),
    )
