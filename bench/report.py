"""Turns bench/run's raw results (round, scenario, target, metric, value) into the markdown
report (medians over rounds, ratios vs direct and vs HAProxy, proxy CPU) and the chart data.

Usage: report.py RAW.tsv META OUT.md OUT.dat   (standard library only)
"""

import math
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "fulcrum", "haproxy", "nginx"]
PROXIES = ["fulcrum", "haproxy", "nginx"]

# scenario, metric, row label, short chart label, unit, higher is better
ROWS = [
    ("bulk1", "gbps", "bulk TCP, 1 stream (iperf3)", "bulk 1", "Gbit/s", True),
    ("bulk8", "gbps", "bulk TCP, 8 streams (iperf3)", "bulk 8", "Gbit/s", True),
    ("tls_bulk", "gbps", "bulk into mTLS listener, 1 connection", "mTLS bulk", "Gbit/s", True),
    ("keepalive", "rps", "keep-alive HTTP, 64 connections", "keep-alive", "req/s", True),
    ("keepalive", "p50_ms", "keep-alive HTTP, p50 latency", "ka p50", "ms", False),
    ("keepalive", "p99_ms", "keep-alive HTTP, p99 latency", "ka p99", "ms", False),
    ("close", "rps", "new connection per request", "new conn", "conn/s", True),
    ("close", "p99_ms", "new connection per request, p99", "new conn p99", "ms", False),
    ("handshakes", "hs_per_sec", "full mTLS handshakes + 1-byte echo", "mTLS hs", "/s", True),
    ("handshakes", "cpu_us_per_hs", "CPU per mTLS handshake (server side)", "CPU/hs", "us", False),
    ("rss_plain", "kb_per_conn", "RSS per idle proxied connection, plain", "RSS plain", "kB", False),
    ("rss_tls", "kb_per_conn", "RSS per idle proxied connection, mTLS", "RSS mTLS", "kB", False),
]

# scenario, metric, label, unit of (metric per CPU-second)
EFFICIENCY_ROWS = [
    ("bulk1", "gbps", "bulk TCP, 1 stream", "Gbit/s"),
    ("bulk8", "gbps", "bulk TCP, 8 streams", "Gbit/s"),
    ("tls_bulk", "gbps", "bulk into mTLS listener", "Gbit/s"),
    ("keepalive", "rps", "keep-alive HTTP", "req/s"),
    ("close", "rps", "new connection per request", "conn/s"),
    ("handshakes", "hs_per_sec", "mTLS handshakes + echo", "/s"),
]

CPU_ROWS = [
    ("bulk1", "bulk TCP, 1 stream"),
    ("bulk8", "bulk TCP, 8 streams"),
    ("tls_bulk", "bulk into mTLS listener"),
    ("keepalive", "keep-alive HTTP"),
    ("close", "new connection per request"),
    ("handshakes", "mTLS handshakes"),
]


def fmt(value, unit):
    if value is None or math.isnan(value):
        return "–"
    if unit in ("req/s", "conn/s"):
        return f"{value / 1000:.1f} k"
    if unit == "Gbit/s":
        return f"{value:.2f}"
    if unit == "ms":
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    if unit == "kB":
        return f"{value:.2f}"
    return f"{value:.0f}"


def ratio(a, b):
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{a / b:.2f}"


