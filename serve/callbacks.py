"""Where the generic webhook may send callbacks: the guard against server-side request forgery.

A signed delivery names its own `callback_url`, so whoever holds the webhook secret could make
the server POST to addresses only the server can reach: a cloud metadata service, an admin port
on localhost, the LAN. Two layers stop that:

- when a delivery arrives, `CallbackPolicy.check_url` refuses a host that is not on
  `callback_hosts` (when the list is set) or, with no list, an IP literal or `localhost` that is
  not a public address (the webhook answers 422 and queues nothing);
- when a callback is sent, `callback_client` connects only to addresses it has just resolved and
  checked, at connect time, in the connection itself: a name that resolves, or is rebound, to
  127.0.0.1 or a private address is refused, with no window between the check and the connect.

An exact entry in `callback_hosts` (`hooks.example.com`, `127.0.0.1`) is trusted as it stands,
private addresses included: that is how an internal receiver is allowed. A suffix entry
(`.example.com`, subdomains only) admits names whose addresses are all public.

Refusals raise `CallbackRefused`, whose message names the host and never the URL (a URL may
carry a token). The outbox treats it as permanent: retrying cannot change the policy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx

from bot.errors import SupportbotError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_ENTRY_HELP = "give host names like hooks.example.com or .example.com (subdomains), or an IP address; " \
              "no scheme, port or path"


class CallbackRefused(SupportbotError):
    """A callback host that the policy forbids; the message names the host, never the URL."""


# ----------------------------------------------------------------------------- hosts and addresses


def parse_host_entry(entry: str) -> str:
    """One `callback_hosts` entry in its canonical form; ValueError says what is wrong with it."""
    text = entry.strip().lower()
    suffix = text.startswith(".")
    name = text[1:] if suffix else text
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    address = _ip(name)
    if address is not None:
        if suffix:
            raise ValueError(f"{entry!r}: a leading dot needs a host name, not an address")
        return address.compressed
    name = name.rstrip(".")
    if not name or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{entry!r} is not a host name: {_ENTRY_HELP}")
    return ("." if suffix else "") + name


def normalize_host(host: str) -> str:
    """A URL's host as entries are written: lower case, no brackets or trailing dot, IPs compressed."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    address = _ip(host)
    return address.compressed if address is not None else host.rstrip(".")


def url_host(url: str) -> str:
    """The host httpx will connect to for `url` (parsed by the sender's own parser), normalized."""
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeDecodeError):
        raise CallbackRefused("callback_url has no host that can be used") from None
    if not host:
        raise CallbackRefused("callback_url has no host")
    host = normalize_host(host)
    # refused at once, not retried until the outbox's horizon: no resolver looks such a name up, no socket
    # opens such a port
    if literal_address(host) is None and not is_host_name(host):
        raise CallbackRefused(f"callback_url's host {host[:80]!r} is not a valid host name")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise CallbackRefused(f"callback_url's port {parsed.port} is not between 1 and 65535")
    return host


def is_host_name(host: str) -> bool:
    """A DNS host name: labels as allow-list entries take them (`_LABEL`; IDNA's xn-- form included), at
    most 253 characters, the last label not all digits (RFC 3696: `1.2.3.4.5` is no name and no address)."""
    labels = host.split(".")
    return len(host) <= 253 and all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def non_public(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address ('loopback', 'private', ...), or None.

    Addresses that embed an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64) are judged by it too."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and (kind := non_public(embedded)) is not None:
            return kind
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-public"


