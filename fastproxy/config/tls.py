"""TLS on listeners, config half: the `[listen.tls]` and `redirect_https` keys, their checks,
and the SSL contexts, built in the master once per (re)load (docs/tls.md).

Contexts are made here, before the workers fork, so that only the master reads the keys
(the workers could run as a user that cannot), and so every worker holds the same session
ticket keys: a session resumed on any worker succeeds. OpenSSL encrypts and decrypts tickets
with the keys of the context a connection started with; the SNI callback then switches the
connection to the context of the chosen certificate (`sslobj.context = ...`), which brings
the certificate, the client CAs and ALPN, while version, ciphers and client verification
stay those of the first context. That first, "front" context holds no certificate nor client
CA and is kept for the master's life per listener address and policy (`_FRONTS`), so tickets
stay valid across reloads that keep the policy; a reload that changes min_version, ciphers,
client_verify or alpn starts new keys.
"""
from __future__ import annotations

import datetime
import os
import re
import ssl
from typing import Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .runtime import RedirectHttps, Tls
from .schema import (REQUIRED, TABLE, Choice, HeaderValue, Invalid, Key, Kind, ListOf, OFF, Report,
                     Section, String, Table)

# Mozilla's "intermediate" TLS 1.2 suites without finite-field DHE: forward secrecy and AEAD only.
DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                   "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
EXPIRY_WARNING = datetime.timedelta(days=14)
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

CERTIFICATE = Section("listen.tls.certificates", "certificates item", TABLE, OFF, (
    Key("cert", String(), REQUIRED, "PEM file: the certificate, then its chain."),
    Key("key", String(), REQUIRED, "PEM file of its private key (unencrypted)."),
), "")

TLS = Section("listen.tls", "[listen.tls]", TABLE, OFF, (
    Key("certificates", ListOf(Table(CERTIFICATE), "array of { cert, key } tables"), REQUIRED,
        "The certificates, as `[{ cert = \"site.pem\", key = \"site.key\" }, ...]` (paths relative to "
        "the config file; PEM, the certificate then its chain). Each serves the names of its "
        "subjectAltName (its CN when it has none; `*.example.com` covers one label), chosen by the "
        "client's SNI; the first one serves clients whose name none covers (see `unknown_sni`). An RSA "
        "and an ECDSA certificate for the same names may both be given: the client's signature "
        "algorithms pick. An unreadable file, a key that is not the certificate's, or an expired "
        "certificate is a config error; `fastproxy -t` warns about those expiring within 14 days."),
    Key("min_version", Choice("1.2", "1.3"), "1.2", 'Oldest TLS version accepted; 1.0 and 1.1 never are.'),
    Key("ciphers", String(), DEFAULT_CIPHERS, "TLS 1.2 cipher suites, in OpenSSL's syntax (TLS 1.3 "
        "suites are OpenSSL's defaults, all safe). The default allows forward-secret AEAD suites only.",
        "ECDHE with AES-GCM or ChaCha20-Poly1305"),
    Key("unknown_sni", Choice("default", "reject"), "default", '`"default"`: a client whose SNI names '
        'no certificate (or that sends none) gets the first certificate; `"reject"`: its handshake '
        "fails with an `unrecognized_name` alert."),
    Key("alpn", ListOf(Choice("http/1.1"), "array of protocol names"), ["http/1.1"], "Protocols offered "
        "by ALPN; a client that offers none of them is still served, without ALPN."),
    Key("hsts", HeaderValue(empty=True), "", 'A `Strict-Transport-Security` value added to every '
        'response on this listener (e.g. `"max-age=31536000"`); `""`: none. An upstream\'s own header '
        "passes as well."),
    Key("client_verify", Choice("off", "optional", "required"), "off", "Client certificates (mTLS): "
        '`"optional"` asks for one and verifies it when sent; `"required"` refuses a handshake without a '
        "valid one. A verified certificate's subject (RFC 4514) and SHA-256 fingerprint (hex) go upstream "
        "as `X-Client-Cert-Subject` and `X-Client-Cert-Fingerprint`; client-sent copies of these headers "
        "are always removed, on every listener."),
    Key("client_ca", String(), None, "PEM file of the CAs that client certificates must chain to; "
        "required unless `client_verify` is `\"off\"`."),
), "TLS on a listener (`[[listen]]` then `[listen.tls]`); see docs/tls.md.")


