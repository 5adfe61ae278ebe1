"""Shared-memory zones: the master maps them before forking; Cython accessors use them.

zones.py is the registry (ZoneSpec, Zone, ZoneSet), metrics.py the metrics zone, layout.py
its offsets, reader.py the /metrics and /status renderers.
"""
from .layout import WORKER_DRAINING, WORKER_RUNNING
from .metrics import MetricsZone, ZoneFull
from .reader import render_prometheus, status
from .zones import METRICS_ZONE, Zone, ZoneSet, ZoneSpec, declared_zones

__all__ = ["ZoneSpec", "Zone", "ZoneSet", "declared_zones", "METRICS_ZONE", "MetricsZone",
           "ZoneFull", "render_prometheus", "status", "WORKER_RUNNING", "WORKER_DRAINING"]
