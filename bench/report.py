"""Ratios, targets and the terminal table of a benchmark result."""
from __future__ import annotations

LABELS = [
    ("redis_ping", "Redis PING (the floor)"),
    ("crm_warm_script_page1", "crm-insight warm, script only, page 1"),
    ("crm_warm_page1", "crm-insight warm (precomputed), page 1"),
    ("crm_warm_page50", "crm-insight warm (precomputed), page 50"),
    ("crm_index_page1", "crm-insight index (cold), page 1"),
    ("crm_index_page50", "crm-insight index (cold), page 50"),
    ("crm_index_2000_clients_page1", "crm-insight index, 2,000-client user"),
    ("crm_database_page1", "crm-insight database fallback, page 1"),
    ("crm_database_page50", "crm-insight database fallback, page 50"),
    ("crm_database_peer_index_page1", "  same, with the SQL peer's index, p1"),
    ("crm_database_peer_index_page50", "  same, with the SQL peer's index, p50"),
    ("sql_join_page1", "SQL join + composite index, page 1"),
    ("sql_join_page50", "SQL join + composite index, page 50"),
    ("redisearch_page1", "RediSearch 1.2.2, page 1"),
    ("redisearch_page50", "RediSearch 1.2.2, page 50"),
    ("seed_poc_page1", "seed POC Lua, page 1"),
    ("seed_poc_page50", "seed POC Lua, page 50"),
    ("celery_noop_round_trip", "Celery no-op task round trip"),
    ("celery_query_round_trip", "crm.query_meetings round trip"),
]


def _get(result, path, stat):
    return result["latency_ms"].get(path, {}).get(stat)


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def ratios(result) -> tuple[dict, dict]:
    warm50, warm99 = _get(result, "crm_warm_page1", "p50"), _get(result, "crm_warm_page1", "p99")
    r = {
        "seed_poc_over_warm_p50": _ratio(_get(result, "seed_poc_page1", "p50"), warm50),
        "sql_over_warm_p50": _ratio(_get(result, "sql_join_page1", "p50"), warm50),
        "sql_over_warm_p99": _ratio(_get(result, "sql_join_page1", "p99"), warm99),
        "redisearch_over_warm_p50": _ratio(_get(result, "redisearch_page1", "p50"), warm50),
        "warm_script_p50_in_pings": _ratio(_get(result, "crm_warm_script_page1", "p50"), _get(result, "redis_ping", "p50")),
        "warm_p50_in_pings": _ratio(warm50, _get(result, "redis_ping", "p50")),
        "query_task_over_noop_p50": _ratio(_get(result, "celery_query_round_trip", "p50"),
                                           _get(result, "celery_noop_round_trip", "p50")),
        "ingest_over_raw": _ratio(result.get("ingest", {}).get("crm_ingest_rows_per_s"),
                                  result.get("ingest", {}).get("raw_executemany_rows_per_s")),
    }
    cold99 = _get(result, "crm_index_2000_clients_page1", "p99")
    index_bytes = result.get("memory", {}).get("index_bytes_per_meeting")

    def at_least(v, target):
        return None if v is None else v >= target

    def at_most(v, target):
        return None if v is None else v <= target
    targets = {
        "warm p50 <= 2 Redis round trips (script)": at_most(r["warm_script_p50_in_pings"], 2),
        "warm p99 <= 2 ms": at_most(warm99, 2),
        ">= 500x the seed POC at p50": at_least(r["seed_poc_over_warm_p50"], 500),
        ">= 20x SQL at p50": at_least(r["sql_over_warm_p50"], 20),
        ">= 50x SQL at p99": at_least(r["sql_over_warm_p99"], 50),
        ">= 30x RediSearch at p50": at_least(r["redisearch_over_warm_p50"], 30),
        "cold 2,000-client p99 <= 50 ms": at_most(cold99, 50),
        "query task p50 <= 1.25x no-op task": at_most(r["query_task_over_noop_p50"], 1.25),
        "ingestion >= 0.5x raw executemany": at_least(r["ingest_over_raw"], 0.5),
        "index <= 40 B per meeting": at_most(index_bytes, 40),
    }
    e = result.get("email")
    if e:
        targets["email ingestion >= 0.2x stdlib header parse"] = at_least(e.get("ratio_to_stdlib"), 0.2)
        targets["email ingestion >= 20x notmuch"] = at_least(e.get("ratio_to_notmuch"), 20)
    reports = result.get("reports", {}).get("2000_clients")
    if reports:
        names = [k for k, v in reports.items() if isinstance(v, dict) and "cached_p50_ms" in v]
        targets["each report p50 <= 50 ms (2,000-client user)"] = all(reports[n]["p50_ms"] <= 50 for n in names)
        targets["activity >= 10x naive SQL (2,000-client user)"] = at_least(
            reports["activity"].get("naive_over_rollup"), 10)
        targets["activity, last 90 days, >= 10x naive SQL"] = at_least(
            reports.get("activity_90_days", {}).get("naive_over_rollup"), 10)
        targets["cached report <= 3 Redis round trips"] = all(reports[n]["cached_round_trips"] <= 3 for n in names)
    streaming = result.get("streaming", {}).get("users")
    if streaming:
        big, fifty = streaming.get("2000_clients", {}), streaming.get("50_clients", {})
        targets["streaming: query_threads p99 <= 50 ms (2,000-client user, computed)"] = at_most(
            big.get("query_threads", {}).get("p99_ms"), 50)
        targets["streaming: query_threads p99 <= 10 ms (50-client user, computed)"] = at_most(
            fifty.get("query_threads", {}).get("p99_ms"), 10)
        targets["streaming: query_threads p99 <= 10 ms (50-client user, served: the cached page while current)"] = \
            at_most(fifty.get("query_threads_served", {}).get("p99_ms"), 10)
        targets["streaming: each report p50 <= 150 ms (2,000-client user, computed)"] = all(
            v <= 150 for v in big.get("reports_p50_ms", {}).values())
        targets["streaming: each report p50 <= 20 ms (50-client user, computed)"] = all(
            v <= 20 for v in fifty.get("reports_p50_ms", {}).values())
        targets["streaming: cache hit rate >= 95% (50-client user, stream into other clients)"] = at_least(
            fifty.get("cache_hit_rate"), 0.95)
        targets["streaming: every answer exact after the stream"] = not any(result["streaming"]["exact"].values())
    threads = result.get("threads", {}).get("2000_clients")
    if threads:
        targets["query_threads and search_contacts cold p99 <= 50 ms (2,000-client user)"] = all(
            f["p99_ms"] <= 50 for f in threads.values())
    return r, targets


