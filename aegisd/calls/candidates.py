"""Which of a contact's ICE candidates a call may probe (docs/threat-model.md §4.4).

The contact writes its own SDP: its candidates are addresses of its choosing, and an accepted
call sends STUN connectivity checks to every one of them. A candidate on loopback or a
private, link-local or otherwise non-public address would make the daemon knock on services
of the user's machine or network; it is dropped, unless the user's own relay is itself local
(a relay on loopback or the LAN: the user runs everything there, and the tests do). A
candidate named by a host name (mDNS ``.local`` or another) is dropped too: it would be
resolved locally. Standard library only.
"""

from __future__ import annotations

import ipaddress

from aegisd.relayurl import host_of, is_public_address, is_public_name


def relay_is_local(own_url: str | None) -> bool:
    """Whether the user's own relay is on this machine or its network (then the contact's
    local candidates are kept: both ends are there)."""
    host = host_of(own_url)
    if host is None:
        return False
    if is_public_address(host):
        return False
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        return True  # an address that is not public: loopback, private, link-local
    except ValueError:
        return not is_public_name(host)


def public_candidates(sdp: str) -> tuple[str, int]:
    """The SDP without the candidates whose address is not a public IP address, and how many
    were dropped. Every other line is kept as it is (fingerprints included)."""
    kept: list[str] = []
    dropped = 0
    for line in sdp.splitlines(keepends=True):
        if line.startswith("a=candidate:"):
            fields = line.split()
            # a=candidate:FOUNDATION COMPONENT TRANSPORT PRIORITY ADDRESS PORT typ TYPE ...
            if len(fields) < 6 or not is_public_address(fields[4]):
                dropped += 1
                continue
        kept.append(line)
    return "".join(kept), dropped
