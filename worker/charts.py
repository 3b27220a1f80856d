"""``crm report --png``: the chart a manager would rather look at than read (matplotlib,
the ``charts`` extra)."""
from __future__ import annotations

import collections

CHARTS = ("activity", "response_times", "workload", "going_cold")


def draw(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, rows = result["name"], result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if name == "activity":
        by_type = collections.defaultdict(collections.Counter)
        for row in rows:
            by_type[row["type"]][row["bucket"]] += row["count"]
        buckets = sorted({row["bucket"] for row in rows})
        bottom = [0] * len(buckets)
        for type_ in sorted(by_type):
            heights = [by_type[type_][b] for b in buckets]
            ax.bar(buckets, heights, bottom=bottom, label=type_)
            bottom = [a + b for a, b in zip(bottom, heights)]
        ax.set_ylabel("meetings")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        title = "Activity per " + ("week" if buckets and len(buckets[0]) == 10 else "month") + ", by type"
    elif name == "response_times":
        row = rows[0]
        labels = list(row["histogram"])
        ax.bar(labels, [row["histogram"][k] for k in labels], color="#2a9d8f")
        ax.set_ylabel("replies")
        median = "n/a" if row["median_s"] is None else f"{row['median_s'] / 3600:.1f} h"
        share = "n/a" if row["within_1h_share"] is None else f"{row['within_1h_share']:.0%}"
        title = (f"Response times: {row['answered']} replies in {row['threads']} threads; "
                 f"median {median}, within 1 h {share}")
    elif name == "workload":
        users = [str(row["user_id"]) for row in rows]
        x = range(len(users))
        for offset, field, color in ((-0.27, "received", "#264653"), (0, "sent", "#2a9d8f"),
                                     (0.27, "awaiting", "#e76f51")):
            ax.bar([i + offset for i in x], [row[field] for row in rows], width=0.27, label=field, color=color)
        ax.set_xticks(list(x))
        ax.set_xticklabels(users, fontsize=7)
        ax.set_xlabel("mailbox user")
        ax.legend(fontsize=8)
        title = "Workload per mailbox"
    elif name == "going_cold":
        rows = rows[:30]
        clients = [str(row["client_id"]) for row in rows][::-1]
        ax.barh(clients, [row["silence_s"] / 86400 for row in rows][::-1], color="#e76f51", label="silence")
        ax.barh(clients, [2 * row["median_gap_s"] / 86400 for row in rows][::-1], color="#264653", height=0.4,
                label="twice the usual gap")
        ax.set_xlabel("days")
        ax.legend(fontsize=8)
        title = "Clients going cold (coldest first)"
    else:
        plt.close(fig)
        raise ValueError(f"no chart for {name}; charts exist for {', '.join(CHARTS)}")
    ax.set_title(f"{title}\n(as seen by the user; generated {result['generated_at']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