_REDIRECT = re.compile(r"https://(\{host\}|[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(:(\d{1,5}))?")


class Redirect(Kind):
    """`true`, or an "https://authority" template whose `{host}` is the request's host."""
    name = 'boolean or "https://{host}:port"-style string'
    types = (bool, str)

    def convert(self, value):
        if value is False:
            return None
        template = "https://{host}" if value is True else value
        match = _REDIRECT.fullmatch(template.lower())
        if not match or (match[4] is not None and not 1 <= int(match[4]) <= 65535):
            raise Invalid(f'"{value}" is not "https://{{host}}", "https://{{host}}:PORT" or "https://name[:PORT]" '
                          f"(no path: the request's path and query are appended)")
        return template.lower()


def listen_keys() -> Tuple[Key, ...]:
    return (
        Key("tls", Table(TLS), None, "TLS on this listener; see `[listen.tls]` below."),
        Key("redirect_https", Redirect(), False, "Answer every request on this (plain) listener with a 308 "
            "to HTTPS, same path and query: `true` sends to `https://{host}` (the request's host, port "
            '443); a string sets the authority, e.g. `"https://{host}:8443"` or `"https://example.com"`. '
            "A request without a Host (HTTP/1.0) to a `{host}` template is answered 400.", "`false`"),
    )


# --- checks and build --------------------------------------------------------------------

class _Problem(Exception):
    """A problem with one key of a listener's TLS: (key path suffix, reason)."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


class _Problems(Exception):
    def __init__(self, problems: List[_Problem]):
        super().__init__(problems)
        self.problems = problems


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise _Problem(key, f"cannot read {path}: {error.strerror}") from None


def _names(leaf: x509.Certificate) -> Tuple[str, ...]:
    """The DNS names a certificate serves: its subjectAltName's, else its CN (RFC 6125)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [attribute.value for attribute in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(str(name).lower().rstrip(".") for name in names))


def load_cas(context: ssl.SSLContext, path: str, key: str) -> None:
    """Trust the CAs of the PEM file `path` in `context` (a listener's client_ca, an upstream's
    ca); raises _Problem at `key`."""
    _read(path, key)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise _Problem(key, f"{path}: no PEM certificate ({error.reason})") from None


class _Certificate:
    """One checked `certificates` entry."""

    def __init__(self, entry: dict, base: str, key: str, now: datetime.datetime):
        self.cert_path = os.path.join(base, entry["cert"])
        self.key_path = os.path.join(base, entry["key"])
        try:
            chain = x509.load_pem_x509_certificates(_read(self.cert_path, f"{key}.cert"))
        except ValueError:
            raise _Problem(f"{key}.cert", f"{self.cert_path} holds no PEM certificate") from None
        leaf = chain[0]
        self.not_after = leaf.not_valid_after_utc
        if self.not_after < now:
            raise _Problem(f"{key}.cert", f"{self.cert_path} expired on {self.not_after:%Y-%m-%d %H:%M} UTC")
        try:
            private = serialization.load_pem_private_key(_read(self.key_path, f"{key}.key"), password=None)
        except (ValueError, TypeError) as error:
            raise _Problem(f"{key}.key", f"{self.key_path} holds no unencrypted PEM private key ({error})") from None
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            raise _Problem(f"{key}.key", f"{self.key_path} is not the key of the certificate in {self.cert_path}")
        public = private.public_key()
        self.names = _names(leaf)
        self.key_type = ("RSA" if isinstance(public, rsa.RSAPublicKey) else
                         "ECDSA" if isinstance(public, ec.EllipticCurvePublicKey) else type(public).__name__)


