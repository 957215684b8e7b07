"""Fixtures of the WebText tests: the generated site of `webtext_site`, served on 127.0.0.1, and a
guard that fails any test whose crawl would look up a real name or open a TCP connection to an
address that is not loopback (in this process) — the tests never reach outside the machine."""

import ipaddress
import socket

import pytest
from webtext_site import Site, SiteServer

LOOKUP_NAMES = {"localhost"}  # resolved from /etc/hosts, never by DNS


class ExternalTraffic(OSError):
    """A test tried to reach beyond loopback."""


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback
    except ValueError:
        return address.lower() in LOOKUP_NAMES


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Refuse (and fail the test on) a DNS lookup of any name but localhost, or a TCP connection to
    an address that is not loopback. Parsing numeric addresses is no traffic and stays allowed."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    attempts = []

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name.lower().rstrip(".") not in LOOKUP_NAMES:
            try:
                real_getaddrinfo(name, None, flags=socket.AI_NUMERICHOST)
            except socket.gaierror:
                if (kwargs.get("flags", args[4] if len(args) > 4 else 0)) & socket.AI_NUMERICHOST:
                    raise
                attempts.append(f"looked up the name {name!r}")
                raise ExternalTraffic(attempts[-1]) from None
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if (
            sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.type == socket.SOCK_STREAM
            and not _is_loopback(address[0])
        ):
            attempts.append(f"connected to {address[0]}")
            raise ExternalTraffic(attempts[-1])
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert not attempts, f"the test tried to reach beyond loopback: {attempts}"


@pytest.fixture
def site_server():
    server = SiteServer(Site())
    yield server
    server.close()
