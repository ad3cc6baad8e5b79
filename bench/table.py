#!/usr/bin/env python3
"""Prints the markdown table of bench/run.sh results, or the gnuplot data of the direct steps.

    table.py RESULTS_DIR                 one markdown table of every <workload>.json
    table.py --plot-data RESULTS_DIR     offered rate, p50, p99, p99.9 (ms) of direct and
                                         direct-normal, as two gnuplot data blocks
    table.py --plot-idle RESULTS_DIR     connections, server RSS (MiB) of the idle ramp
    table.py --plot-fanout RESULTS_DIR   deliveries/s, p50, p99 (ms) of the fanout steps
    table.py --merge-connect OUT RAW...  one connect result from several generator processes
    table.py --merge-history OUT GEN STORE PROTOCOL PROTOCOL10 CLIENT
                                         one history result from its five chat-bench runs
    table.py --record RAW OUT KEY=VALUE...
                                         writes chat-bench's JSON object RAW to OUT with the
                                         run's context added; exits 1 if RAW is not an object
"""
import json
import os
import sys

ORDER = ["floor", "latency", "direct", "direct-normal", "idle", "sync", "connect", "connect-split",
         "connect-wss", "storm", "storm-groups", "fanout", "fanout-receipts", "channel", "history",
         "client"]
TARGETS = {
    "floor": "(floor, no target)",
    "latency": "p99 < 5 ms at 5,000 msg/s",
    "direct": ">= 50,000 msg/s at p99 < 50 ms; <= 20 us CPU/msg",
    "direct-normal": "(NORMAL beside FULL)",
    "idle": "<= 2 KB user space per connection",
    "sync": "< 200 ms for 10,000 messages in 100 conversations",
    "connect": ">= 10,000 handshakes/s (ws)",
    "connect-split": ">= 10,000 handshakes/s (ws)",
    "storm": "10,000 clients: < 10 s, 0 lost",
    "storm-groups": "(storm beside storm: group members catching up together; no target)",
    "connect-wss": "(wss beside ws; no target)",
    "fanout": ">= 500,000 deliveries/s at p99 < 100 ms",
    "fanout-receipts": "(fanout with every delivery reported by a Receipt, as the SDK does; no target)",
    "channel": "no per-member work for offline members",
    "history": "newest-50 page p99 < 1 ms server; < 0.2 ms client cache",
    "client": ">= 20,000 sends/s",
}


def lat(h):
    return "p50 %.0f / p99 %.0f / p99.9 %.0f / max %.0f us (n=%d)" % (
        h["p50_us"], h["p99_us"], h["p999_us"], h["max_us"], h["n"])


def thread_split(r):
    """chatd's CPU per message by thread at the highest step held (results since the threads
    are named: chatd = the event loop), or ""."""
    # The held step at that rate (a rate may be repeated): the one whose CPU was reported.
    steps = [s for s in r.get("steps", [])
             if s["offered_rate"] == r.get("max_rate_p99_under_limit")
             and s.get("server_cpu_us_per_msg") == r.get("server_cpu_us_per_msg_at_max")]
    step = steps[-1] if steps else {}
    threads = step.get("server_threads_cpu_s")
    if not threads or "chatd" not in threads or not step.get("sent"):
        return ""

    def per(name):
        return threads.get(name, 0.0) * 1e6 / step["sent"]
    return ": loop %.1f, writer %.1f, checkpoint %.1f, readers %.1f" % (
        per("chatd"), per("chat-writer"), per("chat-checkpoint"), per("chat-reader"))


