"""The one exception a client call raises: the mesh's status (MeshError) plus what the client did about it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2

from meshserve.common.errors import MeshError, from_rpc_error, retry_delay_seconds


class MeshClientError(MeshError):
    """A call that failed: `.code` (grpc.StatusCode), `.message` (the server's words), `.details` (google.rpc
    details), `.retry_after` (the server's RetryInfo delay, seconds), `.field_violations` (BadRequest's
    (field, description) pairs), `.attempts` (calls made) and `.tokens_received` (a stream's tokens that had
    arrived when it failed: such a stream is never retried, since a retry would send them again)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Sequence[Any] = (),
        *,
        attempts: int = 1,
        tokens_received: int = 0,
        timeout: float | None = None,
    ) -> None:
        super().__init__(code, message, details)
        self.attempts = attempts
        self.tokens_received = tokens_received
        self.timeout = timeout

    @classmethod
    def of_rpc_error(
        cls, error: grpc.RpcError, *, attempts: int = 1, tokens_received: int = 0, timeout: float | None = None
    ) -> MeshClientError:
        status = from_rpc_error(error)
        return cls(
            status.code,
            status.message,
            status.details,
            attempts=attempts,
            tokens_received=tokens_received,
            timeout=timeout,
        )

    @property
    def retry_after(self) -> float | None:
        return retry_delay_seconds(self)

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        return [
            (violation.field, violation.description)
            for detail in self.details
            if isinstance(detail, error_details_pb2.BadRequest)
            for violation in detail.field_violations
        ]

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.code == grpc.StatusCode.DEADLINE_EXCEEDED and self.timeout is not None:
            text = f"DEADLINE_EXCEEDED: no answer within the deadline of {self.timeout:g} s ({self.message})"
        if self.tokens_received:
            text += f"; the stream failed after {self.tokens_received} tokens had arrived (not retried: it had tokens)"
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return text
