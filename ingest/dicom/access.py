"""Who may send us studies: an allow-list of calling AE titles, optionally bound to addresses.

Checked when an association is requested, so an unknown sender never gets to transfer data.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from core.errors import ConfigurationError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowRule:
    ae_title: str
    network: Network | None = None  # None: from any address

    def matches(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False


def parse_allow_list(text: str) -> tuple[AllowRule, ...]:
    """'CT1, PACS@10.0.0.5, MOD@10.1.0.0/16' → rules; raises ConfigurationError on bad entries."""
    rules = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        ae, _, where = entry.partition("@")
        ae = ae.strip()
        if not ae or len(ae) > 16:
            raise ConfigurationError(
                f"MEDBATCH_DICOM_ALLOWED_AES: {entry!r} is not an AE title of 1–16 characters"
            )
        network = None
        if where.strip():
            try:
                network = ipaddress.ip_network(where.strip(), strict=False)
            except ValueError as exc:
                raise ConfigurationError(
                    f"MEDBATCH_DICOM_ALLOWED_AES: {entry!r}: {where!r} is not an address or network"
                ) from exc
        rules.append(AllowRule(ae, network))
    return tuple(rules)


@dataclass(frozen=True)
class AccessPolicy:
    rules: tuple[AllowRule, ...]
    allow_any: bool = False

    def allows(self, ae_title: str, address: str) -> bool:
        return self.allow_any or any(r.matches(ae_title, address) for r in self.rules)

    @classmethod
    def from_settings(cls, allowed: str, allow_any: bool) -> AccessPolicy:
        rules = parse_allow_list(allowed)
        if not rules and not allow_any:
            raise ConfigurationError(
                "the DICOM listener has no allow-list: set MEDBATCH_DICOM_ALLOWED_AES to the "
                "calling AE titles of your PACS and modalities (or MEDBATCH_DICOM_ALLOW_ANY_AE="
                "true on a closed test network)"
            )
        return cls(rules, allow_any)