def literal_address(host: str) -> IPAddress | None:
    """`host` as an IP address when it is one, in any form the system resolver reads as one
    (`127.1`, `2130706433`, `0x7f.1` are 127.0.0.1 to getaddrinfo)."""
    address = _ip(host)
    if address is not None:
        return address
    if host and all(c in "0123456789abcdefx." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to now (asyncio's getaddrinfo), in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# ----------------------------------------------------------------------------- the policy


class CallbackPolicy:
    """The `callback_hosts` allow-list, and the public-address rule that applies without it."""

    def __init__(self, hosts: Iterable[str] = (), resolver: Resolver = system_resolver):
        entries = [parse_host_entry(host) for host in hosts]
        self.exact = frozenset(e for e in entries if not e.startswith("."))
        self.suffixes = tuple(e for e in entries if e.startswith("."))
        self.resolver = resolver

    @property
    def restricted(self) -> bool:
        """True when an allow-list is set: only hosts on it get callbacks."""
        return bool(self.exact or self.suffixes)

    def trusted(self, host: str) -> bool:
        """Listed by exact name: its addresses are not checked (an internal receiver the operator named)."""
        return normalize_host(host) in self.exact

    def listed(self, host: str) -> bool:
        host = normalize_host(host)
        if host in self.exact:
            return True
        return literal_address(host) is None and any(host.endswith(suffix) for suffix in self.suffixes)

    def check_url(self, url: str) -> str:
        """The URL's host if a callback may be sent there; else CallbackRefused naming the host.

        No DNS here (the webhook answers in milliseconds): names are resolved and checked when
        the callback is sent."""
        host = url_host(url)
        self.check_host(host)
        return host

    def check_host(self, host: str) -> None:
        host = normalize_host(host)
        if self.restricted:
            if not self.listed(host):
                raise CallbackRefused(f"host {host!r} is not in the callback allow-list (SUPPORTBOT_CALLBACK_HOSTS)")
            return
        if host == "localhost" or host.endswith(".localhost"):
            raise CallbackRefused(f"host {host!r} is this machine; callbacks go only to public hosts unless "
                                  "SUPPORTBOT_CALLBACK_HOSTS lists the host")
        address = literal_address(host)
        if address is not None and (kind := non_public(address)) is not None:
            raise CallbackRefused(f"host {host!r} is not a public address ({kind}); callbacks go only to public "
                                  "hosts unless SUPPORTBOT_CALLBACK_HOSTS lists the host")

    async def addresses(self, host: str, port: int, timeout: float | None = None) -> list[str] | None:
        """The checked addresses to connect to for `host`, or None for a trusted host (connect by name).

        Raises CallbackRefused when the host is not allowed or any of its addresses is not public
        (one bad address is enough: the connection could go to any of them), and
        httpcore.ConnectError / ConnectTimeout when it cannot be resolved (retried like a refused
        connection)."""
        self.check_host(host)
        if self.trusted(host):
            return None
        try:
            resolved = await asyncio.wait_for(self.resolver(host, port), timeout)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
        if not resolved:
            raise httpcore.ConnectError(f"{host!r} resolves to no address")
        for text in resolved:
            address = _ip(text)
            kind = "not an IP address" if address is None else non_public(address)
            if kind is not None:
                raise CallbackRefused(f"host {host!r} resolves to {text} ({kind}); callbacks go only to public "
                                      "addresses unless SUPPORTBOT_CALLBACK_HOSTS lists the host")
        return resolved


# ----------------------------------------------------------------------------- the HTTP client


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Opens a connection only to addresses the policy has just checked, for every new connection."""

    def __init__(self, policy: CallbackPolicy):
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Iterable[Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.addresses(host, port, timeout)
        if addresses is None:
            return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        failure: Exception | None = None
        for address in addresses:  # like the resolver's own connect: each address in turn
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise CallbackRefused("callbacks are not sent over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool opening connections through `_GuardedBackend`.

    httpx has no option for a network backend, so the pool it built is replaced by one that has it
    (the live webhook tests fail if a future httpx stops using `_pool`)."""

    def __init__(self, policy: CallbackPolicy, limits: httpx.Limits | None = None):
        limits = limits or httpx.Limits()
        super().__init__(limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(policy),
        )


def callback_client(policy: CallbackPolicy, timeout: float) -> httpx.AsyncClient:
    """The client that sends callbacks: guarded connections, no redirects, no proxy from the environment
    (an explicit transport leaves HTTP(S)_PROXY unused, so the guard sees the real destination)."""
    return httpx.AsyncClient(transport=_GuardedTransport(policy), timeout=timeout, follow_redirects=False,
                             headers={"User-Agent": "supportbot-webhooks"})