def main(raw, meta_path, out_md, out_dat):
    values = defaultdict(list)
    notes = []
    for line in open(raw):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5:
            continue
        rnd, scenario, target, metric, value = parts
        try:
            values[(scenario, target, metric)].append(float(value))
        except ValueError:
            notes.append(f"round {rnd}, {scenario}, {target}: {metric} {value}")
        if metric in ("failed", "wrk_errors"):
            notes.append(f"round {rnd}, {scenario}, {target}: {metric} {value}")

    def med(scenario, target, metric):
        v = [x for x in values.get((scenario, target, metric), []) if not math.isnan(x)]
        return statistics.median(v) if v else None

    meta = dict(l.rstrip("\n").split("=", 1) for l in open(meta_path) if "=" in l)
    out = []
    out.append(f"Medians over {meta.get('rounds')} round(s) of {meta.get('duration')} s per "
               f"measurement; {meta.get('pinned')}. Ratios are value / reference, so for "
               "latency, CPU and RSS (lower is better) a ratio below 1 is the better one.")
    out.append("")
    out.append("| scenario | unit | direct | fulcrum | HAProxy | nginx | fulcrum / direct "
               "| fulcrum / HAProxy | nginx / HAProxy | HAProxy / direct |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    chart = []
    for scenario, metric, label, short, unit, higher in ROWS:
        m = {t: med(scenario, t, metric) for t in TARGETS}
        if all(v is None for v in m.values()):
            continue
        arrow = "↑" if higher else "↓"
        out.append(f"| {label} | {unit} {arrow} | " + " | ".join(fmt(m[t], unit) for t in TARGETS)
                   + f" | {ratio(m['fulcrum'], m['direct'])} | {ratio(m['fulcrum'], m['haproxy'])}"
                   + f" | {ratio(m['nginx'], m['haproxy'])} | {ratio(m['haproxy'], m['direct'])} |")
        h = m["haproxy"]
        if h:
            # Chart: how many times better than HAProxy (> 1 is better), whatever the direction.
            def better(v):
                if v is None or v == 0:
                    return "NaN"
                return f"{(v / h) if higher else (h / v):.3f}"
            chart.append(f'"{short}" ' + " ".join(better(m[t]) for t in ["direct", "fulcrum", "nginx"]))
    out.append("")
    out.append("Proxy CPU use during each measurement (% of one core; for `direct`, the mTLS echo "
               "server's during handshakes):")
    out.append("")
    out.append("| scenario | direct | fulcrum | HAProxy | nginx |")
    out.append("|---|---:|---:|---:|---:|")
    for scenario, label in CPU_ROWS:
        m = {t: med(scenario, t, "cpu_pct") for t in TARGETS}
        if all(m[t] is None for t in PROXIES):
            continue
        if scenario != "handshakes":
            m["direct"] = None
        out.append(f"| {label} | " + " | ".join("–" if m[t] is None else f"{m[t]:.0f} %" for t in TARGETS) + " |")
    client = [(s, l) for s, l in CPU_ROWS if any(med(s, t, "client_cpu_pct") is not None for t in TARGETS)]
    if client:
        out.append("")
        out.append("The load tool's own CPU use (% of one core; it shares CPU 1 with the backends, so "
                   "near 100 % means the client side, not the proxy, set the pace):")
        out.append("")
        out.append("| scenario | direct | fulcrum | HAProxy | nginx |")
        out.append("|---|---:|---:|---:|---:|")
        for scenario, label in client:
            m = {t: med(scenario, t, "client_cpu_pct") for t in TARGETS}
            out.append(f"| {label} | " + " | ".join("–" if m[t] is None else f"{m[t]:.0f} %" for t in TARGETS) + " |")
    # Work per CPU-second of the proxy, per round, then the median: on a shared machine a proxy
    # that is descheduled does less work but also burns less CPU, so this moves far less than
    # the raw rates when other processes compete for CPU 0.
    eff = []
    for scenario, metric, label, unit in EFFICIENCY_ROWS:
        m = {}
        for t in PROXIES:
            work = values.get((scenario, t, metric), [])
            cpu = values.get((scenario, t, "cpu_pct"), [])
            per = [w / (c / 100) for w, c in zip(work, cpu) if c > 0 and not math.isnan(w)]
            m[t] = statistics.median(per) if per else None
        if any(v is not None for v in m.values()):
            eff.append((label, unit, m))
    if eff:
        out.append("")
        out.append("Work per CPU-second of the proxy (median over rounds of value / CPU; less "
                   "sensitive than the rates above to other load on the machine):")
        out.append("")
        out.append("| scenario | unit | fulcrum | HAProxy | nginx | fulcrum / HAProxy | nginx / HAProxy |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for label, unit, m in eff:
            cells = " | ".join(fmt(m[t], unit) for t in PROXIES)
            out.append(f"| {label} | {unit} | {cells} | {ratio(m['fulcrum'], m['haproxy'])} "
                       f"| {ratio(m['nginx'], m['haproxy'])} |")
    # Side-by-side pairs of fulcrum targets, each shown only when its second target ran:
    # fulcrum-info, the cost of the per-connection log line; fulcrum-base, another build of fulcrum
    # (FULCRUM_BASE, e.g. the commit before a change) against this one.
    pairs = [
        ("fulcrum", "fulcrum-info", "warn", "info",
         "Logging cost: fulcrum at `--log-level warn` against the default `info` (one line per "
         "connection), side by side in this run:"),
        ("fulcrum-base", "fulcrum", "base", "this",
         f"This build of fulcrum against another (`FULCRUM_BASE`: {meta.get('fulcrum_base', '?')}), "
         "side by side in this run:"),
    ]
    for a, b, an, bn, title in pairs:
        rows = []
        for scenario, metric, label, unit in EFFICIENCY_ROWS:
            va, vb = med(scenario, a, metric), med(scenario, b, metric)
            if va is None or vb is None:
                continue
            per = {}
            for t in (a, b):
                work = values.get((scenario, t, metric), [])
                cpu = values.get((scenario, t, "cpu_pct"), [])
                ratios = [w / (c / 100) for w, c in zip(work, cpu) if c > 0 and not math.isnan(w)]
                per[t] = statistics.median(ratios) if ratios else None
            rows.append((label, unit, va, vb, per[a], per[b]))
        for scenario, label in (("rss_plain", "RSS per idle plain connection"),
                                ("rss_tls", "RSS per idle mTLS connection")):
            va, vb = med(scenario, a, "kb_per_conn"), med(scenario, b, "kb_per_conn")
            if va is not None and vb is not None:
                rows.append((label, "kB", va, vb, None, None))
        if not rows:
            continue
        out.append("")
        out.append(title)
        out.append("")
        out.append(f"| scenario | unit | {an} | {bn} | {bn} / {an} | {an} per CPU-s | {bn} per CPU-s "
                   f"| {bn} / {an} |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for label, unit, va, vb, pa, pb in rows:
            out.append(f"| {label} | {unit} | {fmt(va, unit)} | {fmt(vb, unit)} | {ratio(vb, va)} "
                       f"| {fmt(pa, unit)} | {fmt(pb, unit)} | {ratio(pb, pa)} |")
    held = sorted({int(v) for (s, t, metric), vs in values.items() if metric == "held" for v in vs})
    out.append("")
    if held:
        out.append(f"Idle connections held for the RSS rows: {', '.join(map(str, held))}.")
    if notes:
        out.append("")
        out.append("Notes from the raw results:")
        out.append("")
        out.extend(f"- {n}" for n in notes)
    out.append("")
    out.append("<details><summary>Every round (run order: for each round, each scenario, each "
               "target)</summary>")
    out.append("")
    rounds = sorted({int(l.split("\t")[0]) for l in open(raw) if l.count("\t") == 4})
    shown = TARGETS + [t for t in ["fulcrum-info", "fulcrum-base"] if any(k[1] == t for k in values)]
    out.append("| scenario | unit | " + " | ".join(shown) + " |")
    out.append("|---|---|" + "---:|" * len(shown))
    for scenario, metric, label, short, unit, higher in ROWS:
        cells = []
        for t in shown:
            v = values.get((scenario, t, metric), [])
            cells.append(" / ".join(fmt(x, unit) for x in v) if v else "–")
        if any(c != "–" for c in cells):
            out.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"Rounds: {len(rounds)}. Values in round order.")
    out.append("")
    out.append("</details>")
    out.append("")
    out.append("| machine | |")
    out.append("|---|---|")
    for key in ["cpu", "nproc", "kernel", "haproxy", "nginx", "fulcrum", "openssl", "iperf3", "wrk",
                "fulcrum_base", "fulcrum_workers", "proxy_workers", "client_key_exchange", "http_backend", "haproxy_splice", "load_at_start", "load_at_measure", "load_at_end", "date", "command"]:
        if key in meta:
            val = f"`{meta[key]}`" if key == "command" else meta[key]
            out.append(f"| {key.replace('_', ' ')} | {val} |")
    text = "\n".join(out) + "\n"
    open(out_md, "w").write(text)
    open(out_dat, "w").write("\n".join(chart) + ("\n" if chart else ""))


if __name__ == "__main__":
    main(*sys.argv[1:5])
