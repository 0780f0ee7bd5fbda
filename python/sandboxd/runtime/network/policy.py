"""E2B's egress controls: what a sandbox asked for (:class:`NetworkConfig`), checked the way E2B's
API checks it, and compiled into the decisions the firewall and the egress proxy make
(:class:`Egress`).

The semantics are E2B's (``packages/api`` and the orchestrator's ``tcpfirewall`` in e2b-dev/infra):

* ``allow_out`` takes CIDRs, IP addresses and host names (``example.com``, ``*.example.com``);
  ``deny_out`` takes CIDRs and IP addresses only. Allowed entries win over denied ones; what
  neither names is allowed. ``ALL_TRAFFIC`` (``0.0.0.0/0``) in ``deny_out`` means everything
  else, IPv6 included here (E2B's sandboxes have no IPv6).
* Host names are matched on the connection, never by resolving them once: the TLS SNI of a
  connection, or the Host header of a plain HTTP request. A connection allowed by name is dialed
  by that name, resolved on the host, so a sandbox that points an allowed name at another address
  (``/etc/hosts``) reaches the real host of that name, never its chosen address. Names in
  ``allow_out`` need ``ALL_TRAFFIC`` in ``deny_out`` (E2B's rule: otherwise they mean nothing).
* Other protocols carry no name, so only the address rules apply to them: a server-first protocol
  (SSH, SMTP) or UDP (QUIC, DNS to a server of one's own) to a denied address is denied, even when
  the address belongs to an allowed name. (sandboxd looks for a name on every TCP port, not only 80
  and 443 as E2B does, so HTTPS on 8443 to an allowed name works too.)
* ``allow_internet_access=False`` denies ``0.0.0.0/0`` whatever ``deny_out`` says; ``allow_out``
  still applies.
* DNS: the sandbox's resolver (its gateway, see :mod:`.resolver`) stands in for E2B's default
  nameserver 8.8.8.8: it answers exactly when E2B's rules would let the sandbox reach 8.8.8.8. When
  ``allow_out`` holds a name, the ``dns_servers`` (8.8.8.8 by default) are allowed outright; an
  explicit list replaces the default, and ``[]`` allows none.
* ``rules``: per-host header transforms, applied by the egress proxy to HTTP requests (and to
  HTTPS, which it then terminates with the runtime's CA, installed in every sandbox's trust store).
  A rule does not allow anything by itself. Values override headers the request already has.

What a sandbox may never reach, whatever it asks, is not here: see :mod:`.firewall`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...agent.asgi import is_token
from ..agent_client import AGENT_PORT as ENVD_PORT
from ..errors import ApiError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALL_TRAFFIC = "0.0.0.0/0"
"""E2B's "all traffic" sentinel (the SDKs' ``ALL_TRAFFIC``)."""

DEFAULT_NAMESERVER = ipaddress.IPv4Address("8.8.8.8")
"""E2B's default nameserver, allowed when ``allow_out`` names hosts and ``dns_servers`` is unset."""

MSG_DOMAINS_REQUIRE_BLOCK_ALL = (
    "When specifying allowed domains in allow out, you must include 'ALL_TRAFFIC' in deny out to block all "
    "other traffic."
)
"""E2B's own wording (``ErrMsgDomainsRequireBlockAll``)."""

# E2B's limits on transform rules (packages/api/internal/handlers/sandbox_create.go).
MAX_RULE_DOMAINS = 10
MAX_TRANSFORMS_PER_DOMAIN = 1
MAX_RULE_DOMAIN_LEN = 128
MAX_HEADER_NAME_LEN = 64
MAX_HEADER_VALUE_LEN = 2048
MAX_HEADERS_PER_RULE = 20

MAX_ENTRIES = 1000
"""Entries in ``allow_out`` or ``deny_out``: E2B sets no limit; ours keeps one request's firewall
update bounded (each entry is a set element per sandbox)."""

