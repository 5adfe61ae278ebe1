"""The shared-memory region the master maps before forking (layout, master side, reader)."""
from .layout import WORKER_DRAINING, WORKER_RUNNING
from .reader import render_prometheus, status
from .zones import RegionFull, SharedRegion

__all__ = ["SharedRegion", "RegionFull", "render_prometheus", "status",
           "WORKER_RUNNING", "WORKER_DRAINING"]
