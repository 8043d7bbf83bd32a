"""TLS for the client's channel: PEM bytes or files in, grpc.ChannelCredentials out, refused early and by name
when something is wrong. The gateway does not serve TLS yet: this is the client's half, ready for it."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

Pem = bytes | str | os.PathLike[str]

PEM_MARKER = b"-----BEGIN "


def tls_credentials(
    root_certificates: Pem | None = None,
    certificate_chain: Pem | None = None,
    private_key: Pem | None = None,
) -> grpc.ChannelCredentials | None:
    """None when no TLS argument is given (a plaintext channel). `root_certificates`: the CAs that sign the
    gateway's certificate (None with a client certificate: the system's roots); `certificate_chain` and
    `private_key` together: a client certificate for mutual TLS. Each is PEM bytes or a file path."""
    if root_certificates is None and certificate_chain is None and private_key is None:
        return None
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS): give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem("root_certificates", root_certificates),
        private_key=_pem("private_key", private_key),
        certificate_chain=_pem("certificate_chain", certificate_chain),
    )


def _pem(name: str, value: Pem | None) -> bytes | None:
    """The PEM bytes of `value`: bytes as they are, else the file it names."""
    if value is None:
        return None
    if isinstance(value, bytes):
        data, source = value, "the bytes given"
    else:
        path = Path(value)
        try:
            data, source = path.read_bytes(), str(path)
        except OSError as exc:
            raise ValueError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    if PEM_MARKER not in data:
        raise ValueError(f"{name}: {source} is not PEM (no '-----BEGIN ...' line)")
    return data