MAX_DNS_SERVERS = 10
"""The SDK's documented limit."""

MAX_HOST_LEN = 253
"""Longest DNS name."""

MAX_ECHO = 256
"""The most of a refused entry that its 400's message quotes (a DNS name's length, and then some)."""

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")  # fullmatch: `$` would take a final newline


def bad_header_value(value: str) -> bool:
    """Whether ``value`` holds a character no HTTP header value may (a control character but tab), or
    one no encoding can carry (a lone surrogate)."""
    return any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value)


SECRET_NAME = r"[^{}\s\x00-\x1f\x7f-\x9f]{1,128}"
"""A secret's name: 1 to 128 characters without braces, white space or control characters (the
SDKs refuse braces and control characters; white space would make a placeholder no header carries)."""

SECRET_PREFIX = "${e2b.secrets."
SECRET_PLACEHOLDER = re.compile(r"\$\{e2b\.secrets\.(" + SECRET_NAME + r")\}")
"""``${e2b.secrets.<name>}`` in a header rule's value (what the SDKs' ``Secret.fill`` writes): the
egress proxy puts the secret's current value there (:mod:`sandboxd.runtime.secrets`). Names are
matched lowercased, as they are stored."""


IDENTITY_PLACEHOLDER = "${e2b.identity.tokens."
"""E2B's workload identity placeholder (``iam`` tokens): not issued here, so refused in rules."""


def secret_references(config: NetworkConfig) -> set[str]:
    """The (lowercased) names of the secrets ``config``'s header rules refer to."""
    return {
        match[1].lower()
        for headers in (config.rules or {}).values()
        for rule in headers
        for value in rule.values()
        for match in SECRET_PLACEHOLDER.finditer(value)
    }


def fill_secrets(
    headers: tuple[tuple[str, str], ...], value_of: Callable[[str], str | None]
) -> tuple[tuple[str, str], ...] | str:
    """``headers`` with every secret placeholder replaced by ``value_of(name)``; or, when a secret
    is gone, its name (the request must not go out with the placeholder, nor without the header)."""
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        found = value_of(match[1].lower())
        if found is None:
            missing.append(match[1].lower())
            return ""
        return found

    filled = tuple((name, SECRET_PLACEHOLDER.sub(value, text) if "${" in text else text) for name, text in headers)
    return missing[0] if missing else filled


def is_domain_pattern(text: str) -> bool:
    """An exact DNS name, or one leading wildcard label (``*.example.com``); never a bare ``*``."""
    if not text or len(text) > MAX_HOST_LEN:
        return False
    name = text[2:] if text.startswith("*.") else text
    return bool(_DNS_NAME.fullmatch(name)) and "*" not in name