def table(result) -> str:
    lines = []
    s = result["shape"]
    lines.append(f"crm bench: {s['meetings']:,} meetings, {s['clients']:,} clients, {s['users']:,} users; "
                 f"{result['machine']['cores']} cores, {result['machine']['cpu']}")
    lines.append("")
    lines.append(f"| {'path':<42} | {'p50 ms':>9} | {'p95 ms':>9} | {'p99 ms':>9} | {'n':>5} |")
    lines.append(f"|{'-' * 44}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 7}|")
    for key, label in LABELS:
        v = result["latency_ms"].get(key)
        if v and v.get("n"):
            lines.append(f"| {label:<42} | {v['p50']:>9.3f} | {v['p95']:>9.3f} | {v['p99']:>9.3f} | {v['n']:>5} |")
    lines.append("")
    for name, value in result.get("ratios", {}).items():
        lines.append(f"{name:<34} {value}")
    if "ingest" in result:
        i = result["ingest"]
        lines.append(f"ingestion: crm.ingest_meetings {i['crm_ingest_rows_per_s']:,} rows/s vs raw executemany "
                     f"{i['raw_executemany_rows_per_s']:,} rows/s")
    if "memory" in result:
        m = result["memory"]
        lines.append(f"memory per meeting: index {m['index_bytes_per_meeting']} B, payload "
                     f"{m['payload_bytes_per_meeting']} B, precomputed entry {m['precomputed_bytes_per_entry']} B; "
                     f"seed layout sets {m['seed_sets_bytes_per_meeting']} B + hash {m['seed_hash_bytes_per_meeting']} B")
    if "celery_throughput_per_s" in result:
        t = result["celery_throughput_per_s"]
        lines.append(f"Celery throughput: no-op {t['noop']}/s, query {t['query']}/s")
    if "precompute" in result:
        p = result["precompute"]
        lines.append(f"precompute: 2,000-client user p50 {p['user_2000_clients_ms'].get('p50')} ms; "
                     f"all {p['active_users_refreshed']} active users {p['active_all_users_s']} s")
    if "email" in result:
        e = result["email"]
        lines.append(f"email: {e['messages']:,} messages ({e['deliveries']:,} deliveries) through crm.ingest_emails "
                     f"{e['worker_messages_per_s']:,}/s; stdlib header parse {e['stdlib_header_parse_per_s']:,}/s "
                     f"(x{e['ratio_to_stdlib']}); notmuch {e.get('notmuch_messages_per_s', 'n/a')}/s "
                     f"(x{e.get('ratio_to_notmuch', 'n/a')}); per email: index {e['index_bytes_per_email']} B, "
                     f"payload {e['payload_bytes_per_email']} B")
    for who, figures in result.get("reports", {}).items():
        if not isinstance(figures, dict):
            continue
        lines.append(f"reports, {who.replace('_', ' ')} user ({figures['clients']} clients): " + "; ".join(
            f"{name} {f['p50_ms']} ms" + (f" / cached {f['cached_p50_ms']} ms ({f['cached_round_trips']} trips)"
                                          if "cached_p50_ms" in f else "")
            + (f" / naive SQL {f['naive_sql_p50_ms']} ms" if "naive_sql_p50_ms" in f else "")
            for name, f in figures.items() if isinstance(f, dict)))
    for who, figures in result.get("threads", {}).items():
        lines.append(f"threads and contacts, {who.replace('_', ' ')} user: " + "; ".join(
            f"{name} p50 {f['p50_ms']} / p99 {f['p99_ms']} ms ({f['total']} found)" for name, f in figures.items()))
    s = result.get("streaming")
    if s:
        lines.append(f"while streaming ({s['stream']['items_per_s']} meetings and emails/s, "
                     f"{s['stream']['access_changes']} access changes, {s['stream']['failed']} failed tasks):")
        for who, f in s["users"].items():
            served = f.get("query_threads_served", {})
            lines.append(f"  {who.replace('_', ' ')} user: query_threads computed p50 {f['query_threads']['p50_ms']} / "
                         f"p99 {f['query_threads']['p99_ms']} ms, served p50 {served.get('p50_ms')} / p99 "
                         f"{served.get('p99_ms')} ms; reports p50 " + ", ".join(
                             f"{n} {v} ms" for n, v in f["reports_p50_ms"].items())
                         + f"; cache hit rate {f['cache_hit_rate']} of {f['reports_asked']} asked")
        lines.append("  exact after the stream: " + ", ".join(
            f"{who} {'yes' if not m else '; '.join(m)}" for who, m in s["exact"].items()))
    lines.append("")
    for name, met in result.get("targets", {}).items():
        lines.append(f"[{'met' if met else 'MISSED' if met is False else 'n/a'}] {name}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
