"""Facts about this process that /pgesam/status and `pgesam bench` report."""
from __future__ import annotations

import os


def memory_mb() -> dict[str, float]:
    """Resident memory of this process now and at its peak, MB (Linux /proc and getrusage; -1 elsewhere)."""
    now = peak = -1.0
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    except (ImportError, OSError):
        pass
    return {"rss_mb": round(now, 1), "peak_rss_mb": round(peak, 1)}
