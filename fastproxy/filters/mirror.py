"""Request mirroring, config half: `mirror = { upstream = "NAME", percent = 100 }` sends a copy
of the selected requests (the head as sent upstream, and the body) to another upstream and
drops its answers (runtime half: core/f_mirror.pyx; docs/mirror.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fastproxy.config.handlers import check_upstream
from fastproxy.config.schema import OFF, REQUIRED, TABLE, Integer, Key, Section, String

from .base import Filter, Phase


@dataclass(frozen=True)
class Mirror(Filter):
    upstream: str  # the [upstreams.NAME] the copies go to
    percent: int  # how many of every 100 requests on the route are copied (per worker)
    max_in_flight: int  # copies in progress at once (per worker); past it a request is not copied

    name = "mirror"
    priority = 50  # its hooks see the request as the upstream gets it, whatever their order
    phases = frozenset({Phase.UPSTREAM, Phase.REQUEST_BODY, Phase.LOG})
    runtime = "mirror"
    upstream_only = True
    stateful = True  # the copy in progress, while the request body streams to it
    doc = "Send a copy of the route's requests to another upstream, its answers dropped; see below."

    def check(self, where: str, tree: dict, report) -> None:
        check_upstream(self.upstream, f"{where}.upstream", tree, report)


SECTION = Section("mirror", "[[routes]].mirror", TABLE, OFF, (
    Key("upstream", String(), REQUIRED, "The `[upstreams.NAME]` the copies go to."),
    Key("percent", Integer(0, 100), 100, "How many of every 100 requests on the route each worker copies: "
        "exactly that many, evenly spread, no random draw."),
    Key("max_in_flight", Integer(1), 256, "Copies of this route in progress at once, per worker: while that "
        "many wait for the mirror, a selected request is not copied (counted as skipped), so a stuck mirror "
        "holds at most this many connections."),
), "Request mirroring (shadowing), e.g. `mirror = { upstream = \"staging\", percent = 10 }`: a copy of each "
   "selected request, its head as sent upstream (same `X-Request-ID`) and its body, goes to the mirror "
   "upstream as the proxy's own request; the answer is dropped. A slow or failing mirror never delays or "
   "fails the client's request: a copy whose unsent body reaches 1 MiB is abandoned. Counted in "
   "`fastproxy_mirror_requests_total` (see mirror.md). Only on a route with `upstream`.")


def compile_mirror(config, values: dict) -> Optional[Mirror]:
    if any(key.name not in values for key in SECTION.keys):
        return None  # already reported
    return config(**values)
