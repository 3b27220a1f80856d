"""What every part of the benchmark measures with: progress lines, timed calls, their
percentiles, the machine's description, Redis URLs of other database numbers."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentiles(samples_ns) -> dict:
    ms = sorted(s / 1e6 for s in samples_ns)
    if not ms:
        return {"n": 0}

    def pick(q):
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 4)
    return {"n": len(ms), "p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "mean": round(statistics.mean(ms), 4)}


def timed(fn, calls, seconds: float, label: str) -> list[int]:
    """Time fn(*args) for each args in calls, until done or the time box is over, after
    one untimed pass over the distinct calls (at most a quarter of the time box): every
    path, peers included, is measured warm."""
    start = time.monotonic()
    for args in dict.fromkeys(calls):
        fn(*args)
        if time.monotonic() - start > seconds / 4:
            break
    out = []
    start = time.monotonic()
    for n, args in enumerate(calls):
        t = time.perf_counter_ns()
        fn(*args)
        out.append(time.perf_counter_ns() - t)
        if time.monotonic() - start > seconds and n >= 20:
            break
    say(f"  {label:<34} {len(out):>5} queries  p50 {percentiles(out)['p50']:.3f} ms")
    return out


def machine() -> dict:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:  # not Linux: the CPU goes unnamed
        cpu = "unknown"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def redis_url_db(url: str, db: int) -> str:
    base, _ = url.rsplit("/", 1)
    return f"{base}/{db}"
