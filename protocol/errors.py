"""Stable error codes and the exceptions that carry them.

Following h11: a :class:`RemoteProtocolError` means the peer sent something
invalid and carries the code to answer with; a :class:`LocalProtocolError`
means our own side tried to send something invalid (a bug).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Error codes on the wire; their spelling is part of the protocol and never changes."""

    BUSY = "busy"
    NOT_FOUND = "not-found"
    NOT_REGISTERED = "not-registered"
    RESTRICTED = "restricted"
    INVALID_ARGUMENT = "invalid-argument"
    PERMISSION_DENIED = "permission-denied"
    NOT_HELD = "not-held"
    TOO_LARGE = "too-large"
    UNSUPPORTED_VERSION = "unsupported-version"
    IO_ERROR = "io-error"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A protocol violation, with the code and message to report."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        """True when the byte stream cannot be trusted any more and the connection must close."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that break the protocol."""


class LocalProtocolError(ProtocolError):
    """Our side tried to send something the protocol does not allow."""
