"""The peak RSS of this process since it started, for the tests that cap a fresh interpreter's
memory. `SOURCE` is the function's text, for the ``python -c`` children that cannot import it."""

from __future__ import annotations

import inspect


def peak_rss_mib() -> float:
    """VmHWM, the peak of this process's own memory map; ru_maxrss would also count what the
    parent held when it forked the process (a pytest worker grown to gigabytes)."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


SOURCE = inspect.getsource(peak_rss_mib)
