"""What the sync and asyncio clients share: where the gateway is, how to reach it, and the defaults of a call."""

from __future__ import annotations

import abc
from typing import Any

import grpc

from meshserve.client.credentials import Pem, tls_credentials
from meshserve.client.errors import MeshClientError
from meshserve.client.retry import Attempts, RetryPolicy
from meshserve.client.types import Completion
from meshserve.common import config as cfg
from meshserve.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_GATEWAY = f"{cfg.DEFAULT_HOST}:{cfg.GATEWAY_PORT}"
DEFAULT_TIMEOUT_S = 60.0


class ClientBase(abc.ABC):
    """The gateway's address, the API key as call metadata (`authorization: Bearer KEY`), TLS credentials
    (None: plaintext), the default deadline (None: none) and the retry policy; subclasses open the channel."""

    def __init__(
        self,
        address: str = DEFAULT_GATEWAY,
        *,
        api_key: str = "",
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, not {timeout}")
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        credentials = tls_credentials(root_certificates, certificate_chain, private_key)
        self._channel = self._open_channel(address, credentials)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    @abc.abstractmethod
    def _open_channel(self, address: str, credentials: grpc.ChannelCredentials | None) -> Any:
        """A sync or an asyncio channel to the gateway."""

    def _attempts(self, timeout: float | None) -> Attempts:
        """The attempts of one call: under its own timeout, else the client's."""
        return Attempts(self.retry, self.timeout if timeout is None else timeout)

    @staticmethod
    def _completion(reply: inference_pb2.GenerateResponse, attempts: Attempts) -> Completion:
        """The whole answer; DEADLINE_EXCEEDED when the mesh cut it at the call's deadline. (Reached there first,
        the deadline ends the sequences with finish reason "cancelled" and the gateway answers with what came,
        racing the caller's own expiry: a unary call cannot be cancelled otherwise.)"""
        completion = Completion.of(reply)
        cut = [output for output in completion.outputs if output.finish_reason == "cancelled"]
        if cut and attempts.deadline is not None:
            raise cut_at_deadline(sum(len(output.token_ids) for output in completion.outputs), attempts)
        return completion

    def _start_stream(self, request: inference_pb2.GenerateRequest) -> Any:
        """Starts one attempt of a GenerateStream call, given the time it has."""

        def start(attempt_timeout: float | None) -> Any:
            return self._stub.GenerateStream(request, timeout=attempt_timeout, metadata=self.metadata)

        return start


def cut_at_deadline(tokens: int, attempts: Attempts) -> MeshClientError:
    """The error of an answer or stream the mesh ended at the call's deadline (finish reason cancelled), which
    races the caller's own expiry: the caller hears DEADLINE_EXCEEDED either way."""
    return MeshClientError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the answer was cut at the deadline after {tokens} tokens (finish reason cancelled)",
        attempts=attempts.made,
        tokens_received=tokens,
        timeout=attempts.timeout,
    )
