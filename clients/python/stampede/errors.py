"""Exceptions: transport and protocol failures, never domain outcomes.

A ``sold_out`` or ``expired`` is an answer and comes back as an
``Outcome``. Exceptions are for the cases where there is no answer, or no
usable one:

- ``TransportError`` and its subclasses: the connection failed or the
  reply did not come in time. Except for ``ConnectError`` (the request
  never left this process), the request **may or may not have been
  executed**: its outcome is unknown (PROTOCOL.md §9). The client has
  already retried it with the same reservation id; resend it later with the
  same id, or release that id, but never reserve again under a new id.
- ``AuthError``: the token was refused (a configuration problem).
- ``ServerError``: the server answered with an ERROR frame
  (``forbidden``, ``unauthenticated``, a 50-series protocol error, ...).
- ``ProtocolError``: the server's bytes broke the protocol.
- ``InvalidRequest``: the arguments can not be encoded (caught before
  anything is sent).
"""

from __future__ import annotations

from typing import Optional

from .status import Status


class StampedeError(Exception):
    """Base class of every exception this package raises."""

    #: Set on exceptions raised by ``reserve``: the id the reservation was
    #: attempted with, to retry or release it later.
    reservation_id: Optional[int] = None


class TransportError(StampedeError):
    """No reply. ``outcome_unknown`` says whether the request may have
    reached the server."""

    outcome_unknown = True


class ConnectError(TransportError):
    """A connection (TCP, TLS or HELLO round trip) could not be opened: the
    request provably never reached the server."""

    outcome_unknown = False

    def __init__(self, addr: str, cause: object) -> None:
        super().__init__("cannot connect to %s: %s" % (addr, cause))
        self.addr = addr
        self.cause = cause


class TLSError(ConnectError):
    """The TLS handshake failed (for example an untrusted certificate). Not
    retried: resending cannot fix a trust problem."""


class ConnectionLost(TransportError):
    """The connection ended before the reply arrived."""

    def __init__(self, message: str = "connection lost before the reply arrived") -> None:
        super().__init__(message)


class RequestTimeout(TransportError):
    """No reply within the request timeout."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__("no reply within %.3f s" % timeout_s)
        self.timeout_s = timeout_s


class AuthError(StampedeError):
    """The server refused the token (``auth_failed``)."""

    def __init__(self, status: Status) -> None:
        super().__init__("authentication failed: %s" % status.wire_name)
        self.status = status


class ServerError(StampedeError):
    """The server answered with an ERROR frame. Act on ``status``; the
    message is for logs only (its text is not stable)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__("server refused the request: %s: %s" % (status.wire_name, message))
        self.status = status
        self.message = message


class ProtocolError(StampedeError):
    """The peer's bytes do not follow the protocol."""


class FrameError(ProtocolError):
    """A frame failed validation (PROTOCOL.md §2.3, §2.4). ``status`` is the
    protocol error it amounts to; ``request_id`` is known once the header
    checksum verified."""

    def __init__(self, status: Status, request_id: Optional[int], detail: str) -> None:
        super().__init__("%s: %s" % (status.wire_name, detail))
        self.status = status
        self.request_id = request_id
        self.detail = detail


class Malformed(ProtocolError):
    """A body does not match its opcode's layout."""


class InvalidRequest(StampedeError, ValueError):
    """The arguments cannot be sent (out of range, too long); nothing was sent."""
