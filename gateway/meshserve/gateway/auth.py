"""Tenants and their API keys: who is calling, how high they may schedule, and how much they may use.

The keys file (--api-keys-file, MESHSERVE_API_KEYS_FILE) holds SHA-256 hashes of keys, never keys:

    {"tenants": [{"name": "acme", "max_priority": "high", "requests_per_second": 5, "tokens_per_minute": 60000,
                  "key_sha256": ["<64 hex digits>", ...]}]}

A request above its tenant's `max_priority` is refused (PERMISSION_DENIED / 403) rather than clamped,
so a caller never believes it got a class it did not get; a request that names no priority gets
NORMAL, or the tenant's ceiling when that is lower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshserve.common.enums import PRIORITY_BY_NAME, PRIORITY_NAMES
from meshserve.common.errors import permission_denied, unauthenticated
from meshserve.common.tls import is_loopback  # noqa: F401  (the gateway's rule for keys, and TLS's)
from meshserve.v1 import common_pb2

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
TENANT_FIELDS = {"name", "max_priority", "requests_per_second", "tokens_per_minute", "key_sha256"}


@dataclass(frozen=True)
class Tenant:
    name: str
    # Priority values grow as classes go down: CRITICAL is 1, BATCH 5.
    max_priority: int = common_pb2.PRIORITY_NORMAL
    # 0: unlimited.
    requests_per_second: float = 0.0
    tokens_per_minute: float = 0.0

    def priority_for(self, requested: int) -> int:
        """The class a request runs in; raises PERMISSION_DENIED above the ceiling. Out-of-range values pass
        through for validation to name."""
        if requested == common_pb2.PRIORITY_UNSPECIFIED:
            return max(common_pb2.PRIORITY_NORMAL, self.max_priority)
        if requested in PRIORITY_NAMES and requested < self.max_priority:
            raise permission_denied(
                f"priority: tenant {self.name!r} may use at most {PRIORITY_NAMES[self.max_priority]}, "
                f"got {PRIORITY_NAMES[requested]}",
                "PRIORITY_ABOVE_TENANT_CEILING",
                tenant=self.name,
                max_priority=PRIORITY_NAMES[self.max_priority],
            )
        return requested


# Who calls a gateway that has no keys file (loopback, or --allow-unauthenticated): anything goes.
ANONYMOUS = Tenant("anonymous", max_priority=common_pb2.PRIORITY_CRITICAL)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(data: Any) -> dict[str, Tenant]:
    """Key hash -> tenant from a keys file's JSON; ValueError names the first bad entry."""
    if not isinstance(data, Mapping) or not isinstance(data.get("tenants"), list):
        raise ValueError('must be a JSON object {"tenants": [...]}')
    by_hash: dict[str, Tenant] = {}
    names: set[str] = set()
    for i, entry in enumerate(data["tenants"]):
        where = f"tenants[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object")
        unknown = set(entry) - TENANT_FIELDS
        if unknown:
            raise ValueError(f"{where} has unknown fields {sorted(unknown)}; allowed: {sorted(TENANT_FIELDS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not TENANT_NAME.match(name):
            raise ValueError(f"{where}.name must be 1-64 letters, digits and . _ -")
        if name in names:
            raise ValueError(f"{where}.name {name!r} appears twice")
        names.add(name)
        max_priority = entry.get("max_priority", "normal")
        if max_priority not in PRIORITY_BY_NAME:
            raise ValueError(f"{where}.max_priority must be one of {', '.join(PRIORITY_BY_NAME)}")
        limits = {}
        for limit in ("requests_per_second", "tokens_per_minute"):
            value = entry.get(limit, 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{where}.{limit} must be a number >= 0 (0: unlimited)")
            limits[limit] = float(value)
        tenant = Tenant(name, PRIORITY_BY_NAME[max_priority], **limits)
        hashes = entry.get("key_sha256")
        if not isinstance(hashes, list) or not hashes:
            raise ValueError(f"{where}.key_sha256 must be a non-empty list of SHA-256 hex digests")
        for j, digest in enumerate(hashes):
            if not isinstance(digest, str) or not SHA256_HEX.match(digest):
                raise ValueError(f"{where}.key_sha256[{j}] must be 64 lowercase hex digits (meshserve hash-key)")
            if digest in by_hash:
                raise ValueError(f"{where}.key_sha256[{j}] is also a key of tenant {by_hash[digest].name!r}")
            by_hash[digest] = tenant
    return by_hash


def load_keys(path: str) -> dict[str, Tenant]:
    try:
        with open(path, encoding="utf-8") as file:
            return parse_keys(json.load(file))
    except (OSError, ValueError) as exc:
        raise ValueError(f"API keys file {path}: {exc}") from exc


class KeyStore:
    """Authenticates `Bearer` credentials against the keys file, re-read when it changes (a rotated Secret)."""

    def __init__(self, path: str = "", recheck_seconds: float = 1.0) -> None:
        self.path = path
        self.recheck_seconds = recheck_seconds
        self._by_hash = load_keys(path) if path else {}
        self._mtime = self._file_mtime()
        self._checked = time.monotonic()

    @property
    def required(self) -> bool:
        return bool(self.path)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization` value; UNAUTHENTICATED when keys are required and it matches none."""
        if not self.required:
            return ANONYMOUS
        self._reload_if_changed()
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthenticated("missing API key: send the header `Authorization: Bearer <key>`")
        tenant = self._by_hash.get(hash_key(key.strip()))
        if tenant is None:
            raise unauthenticated("invalid API key")
        return tenant

    def _file_mtime(self) -> float:
        try:
            return os.stat(self.path).st_mtime if self.path else 0.0
        except OSError:
            return 0.0

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_seconds:
            return
        self._checked = now
        mtime = self._file_mtime()
        if mtime == self._mtime:
            return
        try:
            self._by_hash = load_keys(self.path)
            self._mtime = mtime
            log.info("reloaded API keys: %d keys", len(self._by_hash))
        except ValueError as exc:
            # A half-written or broken file must not lock every tenant out: keep serving the old keys.
            log.error("keeping the previous API keys: %s", exc)
