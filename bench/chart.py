"""The benchmark's chart: p50 and p99 per path, log scale."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import LABELS  # noqa: E402


def draw(result, path: str) -> None:
    rows = [(label.strip(), result["latency_ms"][key]) for key, label in LABELS
            if result["latency_ms"].get(key, {}).get("n")]
    rows.reverse()
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["p99"] for _, r in rows], height=0.4, label="p99", color="#f4a261")
    ax.barh([i - 0.2 for i in y], [r["p50"] for _, r in rows], height=0.4, label="p50", color="#2a9d8f")
    ax.set_yticks(list(y))
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    s = result["shape"]
    ax.set_title(f"crm bench: {s['meetings']:,} meetings, {s['users']:,} users, email ∩ open, 20 per page",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
