"""A replica's resident memory, now and at its peak (Linux /proc), for load tests and operators."""
from __future__ import annotations

import resource


def replica_memory(reset_peak: bool = False) -> dict:
    """{"rss_mb", "peak_rss_mb"} of this process; `reset_peak` starts a new peak from now (Linux:
    /proc/self/clear_refs), so a test can measure the peak of what it sends alone."""
    fields = {}
    try:
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024
    except OSError:  # not Linux: the peak since the process started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fields = {"VmRSS": peak, "VmHWM": peak}
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}
