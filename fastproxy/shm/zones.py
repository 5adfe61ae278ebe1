"""Zones, master side: named, fixed-size, versioned shared-memory regions.

A feature declares the zones it needs as ZoneSpec(name, size, version, owner) when its config
half compiles (a filter lists them in its `zones` attribute); the core declares the metrics zone.
For each generation the master opens them before forking its workers: a zone of the current
generation is reused when name, size and version all match, and created afresh (and logged)
otherwise. Each zone is its own anonymous MAP_SHARED mapping, so one can be recreated while the
others keep their contents, and the workers of a draining generation keep the mapping they
inherited until they exit, whatever the next generation did to that name.

Workers inherit the mappings at fork and reach them only through Cython accessors built on
fastproxy._core.ZoneAccess (the zone's base address and size, taken from the mapping). When the
master reaps a worker it frees every zone lock that worker held (ZoneSet.release_locks_of).
How to declare and update a zone: docs/extending.md, "Zones".
"""
from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional

from fastproxy._core import ZONE_HEADER_SIZE, ZoneAccess, zone_format

from . import layout

log = logging.getLogger("fastproxy.zones")


@dataclass(frozen=True)
class ZoneSpec:
    """A zone as a feature declares it. `size` is in bytes, the 64-byte header included; it is
    fixed for the zone's life. `version` is the layout version of the zone's records: raise it
    whenever their layout changes, so a reload never hands a zone in the old layout to new code.
    `owner` is the feature that declares it (its filter's name), the only code that uses it."""
    name: str
    size: int
    version: int
    owner: str

    def __post_init__(self):
        if (not self.name or not self.owner or self.size < ZONE_HEADER_SIZE or self.size % layout.WORD
                or self.version < 0):
            raise ValueError(f"bad zone spec {self!r}: needs a name, an owner, a size of at least "
                             f"{ZONE_HEADER_SIZE} bytes in whole words, and a version >= 0")


METRICS_ZONE = ZoneSpec(layout.ZONE_NAME, layout.TOTAL_SIZE, layout.LAYOUT_VERSION, "core")


class Zone:
    """One mapped zone: the master creates it; workers get it (inherited) at fork."""

    def __init__(self, spec: ZoneSpec):
        self.spec = spec
        self.buffer = mmap.mmap(-1, spec.size, flags=mmap.MAP_SHARED)
        zone_format(self.buffer, spec.version)
        self.access = ZoneAccess(self.buffer, spec.version)

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        spec = self.spec
        return f"<Zone {spec.name!r} of {spec.owner}, {spec.size} bytes, version {spec.version}>"


class ZoneSet(Mapping[str, Zone]):
    """The zones of one generation, by name (a read-only mapping)."""

    def __init__(self, zones: Dict[str, Zone]):
        self._zones = zones

    @classmethod
    def open(cls, specs: Iterable[ZoneSpec], previous: Optional["ZoneSet"] = None) -> "ZoneSet":
        """The zones for a new generation: those of `previous` (the current generation) whose
        spec matches are reused, the others created. Raises ValueError if two specs give one
        name a different size, version or owner, OSError if a mapping cannot be made."""
        wanted: Dict[str, ZoneSpec] = {}
        for spec in specs:
            if wanted.setdefault(spec.name, spec) != spec:
                raise ValueError(f"zone {spec.name!r} is declared twice, differently: "
                                 f"{wanted[spec.name]} and {spec}")
        zones = {}
        for name, spec in wanted.items():
            old = previous.get(name) if previous is not None else None
            if old is not None and old.spec == spec:
                zones[name] = old
                continue
            zones[name] = Zone(spec)
            if old is None:
                log.info("zone %r of %s created: %d bytes, layout version %d",
                         name, spec.owner, spec.size, spec.version)
            else:
                log.warning("zone %r of %s recreated empty: %d bytes, layout version %d (was %d "
                            "bytes, version %d, of %s)", name, spec.owner, spec.size, spec.version,
                            old.spec.size, old.spec.version, old.spec.owner)
        return cls(zones)

    def release_locks_of(self, pid: int) -> List[str]:
        """Free the zone locks a reaped process held; returns those zones' names."""
        return [name for name, zone in self._zones.items() if zone.access.force_unlock(pid)]

    def __getitem__(self, name: str) -> Zone:
        return self._zones[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._zones)

    def __len__(self) -> int:
        return len(self._zones)


def declared_zones(runtime) -> List[ZoneSpec]:
    """Every zone a runtime needs: the metrics zone, then each filter's, in route order."""
    specs = [METRICS_ZONE]
    for route in runtime.routes:
        for phase in route.phases:
            for flt in phase:
                specs.extend(getattr(flt, "zones", ()))
    return specs