def headline(r):
    w = r["workload"]
    if "per_process" in r:
        w = "connect"
    if w == "floor":
        out = "TCP round trip " + lat(r["round_trip"])
        if "append_fdatasync" in r:
            out += "; 12 KiB append + fdatasync " + lat(r["append_fdatasync"])
        return out
    if w == "latency":
        s = r.get("step", {})
        return "%.0f msg/s offered, %d pairs: ack %s; deliver %s" % (
            s.get("offered_rate", 0), r.get("pairs", 0), lat(r["send_to_ack"]),
            lat(r["send_to_deliver"]))
    if w == "direct":
        steps = ", ".join("%.0f/s: p99 %.1f ms, %.1f us CPU/msg" % (
            s["offered_rate"], s["send_to_deliver"]["p99_us"] / 1000.0,
            s["server_cpu_us_per_msg"]) for s in r["steps"])
        return "max %.0f msg/s with p99 < %.0f ms (%.1f us CPU/msg there%s); steps: %s" % (
            r["max_rate_p99_under_limit"], r["p99_limit_ms"],
            r["server_cpu_us_per_msg_at_max"], thread_split(r), steps)
    if w == "idle":
        connected = r.get("server_rss_bytes_per_conn_connected")
        return "%d conns: server RSS %.0f B/conn%s%s; slab %.0f B/conn (both ends + client)" % (
            r["connections"], r["server_rss_bytes_per_conn"],
            "" if "hold_s" not in r else " after %gs idle" % r["hold_s"],
            "" if connected is None else " (%.0f B/conn right after connecting)" % connected,
            r["slab_bytes_per_conn_both_ends"])
    if w == "sync":
        return "%d msgs in %d convs: reconnect -> synced %.1f ms (welcome -> synced %.1f ms, %d pages)" % (
            r["messages"], r["conversations"], r.get("reconnect_to_synced_ms", -1),
            r.get("welcome_to_synced_ms", -1), r.get("sync_pages", 0))
    if w == "connect":
        return "%d conns from %d process(es): %.0f handshakes/s (%.0f us server CPU each); connect -> welcome %s" % (
            r["connections"], r.get("processes", 1), r["handshakes_per_s"],
            r.get("server_cpu_us_per_handshake", -1),
            lat(r["connect_to_welcome"]))
    if w == "fanout":
        receipts = ""
        if r.get("receipts_ms"):
            receipts = ", each reporting its deliveries by Receipt every %d ms" % r["receipts_ms"]
        return ("%d groups x %d online members%s: max %.0f deliveries/s with p99 < %.0f ms "
                "(%.0f msg/s, %.1f us server CPU/msg); steps: %s") % (
            r["groups"], r["members_per_group"], receipts,
            r["max_deliveries_per_s_p99_under_limit"],
            r["p99_limit_ms"], r["max_messages_per_s_p99_under_limit"],
            r["server_cpu_us_per_msg_at_max"], steps_text(r)) + settle_text(r)
    if w == "channel":
        return ("%d members (%d viewers subscribed): server RSS %+.0f B per offline member "
                "(%d -> %d KB, added at %.0f/s); max %.0f posts/s (%.0f deliveries/s) with "
                "p99 < %.0f ms (%.1f us server CPU/post); steps: %s") % (
            r["members"], r["viewers"], r["server_rss_bytes_per_offline_member"],
            r["server_rss_before_members_kb"], r["server_rss_after_members_kb"],
            r["add_members_per_s"], r["max_posts_per_s_p99_under_limit"],
            r["max_deliveries_per_s_p99_under_limit"], r["p99_limit_ms"],
            r["server_cpu_us_per_post_at_max"], steps_text(r)) + settle_text(r)
    if w == "history":
        g, st, p, c = r["gen"], r["store"], r["protocol"], r["client"]
        p10 = r.get("protocol_10", {})
        return ("%s messages in %s conversations (%s); newest-%d page: store call, file in the "
                "page cache %s (CPU %s), file evicted first %s; through chatd, one request at a "
                "time %s, 10 in flight %s; client cache %s") % (
            r.get("messages", "?"), r.get("conversations", "?"),
            "cached store" if g.get("cached") else "generated in %.0f s, %.0f CPU-s" % (
                g.get("seconds", -1), g.get("generator_cpu_s", -1)),
            st["page"], lat(st["history_call"]), lat(st["history_call_cpu"]),
            lat(st["history_call_cold"]), lat(p["request_to_page"]),
            lat(p10["request_to_page"]) if "request_to_page" in p10 else "-",
            lat(c["cached_history_call"]))
    if w == "client":
        return ("Send() into the outbox (server %s): %.0f sends/s, call %s; outbox drained in "
                "%.1f s; cached newest-%d page %s") % (
            r["server"], r["sends_per_s"], lat(r["send_call"]), r["connect_and_drain_s"],
            r["page"], lat(r["cached_history_call"]))
    if w == "storm-groups":
        return ("%d groups x %d members, %d messages per group while the members were offline: "
                "reconnect -> all synced %.0f ms (server CPU %.2f s, %d messages synced)") % (
            r["groups"], r["members_per_group"], r["messages_per_group"],
            r.get("reconnect_to_all_synced_ms", -1), r.get("server_cpu_s_reconnect", -1),
            r.get("synced_messages", -1))
    if w == "storm":
        return "%d clients: reconnect -> all synced %.0f ms (server CPU %.1f s); server peak RSS %d KB" % (
            r["connections"], r.get("reconnect_to_all_synced_ms", -1),
            r.get("server_cpu_s_reconnect", -1), r["server_peak_rss_kb"])
    return ""


