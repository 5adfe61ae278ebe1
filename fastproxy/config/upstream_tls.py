"""TLS to upstreams, config half: the `[upstreams.NAME.tls]` keys and the client SSL context
of an upstream, built in the master once per (re)load (docs/upstream-tls.md).

The context is made here, before the workers fork, so that only the master reads a client
key (the workers may run as a user that cannot) and every worker inherits it ready. The
workers pass it, with each server's name, to the event loop's create_connection: uvloop runs
the handshake and the record layer, and the connections are pooled like plain ones.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
from typing import Optional

from .schema import _HOSTNAME, OFF, TABLE, Boolean, Invalid, Key, Kind, Report, Section, String
# files are read and a client certificate checked as a listener's are
from .tls import _Certificate, _Problem, load_cas


class ServerName(Kind):
    """A host name (lower-cased) or an IP address: what OpenSSL can check a certificate against."""
    name = "host name or IP address"
    types = (str,)

    def convert(self, value):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if not _HOSTNAME.fullmatch(value.lower()) or value.replace(".", "").isdigit():
                raise Invalid(f"{json.dumps(value)} is not a host name or IP address") from None
            return value.lower()


TLS = Section("upstreams.tls", "[upstreams.NAME.tls]", TABLE, OFF, (
    Key("verify", Boolean(), True, "Verify each server's certificate: it must chain to `ca` and name "
        "`server_name`. `false`: any certificate is taken (the connection is encrypted, not "
        "authenticated)."),
    Key("ca", String(), None, "PEM file of the CAs server certificates must chain to (relative to the "
        "config file); not with `verify = false`.", "the system's store"),
    Key("server_name", ServerName(), None, "The name sent as SNI and that the certificate must name, for "
        "every server of the upstream. An IP address is matched against the certificate's IP "
        "addresses and sends no SNI.", "each server's host as written in `servers` (a name, "
        "not the address it resolved to)"),
    Key("cert", String(), None, "PEM file of a client certificate (then its chain) presented to the "
        "servers that ask for one; with `key`.", "none"),
    Key("key", String(), None, "PEM file of the client certificate's private key (unencrypted); read "
        "by the master only.", "none"),
), "TLS to the upstream's servers, verified by default (docs/upstream-tls.md); `tls = {}` is TLS with "
   "every default, as `https://` servers are. Connections are kept alive and reused like plain ones; "
   "`connect_timeout` bounds the handshake too.")


def build(tls: Optional[dict], where: str, base: str, report: Report) -> Optional[ssl.SSLContext]:
    """The client context of an upstream whose servers use TLS (`tls`: its checked table, None
    for the defaults of an https:// server), or None after reporting its problems."""
    tls = tls if tls is not None else {key.name: key.default for key in TLS.keys}
    if any(key.name not in tls for key in TLS.keys):
        return None  # a bad value, already reported
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS 1.2 and up, hostname checked
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    problems = []
    if not tls["verify"]:
        if tls["ca"] is not None:
            problems.append(_Problem("ca", "nothing is verified with verify = false"))
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls["ca"] is None:
        context.load_default_certs()
    else:
        try:
            load_cas(context, os.path.join(base, tls["ca"]), "ca")
        except _Problem as problem:
            problems.append(problem)
    if (tls["cert"] is None) != (tls["key"] is None):
        missing = "key" if tls["key"] is None else "cert"
        problems.append(_Problem(missing, f"required with {'cert' if missing == 'key' else 'key'}"))
    elif tls["cert"] is not None:
        try:
            client = _Certificate(tls, base, "", datetime.datetime.now(datetime.timezone.utc))
            context.load_cert_chain(client.cert_path, client.key_path)
        except _Problem as problem:
            problems.append(_Problem(problem.key.lstrip("."), problem.reason))
        except (ssl.SSLError, OSError) as error:  # the files changed since they were checked
            problems.append(_Problem("cert", f"OpenSSL refused the pair: {error}"))
    for problem in problems:
        report(f"{where}.tls.{problem.key}", problem.reason)
    return None if problems else context
