"""The daemon's services: messaging around the pure protocol core (aegisd/core).

The daemon (aegisd/daemon.py) creates them and gives them a ``ServiceContext``
(context.py: the store, the event bus, the settings' network, the life-cycle hooks): never
the ``Daemon`` itself, which imports them. No two modules here import each other (enforced by
tests/unit/test_service_boundaries.py): a module takes what it needs from its owner through a
small Protocol (``...Host``, ``...View``) or callbacks (delivery.DeliveryHooks).

Module map (the messenger's parts first):

- ``messenger.py``: ``Messenger``, the facade that holds the parts below, the protocol lock,
  the identity and its prekeys; life cycle (unlock, lock, the maintenance loop), sending a
  text, read marks, call signaling.
- ``mailbox_loss.py``: a copy of the profile restored elsewhere, a relay that lost our
  mailboxes, mailboxes expired while the daemon was away.
- ``mailboxes.py``: the mailboxes this profile owns, the relay link and the drain links of a
  relay move; making, pooling, retiring and deleting mailboxes; the relay URL policies.
- ``address.py``: the public address, its prekey bundle at the relay, invitations.
- ``contacts.py``: contacts and contact requests (add, accept, block, remove).
- ``delivery.py``: the delivery layer, the one place that sends a payload to recipients:
  encrypt per ratchet session, store in the durable outbox, drain it.
- ``inbox.py``: every block delivered to a mailbox of ours: first contacts, contacts'
  ratchet messages, partial messages, payload handling.
- ``rotation.py``: per-contact mailbox rotation, and relay moves built on it.
- ``mailbox.py``: the stored forms of a mailbox of ours and of a contact's state.
- ``bundle_fetch.py``: fetching a contact's prekey bundle, its errors.
- ``attachments.py``, ``attachments_api.py``: files (docs/protocol.md §22) and their methods.
- ``actions.py``: replies, reactions, edits and deletions of one-to-one messages (§26).
- ``typing_indicators.py``, ``typing_api.py``: typing indicators (§22.6) and their methods.
- ``renewal.py``: session renewal after a backup import (§23).
- ``cover.py``: cover traffic and the slots real blocks wait for (§24).
- ``disappearing.py``, ``disappearing_api.py``: disappearing-message timers and the erasure
  of expired messages (docs/protocol.md §27), and their methods.
- ``backup.py``: encrypted backup export and import, and their methods.
- ``connectivity.py``: network modes, the managed Tor, ``network.*`` and ``relay.set``.
- ``api.py``, ``privacy_api.py``: the messaging and privacy JSON-RPC methods.
- ``conversations_api.py``: ``conversations.list`` and ``messages.search`` (the FTS5 index:
  aegisd/store/search.py); ``message_view.py``: a stored message as the API shows it;
  ``group_logs.py``: every group's log, parsed again only when it changed (for those two).
- ``context.py``: ``ServiceContext``, what the services take from the daemon.
"""
