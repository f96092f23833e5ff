"""The public Python client of virtbus (see :mod:`virtbus.client.core`).

``Client`` (async), ``connect_sync`` (for scripts), the handles ``Host``, ``Domain`` and
``Scheduler``; requests and results are the types of :mod:`virtbus.protocol`, errors the
types of :mod:`virtbus.errors`.
"""

from virtbus.client.core import Client, Domain, Host, Scheduler
from virtbus.client.events import Since
from virtbus.client.sync import SyncClient, connect_sync

__all__ = ["Client", "Domain", "Host", "Scheduler", "Since", "SyncClient", "connect_sync"]