def _context(tls: dict, base: str, client_ca: bool = True) -> ssl.SSLContext:
    """A server context with the listener's policy and no certificate; raises _Problems.
    Client certificates are verified against the CAs of the context the SNI callback chose,
    so the front context goes without (client_ca false): a reload takes a new client_ca."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls["min_version"]]
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(tls["alpn"]))
    context.verify_mode = _VERIFY[tls["client_verify"]]
    problems = []
    try:
        context.set_ciphers(tls["ciphers"])
    except ssl.SSLError:
        problems.append(_Problem("ciphers", f"no cipher suite that OpenSSL knows in \"{tls['ciphers']}\""))
    if tls["client_verify"] != "off" and tls["client_ca"] is None:
        problems.append(_Problem("client_ca", f"required with client_verify = \"{tls['client_verify']}\""))
    elif tls["client_verify"] != "off" and client_ca:
        try:
            load_cas(context, os.path.join(base, tls["client_ca"]), "client_ca")
        except _Problem as problem:
            problems.append(problem)
    if problems:
        raise _Problems(problems)
    return context


# Front contexts by (address, policy), kept for the master's life: see the module's docstring.
_FRONTS: Dict[tuple, ssl.SSLContext] = {}


def _front(address, tls: dict, base: str) -> ssl.SSLContext:
    policy = (str(address), tls["min_version"], tls["ciphers"], tls["client_verify"], tuple(tls["alpn"]))
    front = _FRONTS.get(policy)
    if front is None:
        front = _FRONTS[policy] = _context(tls, base, client_ca=False)
    return front


def build(listener: dict, where: str, base: str, report: Report) -> Optional[Tls]:
    """The compiled TLS of one checked listener, or None after reporting its problems."""
    tls = listener.get("tls")
    if tls is None:
        return None
    if listener.get("redirect_https"):
        report(f"{where}.redirect_https", "a TLS listener cannot also redirect to HTTPS")
    if any(key.name not in tls for key in TLS.keys):
        return None  # a bad key, already reported
    where = f"{where}.tls"
    now = datetime.datetime.now(datetime.timezone.utc)
    problems: List[_Problem] = []
    certificates: List[_Certificate] = []
    for index, entry in enumerate(tls["certificates"]):
        try:
            certificates.append(_Certificate(entry, base, f"certificates[{index}]", now))
        except _Problem as problem:
            problems.append(problem)
    try:
        _context(tls, base)  # the policy's own problems, reported once
    except _Problems as policy:
        problems += policy.problems
    for problem in problems:
        report(f"{where}.{problem.key}", problem.reason)
    if problems or listener.get("address") is None:  # a bad address is reported already
        return None
    # One context per set of names: an RSA and an ECDSA certificate for the same names share it.
    groups: Dict[Tuple[str, ...], ssl.SSLContext] = {}
    types: Dict[Tuple[str, ...], List[str]] = {}
    for index, certificate in enumerate(certificates):
        names = tuple(sorted(certificate.names))
        if certificate.key_type in types.setdefault(names, []):
            report(f"{where}.certificates[{index}]", f"a second {certificate.key_type} certificate for the same "
                                                     f"names (one RSA and one ECDSA may share them)")
            return None
        types[names].append(certificate.key_type)
        context = groups.get(names) or groups.setdefault(names, _context(tls, base))
        try:
            context.load_cert_chain(certificate.cert_path, certificate.key_path)
        except (ssl.SSLError, OSError) as error:  # the files changed since they were checked
            report(f"{where}.certificates[{index}]", f"OpenSSL refused the pair: {error}")
            return None
    exact: Dict[str, ssl.SSLContext] = {}
    wildcard: Dict[str, ssl.SSLContext] = {}
    for certificate in certificates:  # in config order: the first certificate naming a name serves it
        context = groups[tuple(sorted(certificate.names))]
        for name in certificate.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            elif "*" not in name:
                exact.setdefault(name, context)
    first = groups[tuple(sorted(certificates[0].names))]
    expiring = tuple((c.cert_path, c.names, c.not_after) for c in certificates if c.not_after - now < EXPIRY_WARNING)
    return Tls(front=_front(listener["address"], tls, base), exact=exact, wildcard=wildcard,
               default=None if tls["unknown_sni"] == "reject" else first,
               hsts=tls["hsts"].encode(), client_verify=tls["client_verify"] != "off", expiring=expiring)


def keep_fronts(listeners) -> None:
    """Forget the front contexts no listener of the runtime just built uses."""
    used = {id(listener.tls.front) for listener in listeners if listener.tls is not None}
    for policy, front in list(_FRONTS.items()):
        if id(front) not in used:
            del _FRONTS[policy]


def redirect(template: Optional[str]) -> Optional[RedirectHttps]:
    if template is None:
        return None
    before, host, after = template.partition("{host}")
    return RedirectHttps(prefix=before.encode(), use_host=bool(host), suffix=after.encode())


def expiry_warnings(runtime) -> List[str]:
    return [f"certificate {path} ({', '.join(names) or 'no names'}) expires on {not_after:%Y-%m-%d %H:%M} UTC"
            for listener in runtime.listeners if listener.tls is not None
            for path, names, not_after in listener.tls.expiring]
