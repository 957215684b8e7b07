"""Which addresses the crawler may connect to: only globally routable ones, by default.

A Reddit link, a redirect or a robots.txt redirect can point at `127.0.0.1`, `10.x`, the cloud
metadata service `169.254.169.254`, or a name that resolves to one of them. The crawler runs inside
someone's network, so it refuses every address that is not globally routable (`is_public_address`),
checked twice: a URL whose host is an IP literal (in any spelling the OS accepts, `127.1` and
`0x7f.0.0.1` included) is refused before any connection (`literal_host_allowed`), and every name is
resolved by `GuardedResolver`, whose answers are the addresses aiohttp then connects to — so a name
that resolves to a private address, or changes its answer between lookups (DNS rebinding), is
refused too. `FetchOptions.allow_private_addresses` turns the guard off (an intranet crawl, tests).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import Any

# Not globally routable, though Python 3.11's `is_global` says they are.
_EXTRA_NON_GLOBAL = (
    ipaddress.ip_network("64:ff9b:1::/48"),  # NAT64 local use (RFC 8215)
    ipaddress.ip_network("fec0::/10"),  # site-local (deprecated, RFC 3879)
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated, RFC 4291): never a real destination
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are IPv4


class BlockedAddress(OSError):
    """A connection the address guard refused (raised from the resolver, so aiohttp passes it on)."""

    MESSAGE = "address is not globally routable"

    def __init__(self, host: str, addresses: list[str]):
        super().__init__(self.MESSAGE)
        self.host, self.addresses = host, addresses


def _routable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        ip.is_global
        and not ip.is_multicast
        and not any(ip in net for net in _EXTRA_NON_GLOBAL if ip.version == net.version)
    )


def is_public_address(address: str) -> bool:
    """Whether `address` (IPv4 or IPv6, a zone suffix allowed) is globally routable. IPv6 forms
    that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) count as that address too."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return _routable(ip)
    if ip.ipv4_mapped is not None:
        return _routable(ip.ipv4_mapped)
    if ip in _NAT64:
        return _routable(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    embedded = [v4 for v4 in (ip.sixtofour, *(ip.teredo or ())) if v4 is not None]
    if embedded:  # 6to4, Teredo: the carried IPv4 decides (Python's own view of 2002::/16 changed in 3.11.x)
        return all(_routable(v4) for v4 in embedded)
    return _routable(ip)


def _looks_numeric(host: str) -> bool:
    """aiohttp's own test for an IP literal: it connects to such hosts without asking the resolver."""
    return ":" in host or host.replace(".", "").isdigit()


def literal_host_allowed(host: str) -> bool | None:
    """For an IP-literal host, whether it may be connected to; None for a name (the resolver decides).
    A host that looks numeric but is no address the OS parses is refused."""
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return False if _looks_numeric(host) else None
    return all(is_public_address(info[4][0]) for info in infos)


class GuardedResolver:
    """An aiohttp resolver: `pinned` names get their given address (trusted: the user named it),
    every other name is resolved by `inner` and only its globally routable answers are returned
    (all of them with `allow_private`); a name with none raises `BlockedAddress`."""

    def __init__(self, inner: Any = None, pinned: Mapping[str, str] | None = None, allow_private: bool = False):
        from aiohttp.resolver import ThreadedResolver

        self.inner = inner if inner is not None else ThreadedResolver()
        self.pinned = {host.lower(): address for host, address in (pinned or {}).items()}
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        pinned = self.pinned.get(host.rstrip(".").lower())
        if pinned is not None:
            return [
                {
                    "hostname": host,
                    "host": pinned,
                    "port": port,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                    "family": socket.AF_INET6 if ":" in pinned else socket.AF_INET,
                }
            ]
        answers = await self.inner.resolve(host, port, family)
        if self.allow_private:
            return answers
        public = [answer for answer in answers if is_public_address(answer["host"])]
        if not public:
            raise BlockedAddress(host, [answer["host"] for answer in answers])
        return public

    async def close(self) -> None:
        await self.inner.close()


def parse_pin(text: str) -> tuple[str, str]:
    """`HOST=ADDRESS` (the --resolve option) → (host, address); ValueError if either is malformed."""
    host, sep, address = text.partition("=")
    host = host.strip().rstrip(".").lower()
    address = address.strip().strip("[]")
    if not sep or not host or literal_host_allowed(host) is not None:
        raise ValueError(f"expected HOST=ADDRESS with HOST a name, got {text!r}")
    ipaddress.ip_address(address)  # ValueError names the bad address
    return host, address