def settle_text(r):
    if "settled" not in r:
        return ""
    state = "everything arrived" if r["settled"] else "NOT everything arrived"
    return "; after the last step %s within %.1f s" % (state, r["settle_s"])


def steps_text(r):
    return ", ".join("%.0f/s: %.0f deliveries/s, p99 %.1f ms%s%s" % (
        s["offered_rate"], s["delivered_per_s"], s["send_to_deliver"]["p99_us"] / 1000.0,
        receipts_text(s), generator_text(s))
        for s in r["steps"])


def receipts_text(s):
    """A fanout step whose members sent receipts: how many, and the updates they caused."""
    if "receipts_sent" not in s:
        return ""
    return " (%d receipts, %d ReceiptUpdates to other members)" % (
        s["receipts_sent"], s["receipt_updates_received"])


def generator_text(s):
    """Why a step says more about chat-bench than about the server, if it does."""
    notes = []
    if s.get("generator_behind"):
        notes.append("generator behind schedule: sent in %.1f s" % s["send_s"])
    if s.get("generator_saturated"):
        notes.append("generator saturated: %.1f CPU-s in %.1f s" % (s["generator_cpu_s"], s["wall_s"]))
    return " (%s)" % "; ".join(notes) if notes else ""


def load(directory):
    results = {}
    for name in ORDER:
        path = os.path.join(directory, name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                try:
                    results[name] = json.load(f)
                except ValueError:
                    print("(%s is not valid JSON)" % path)
    return results


def table(directory):
    results = load(directory)
    if not results:
        print("(no results in %s)" % directory)
        return
    any_result = next(iter(results.values()))
    print()
    print("Build %s, commit %s, nproc %d, kernel %s; %s; chatd allocates with %s." % (
        any_result["build_type"], any_result["git_commit"], any_result["nproc"],
        any_result["kernel"], any_result["pinning"],
        any_result.get("server_allocator", "glibc malloc")))
    print("Load average (1/5/15 min) after each workload: %s." % ", ".join(
        "%s %s" % (name, r.get("loadavg_after", "?")) for name, r in results.items()))
    print()
    print("| workload | durability | measured | target | lost / dup / reordered | gen CPU s | ok |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        try:
            text = headline(r)
        except (KeyError, TypeError) as e:
            text = "(incomplete: missing %s)" % e
        print("| %s | %s | %s | %s | %s / %s / %s | %.2f | %s |" % (
            name, r.get("durability", ""), text, TARGETS.get(name, ""), r.get("lost", "?"),
            r.get("duplicated", "?"), r.get("reordered", "?"), r.get("generator_cpu_s", 0),
            "yes" if r.get("exit_code") == 0 else "NO"))
    print()


def plot_data(directory):
    results = load(directory)
    for name in ["direct", "direct-normal"]:
        print("# %s: offered p50_ms p99_ms p999_ms" % name)
        for s in results.get(name, {}).get("steps", []):
            d = s["send_to_deliver"]
            print("%.0f %.3f %.3f %.3f" % (s["offered_rate"], d["p50_us"] / 1000.0,
                                           d["p99_us"] / 1000.0, d["p999_us"] / 1000.0))
        print()
        print()


def plot_idle(directory):
    print("# idle: connections server_rss_mib")
    for n, kb in load(directory).get("idle", {}).get("rss_curve", []):
        print("%d %.2f" % (n, kb / 1024.0))


def plot_fanout(directory):
    print("# fanout: deliveries_per_s p50_ms p99_ms")
    for s in load(directory).get("fanout", {}).get("steps", []):
        d = s["send_to_deliver"]
        print("%.0f %.3f %.3f" % (s["delivered_per_s"], d["p50_us"] / 1000.0, d["p99_us"] / 1000.0))


def merge_history(out, gen, store, protocol, protocol_10, client):
    """One history result from the generation, store, protocol (one request in flight, then ten)
    and client-cache runs."""
    parts = {}
    for name, raw in (("gen", gen), ("store", store), ("protocol", protocol),
                      ("protocol_10", protocol_10), ("client", client)):
        try:
            with open(raw) as f:
                parts[name] = json.load(f)
        except (OSError, ValueError):
            parts[name] = {}
    store_part = parts["store"]
    merged = {"workload": "history"}
    merged.update(parts)
    merged["conversations"] = store_part.get("conversations", 0)
    merged["messages_per_conversation"] = store_part.get("messages_per_conversation", 0)
    merged["messages"] = merged["conversations"] * merged["messages_per_conversation"]
    runs = [parts[k] for k in ("store", "protocol", "protocol_10", "client")]
    if not parts["gen"].get("cached"):
        runs.append(parts["gen"])
    merged["completed"] = all(p.get("completed", False) for p in runs)
    for key in ("expected", "lost", "duplicated", "reordered"):
        merged[key] = sum(p.get(key, 0) for p in runs)
    merged["generator_cpu_s"] = sum(p.get("generator_cpu_s", 0) for p in runs)
    for key in ("server_rss_kb", "server_peak_rss_kb"):
        merged[key] = parts["protocol"].get(key, -1)
    with open(out, "w") as f:
        json.dump(merged, f)
    return 0


def merge_connect(out, raws):
    """One connect result from several generator processes that ran at the same time."""
    parts = []
    for raw in raws:
        try:
            with open(raw) as f:
                parts.append(json.load(f))
        except (OSError, ValueError):
            return 1
    total = sum(p["connections"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    server_cpu = max(p["server_cpu_s"] for p in parts)
    merged = {
        "workload": "connect",
        "processes": len(parts),
        "connections": total,
        "max_connecting": sum(p["max_connecting"] for p in parts),
        "seconds": seconds,
        "handshakes_per_s": total / seconds,
        # Each process measured the server over its own, overlapping interval: the largest
        # of them covers the run.
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_handshake": server_cpu * 1e6 / total,
        # Percentiles cannot be merged from summaries: the worst process's, an upper bound.
        "connect_to_welcome": {k: max(p["connect_to_welcome"][k] for p in parts)
                               for k in ("p50_us", "p99_us", "p999_us", "max_us")},
        "per_process": parts,
    }
    merged["connect_to_welcome"]["n"] = sum(p["connect_to_welcome"]["n"] for p in parts)
    merged["completed"] = all(p["completed"] for p in parts)
    for key in ("expected", "lost", "duplicated", "reordered", "connect_failures", "closes"):
        merged[key] = sum(p[key] for p in parts)
    merged["generator_cpu_s"] = sum(p["generator_cpu_s"] for p in parts)
    merged["server_rss_kb"] = max(p["server_rss_kb"] for p in parts)
    merged["server_peak_rss_kb"] = max(p["server_peak_rss_kb"] for p in parts)
    with open(out, "w") as f:
        json.dump(merged, f)
    return 0


def record(raw, out, pairs):
    try:
        with open(raw) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return 1
    if not isinstance(result, dict):
        return 1
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key in ("nproc", "exit_code"):
            result[key] = int(value)
        elif key == "quick":
            result[key] = value == "1"
        else:
            result[key] = value
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--merge-connect":
        sys.exit(merge_connect(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) >= 4 and sys.argv[1] == "--record":
        sys.exit(record(sys.argv[2], sys.argv[3], sys.argv[4:]))
    if len(sys.argv) == 8 and sys.argv[1] == "--merge-history":
        sys.exit(merge_history(*sys.argv[2:]))
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-data":
        plot_data(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--plot-idle":
        plot_idle(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--plot-fanout":
        plot_fanout(sys.argv[2])
    elif len(sys.argv) == 2:
        table(sys.argv[1])
    else:
        sys.exit(__doc__)