def match_domain(host: str, pattern: str) -> bool:
    """E2B's ``MatchDomainPattern``: exact (case-insensitive), ``*`` for any name, or ``*.suffix``
    for any depth of subdomain of ``suffix`` but not ``suffix`` itself."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if not host or not pattern or host.startswith("."):
        return False
    if pattern in (host, "*"):
        return True
    if not pattern.startswith("*."):
        return False
    suffix = pattern[2:]
    return bool(suffix) and host.endswith("." + suffix)


def parse_net(text: str) -> IPNetwork | None:
    """An IP address or CIDR block (host bits allowed, as E2B's Go parser allows), or None."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _is_specified(text: str, net: IPNetwork) -> bool:
    """E2B's ``IsSpecifiedIPOrCIDR``: no unspecified address (``0.0.0.0``, ``::``), except the
    all-traffic CIDR."""
    if text == ALL_TRAFFIC:
        return True
    address = text.split("/", 1)[0]
    try:
        return not ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return not net.network_address.is_unspecified


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A sandbox's network settings as the client gave them (echoed by ``GET /sandboxes/{id}``)."""

    allow_internet_access: bool | None = None
    allow_out: tuple[str, ...] | None = None
    deny_out: tuple[str, ...] | None = None
    dns_servers: tuple[str, ...] | None = None
    rules: dict[str, tuple[dict[str, str], ...]] | None = None
    """Host pattern → one header map per rule (E2B allows one rule per host)."""
    allow_public_traffic: bool | None = None
    mask_request_host: str | None = None
    https_ports: tuple[int, ...] | None = None

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "allow_internet_access": self.allow_internet_access,
            "allow_out": None if self.allow_out is None else list(self.allow_out),
            "deny_out": None if self.deny_out is None else list(self.deny_out),
            "dns_servers": None if self.dns_servers is None else list(self.dns_servers),
            "rules": None if self.rules is None else {k: [dict(h) for h in v] for k, v in self.rules.items()},
            "allow_public_traffic": self.allow_public_traffic,
            "mask_request_host": self.mask_request_host,
            "https_ports": None if self.https_ports is None else list(self.https_ports),
        }
        return json.dumps(body, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> NetworkConfig:
        body = json.loads(text)

        def tup(name: str) -> tuple[Any, ...] | None:
            value = body.get(name)
            return None if value is None else tuple(value)

        rules = body.get("rules")
        return NetworkConfig(
            allow_internet_access=body.get("allow_internet_access"),
            allow_out=tup("allow_out"),
            deny_out=tup("deny_out"),
            dns_servers=tup("dns_servers"),
            rules=None if rules is None else {k: tuple(dict(h) for h in v) for k, v in rules.items()},
            allow_public_traffic=body.get("allow_public_traffic"),
            mask_request_host=body.get("mask_request_host"),
            https_ports=tup("https_ports"),
        )

    def with_egress(self, update: NetworkConfig) -> NetworkConfig:
        """``update_network``: the egress part replaced whole (omitted fields are cleared, as E2B's
        update does); the ingress part (public traffic, host mask, HTTPS ports) kept."""
        return NetworkConfig(
            allow_internet_access=update.allow_internet_access,
            allow_out=update.allow_out,
            deny_out=update.deny_out,
            dns_servers=update.dns_servers,
            rules=update.rules,
            allow_public_traffic=self.allow_public_traffic,
            mask_request_host=self.mask_request_host,
            https_ports=self.https_ports,
        )


def validate(config: NetworkConfig) -> None:
    """E2B's checks of a create or update body, with E2B's messages; raises a 400 :class:`ApiError`."""
    allow = list(config.allow_out or ())
    deny = list(config.deny_out or ())
    for name, entries in (("allow out", allow), ("deny out", deny)):
        if len(entries) > MAX_ENTRIES:
            raise ApiError(400, f"{name} has {len(entries)} entries; at most {MAX_ENTRIES} are accepted")
    for entry in deny:
        net = parse_net(entry)
        if net is None or not _is_specified(entry, net):
            raise ApiError(400, f"invalid denied CIDR {_clip(entry)}")
    domains = []
    for entry in allow:
        net = parse_net(entry)
        if net is not None:
            if not _is_specified(entry, net):
                raise ApiError(400, f"invalid allowed address {_clip(entry)}")
        elif _looks_like_address(entry) or not (entry == "*" or is_domain_pattern(entry)):
            raise ApiError(400, f"invalid allowed address {_clip(entry)}")
        else:
            domains.append(entry)
    if domains and ALL_TRAFFIC not in deny:
        raise ApiError(400, MSG_DOMAINS_REQUIRE_BLOCK_ALL)
    if config.dns_servers is not None:
        if len(config.dns_servers) > MAX_DNS_SERVERS:
            raise ApiError(400, f"dns servers: at most {MAX_DNS_SERVERS} entries, got {len(config.dns_servers)}")
        for server in config.dns_servers:
            try:
                ipaddress.IPv4Address(server)
            except ValueError:
                raise ApiError(400, f"invalid DNS server {_clip(server)}: each entry must be an IPv4 address") from None
    _validate_rules(config.rules)
    if config.mask_request_host is not None:
        mask = config.mask_request_host
        if not mask or len(mask) > MAX_HOST_LEN or not all(0x21 <= ord(c) < 0x7F for c in mask):
            raise ApiError(400, f"mask request host is not valid: {_clip(mask)}")
    for port in config.https_ports or ():
        if not 0 < port < 65536:
            raise ApiError(400, f"https ports: {port} is not a TCP port")
        if port == ENVD_PORT:
            raise ApiError(400, f"https ports: the envd port ({ENVD_PORT}) cannot be listed")


def _clip(text: str) -> str:
    """An entry as a message echoes it: E2B's messages quote what they refuse, but an entry may be as
    long as the body limit lets it be (1 MiB), and a message is for reading."""
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 1] + "…"


