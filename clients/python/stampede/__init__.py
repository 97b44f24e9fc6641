"""Python client for stampede, the flash-sale inventory server.

Two clients with the same methods: ``AsyncClient`` for asyncio code and
``Client`` (blocking) for scripts and WSGI apps. Outcomes are data
(``Outcome`` with a ``Status``); transport failures are exceptions (see
``stampede.errors``). The wire codec (``stampede.messages``,
``stampede.frame``) follows PROTOCOL.md and is checked against the shared
test vectors. ``python -m stampede`` is a small command line.
"""

from __future__ import annotations

from .aio import AsyncClient, ClientStats
from .errors import (
    AuthError,
    ConnectError,
    ConnectionLost,
    InvalidRequest,
    ProtocolError,
    RequestTimeout,
    ServerError,
    StampedeError,
    TLSError,
    TransportError,
)
from .ids import format_reservation_id, new_reservation_id, parse_reservation_id
from .messages import (
    ClusterReply,
    LocationsReply,
    LocationStatus,
    Outcome,
    OutcomeAt,
    QueueConfig,
    QueueTicket,
    Reserve,
    SaleLocations,
    StatusReply,
)
from .status import NodeRole, Opcode, Role, Status
from .sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthError",
    "Client",
    "ClientStats",
    "ClusterReply",
    "ConnectError",
    "ConnectionLost",
    "InvalidRequest",
    "LocationStatus",
    "LocationsReply",
    "NodeRole",
    "Opcode",
    "Outcome",
    "OutcomeAt",
    "ProtocolError",
    "QueueConfig",
    "QueueTicket",
    "RequestTimeout",
    "Reserve",
    "Role",
    "SaleLocations",
    "ServerError",
    "StampedeError",
    "Status",
    "StatusReply",
    "TLSError",
    "TransportError",
    "format_reservation_id",
    "new_reservation_id",
    "parse_reservation_id",
]
