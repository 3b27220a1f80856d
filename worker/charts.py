"""``crm report --png``: the chart a manager would rather look at than read (matplotlib,
the ``charts`` extra).  Each chart says whose view it shows, what it leaves out, and
uses a time axis for time."""
from __future__ import annotations

import collections
import datetime

CHARTS = ("activity", "response_times", "workload", "going_cold")
#: Bars a chart of mailboxes or clients shows at most; the title says how many there are.
TOP = 30
#: Mailboxes the workload chart shows at most (three bars each).
TOP_MAILBOXES = 15


def share(value: float | None) -> str:
    """A share as a percentage that never shows a small share as 0 %."""
    if value is None:
        return "n/a"
    if value == 0 or value >= 0.1:
        return f"{value:.0%}"
    if value < 0.001:
        return "<0.1%"
    return f"{value:.1%}"


def _bucket_date(label: str) -> datetime.date:
    """A bucket label (``2024-06`` for a month, ``2024-06-03`` for a week) as its first day."""
    parts = [int(p) for p in label.split("-")]
    return datetime.date(parts[0], parts[1], parts[2] if len(parts) > 2 else 1)


def draw(result: dict, path: str, user_id: int | None = None) -> str:
    """Draw ``result`` (a ``crm.report`` result) to the PNG ``path``; ``user_id``: whose
    view it is, named in the title.  Returns the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, rows = result["name"], result["rows"]
    if name not in CHARTS:
        raise ValueError(f"no chart for {name}; charts exist for {', '.join(CHARTS)}")
    height = 4.5 if name != "going_cold" else max(4.5, 0.26 * min(len(rows), TOP) + 1.6)
    fig, ax = plt.subplots(figsize=(9, height))
    try:
        title = {"activity": _activity, "response_times": _response_times, "workload": _workload,
                 "going_cold": _going_cold}[name](ax, rows)
        whose = f"what user {user_id} may see" if user_id is not None else "what the user may see"
        title = f"{title}\n({whose}; generated {result['generated_at']})"
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return title
    finally:
        plt.close(fig)


def _activity(ax, rows) -> str:
    import matplotlib.dates as mdates
    from matplotlib.ticker import MaxNLocator
    by_type = collections.defaultdict(collections.Counter)
    for row in rows:
        by_type[row["type"]][row["bucket"]] += row["count"]
    labels = sorted({row["bucket"] for row in rows})
    weekly = bool(labels) and len(labels[0]) == 10
    dates = [_bucket_date(b) for b in labels]
    bottom = [0] * len(labels)
    for type_ in sorted(by_type):
        heights = [by_type[type_][b] for b in labels]
        ax.bar(dates, heights, bottom=bottom, width=6 if weekly else 27, align="edge", label=type_)
        bottom = [a + b for a, b in zip(bottom, heights)]
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    unit = "week" if weekly else "month"
    ax.set_ylabel(f"meetings per {unit}")
    ax.set_xlabel("week (from Monday), UTC" if weekly else "month, UTC")
    if by_type:
        ax.legend(fontsize=8, title="type", title_fontsize=8)
    return f"Activity per {unit}, by type"


def _response_times(ax, rows) -> str:
    from matplotlib.ticker import MaxNLocator
    row = rows[0]
    labels = list(row["histogram"])
    ax.bar(labels, [row["histogram"][k] for k in labels], color="#2a9d8f")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("replies")
    ax.set_xlabel("time from an inbound message to its reply")
    median = "n/a" if row["median_s"] is None else f"{row['median_s'] / 3600:.1f} h"
    return (f"Response times: {row['answered']} replies in {row['threads']} threads; "
            f"median {median}, within 1 h {share(row['within_1h_share'])}")


def _workload(ax, rows) -> str:
    from matplotlib.ticker import MaxNLocator
    shown = sorted(rows, key=lambda r: (-(r["received"] + r["sent"]), r["user_id"]))[:TOP_MAILBOXES]
    x = range(len(shown))
    for offset, field, color in ((-0.27, "received", "#264653"), (0, "sent", "#2a9d8f"),
                                 (0.27, "awaiting", "#e76f51")):
        ax.bar([i + offset for i in x], [row[field] for row in shown], width=0.27, label=field, color=color)
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"user {row['user_id']}" for row in shown], fontsize=8, rotation=30, ha="right")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("messages")
    ax.set_xlabel("mailbox")
    ax.legend(fontsize=8)
    of = f"top {len(shown)} of {len(rows)} mailboxes" if len(rows) > len(shown) else f"{len(rows)} mailboxes"
    return f"Workload per mailbox, busiest first ({of})"


def _going_cold(ax, rows) -> str:
    shown = rows[:TOP]
    clients = [f"client {row['client_id']}" for row in shown][::-1]
    ax.barh(clients, [row["silence_s"] / 86400 for row in shown][::-1], color="#e76f51", label="silence")
    ax.barh(clients, [2 * row["median_gap_s"] / 86400 for row in shown][::-1], color="#264653", height=0.4,
            label="twice the usual gap")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("days")
    ax.legend(fontsize=8, loc="lower right")
    of = f"top {len(shown)} of {len(rows)}" if len(rows) > len(shown) else f"all {len(rows)}"
    return f"Clients going cold, coldest first ({of})"
