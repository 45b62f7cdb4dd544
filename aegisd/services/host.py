"""What every service takes from the messenger (services/messenger.py ``Messenger``): the
daemon's context, the open store, the protocol lock and the randomness. Each service's own
host Protocol (``FanoutHost``, ``InboxHost``, ...) extends ``ServiceHost`` with the rest it
uses, so that these four are declared once. Like context.py, this module imports no service.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aegisd.core.primitives import Entropy
from aegisd.store import Store

from .context import ServiceContext


class ServiceHost(Protocol):
    """The messenger, as far as every service uses it."""

    @property
    def ctx(self) -> ServiceContext: ...
    @property
    def store(self) -> Store: ...
    @property
    def lock(self) -> asyncio.Lock: ...
    @property
    def entropy(self) -> Entropy: ...