def _looks_like_address(entry: str) -> bool:
    """A malformed IP or CIDR (``1.2.3.4/40``, ``1.2.3``), which must not pass as a host name."""
    head = entry.split("/", 1)[0]
    return "/" in entry or ":" in entry or bool(re.fullmatch(r"[0-9.]+", head))


def _validate_rules(rules: dict[str, tuple[dict[str, str], ...]] | None) -> None:
    if rules is None:
        return
    if len(rules) > MAX_RULE_DOMAINS:
        raise ApiError(400, f"Network rules can have at most {MAX_RULE_DOMAINS} domains.")
    for domain, domain_rules in rules.items():
        if not domain:
            raise ApiError(400, "Rule domain must not be empty.")
        if len(domain) > MAX_RULE_DOMAIN_LEN:
            raise ApiError(
                400, f'Rule domain "{_clip(domain)}" exceeds maximum length of {MAX_RULE_DOMAIN_LEN} characters.'
            )
        if not is_domain_pattern(domain):
            raise ApiError(400, f'Rule domain "{domain}" is not a valid domain name.')
        if len(domain_rules) > MAX_TRANSFORMS_PER_DOMAIN:
            raise ApiError(400, f'Domain "{domain}" can have at most {MAX_TRANSFORMS_PER_DOMAIN} transform rule.')
        for headers in domain_rules:
            if len(headers) > MAX_HEADERS_PER_RULE:
                raise ApiError(400, f'Domain "{domain}" can have at most {MAX_HEADERS_PER_RULE} headers per rule.')
            for name, value in headers.items():
                if not name:
                    raise ApiError(400, f'Header name in rule for domain "{domain}" must not be empty.')
                if not is_token(name.encode("utf-8", "surrogatepass")):
                    raise ApiError(
                        400,
                        f'Header name "{_clip(name)}" in rule for domain "{domain}" must contain only valid HTTP token '
                        "characters.",
                    )
                if len(name) > MAX_HEADER_NAME_LEN:
                    raise ApiError(
                        400,
                        f'Header name "{_clip(name)}" in rule for domain "{domain}" exceeds maximum length of '
                        f"{MAX_HEADER_NAME_LEN} characters.",
                    )
                if bad_header_value(value):
                    raise ApiError(
                        400, f'Value for header "{name}" in rule for domain "{domain}" contains invalid characters.'
                    )
                if value.count(SECRET_PREFIX) != len(SECRET_PLACEHOLDER.findall(value)):
                    raise ApiError(
                        400,
                        f'Value for header "{name}" in rule for domain "{domain}" has a malformed secret placeholder: '
                        "write ${e2b.secrets.<name>} (Secret.fill(name)), a name of 1 to 128 characters without "
                        "'{', '}', white space or control characters",
                    )
                if IDENTITY_PLACEHOLDER in value:
                    raise ApiError(
                        400,
                        f'Value for header "{name}" in rule for domain "{domain}" names a workload identity token, '
                        "which sandboxd does not issue: keep the credential with Secret.create and name it with "
                        "Secret.fill(name)",
                    )
                if len(value) > MAX_HEADER_VALUE_LEN:
                    raise ApiError(
                        400,
                        f'Value for header "{name}" in rule for domain "{domain}" exceeds maximum length of '
                        f"{MAX_HEADER_VALUE_LEN} characters.",
                    )


