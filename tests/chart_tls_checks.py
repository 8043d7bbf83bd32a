"""The chart's cert-manager objects, checked by shape: the offline validator has no schema for them."""

from __future__ import annotations

import re
from typing import Any

CERTIFICATE_FIELDS = {
    "secretName", "commonName", "dnsNames", "duration", "renewBefore", "usages", "privateKey", "issuerRef", "isCA",
}  # fmt: skip
CERTIFICATE_USAGES = {"server auth", "client auth", "digital signature", "key encipherment", "cert sign"}


def check_cert_manager(docs: list[dict[str, Any]]) -> None:
    """cert-manager's CRDs have no bundled schema either: the shape cert-manager reads, and issuers that exist."""
    issued = [d for d in docs if d["apiVersion"] == "cert-manager.io/v1"]
    issuers = {d["metadata"]["name"] for d in issued if d["kind"] == "Issuer"}
    for doc in issued:
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"} and doc["kind"] in ("Certificate", "Issuer")
        spec = doc["spec"]
        if doc["kind"] == "Issuer":
            assert len(spec) == 1 and set(spec) <= {"selfSigned", "ca"}, spec
            continue
        assert set(spec) <= CERTIFICATE_FIELDS and set(spec.get("usages", [])) <= CERTIFICATE_USAGES, spec
        assert set(spec["privateKey"]) <= {"algorithm", "size", "rotationPolicy", "encoding"}
        assert spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
        if spec["issuerRef"]["kind"] == "Issuer":
            assert spec["issuerRef"]["name"] in issuers, spec["issuerRef"]
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", spec.get("duration", "1h"))