@dataclass(frozen=True, slots=True)
class Egress:
    """The decisions a sandbox's network settings come to."""

    allow_nets: tuple[IPNetwork, ...] = ()
    deny_nets: tuple[IPNetwork, ...] = ()
    allow_domains: tuple[str, ...] = ()
    header_rules: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    """(host pattern, headers) in the order E2B picks them: exact names first, then the longest
    wildcard suffix."""
    resolver_reachable: bool = True
    all_denied: bool = False
    """Nothing is allowed but what ``allow_nets``/``allow_domains`` name (deny covers everything)."""

    @property
    def proxied(self) -> bool:
        """Whether the sandbox's TCP must go through the egress proxy (names or header rules)."""
        return bool(self.allow_domains or self.header_rules)

    def address_verdict(self, ip: IPAddress) -> bool | None:
        """True (allowed by an address rule), False (denied by one), None (neither: allowed)."""
        if any(ip in net for net in self.allow_nets):
            return True
        if any(ip in net for net in self.deny_nets):
            return False
        return None

    def name_allowed(self, host: str) -> bool:
        return any(match_domain(host, pattern) for pattern in self.allow_domains)

    def headers_for(self, host: str) -> tuple[tuple[str, str], ...] | None:
        """The header transform for requests to ``host``: the exact rule, else the longest matching
        wildcard (rule sets are not merged)."""
        for pattern, headers in self.header_rules:
            if match_domain(host, pattern):
                return headers
        return None


def compile_egress(config: NetworkConfig) -> Egress:
    """The decisions for ``config`` (already :func:`validate`\\ d)."""
    allow_nets: list[IPNetwork] = []
    domains: list[str] = []
    for entry in config.allow_out or ():
        net = parse_net(entry)
        if net is None:
            domains.append(entry.lower().rstrip("."))
        else:
            allow_nets.append(net)
    deny_nets = [n for n in (parse_net(e) for e in config.deny_out or ()) if n is not None]
    everything_v4 = ipaddress.ip_network(ALL_TRAFFIC)
    if config.allow_internet_access is False:
        deny_nets = [everything_v4]
    if everything_v4 in deny_nets:
        deny_nets.append(ipaddress.ip_network("::/0"))  # "all traffic" means IPv6 too
    if domains:
        servers = config.dns_servers if config.dns_servers is not None else (str(DEFAULT_NAMESERVER),)
        allow_nets += [ipaddress.ip_network(s) for s in servers]
    egress = Egress(
        allow_nets=tuple(dict.fromkeys(allow_nets)),
        deny_nets=tuple(dict.fromkeys(deny_nets)),
        allow_domains=tuple(dict.fromkeys(domains)),
        header_rules=_ordered_rules(config.rules),
        all_denied=everything_v4 in deny_nets,
    )
    reachable = egress.address_verdict(DEFAULT_NAMESERVER) is not False
    return Egress(
        allow_nets=egress.allow_nets,
        deny_nets=egress.deny_nets,
        allow_domains=egress.allow_domains,
        header_rules=egress.header_rules,
        resolver_reachable=reachable,
        all_denied=egress.all_denied,
    )


def _ordered_rules(
    rules: dict[str, tuple[dict[str, str], ...]] | None,
) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    if not rules:
        return ()
    items = []
    for pattern, domain_rules in rules.items():
        headers: dict[str, str] = {}
        for rule in domain_rules:
            headers.update(rule)
        items.append((pattern.lower().rstrip("."), tuple(headers.items())))
    # Exact names first, then wildcards by decreasing suffix length (E2B: "exact rules take
    # precedence, followed by the longest matching wildcard suffix").
    items.sort(key=lambda item: (item[0].startswith("*"), -len(item[0])))
    return tuple(items)
