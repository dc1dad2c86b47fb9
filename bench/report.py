"""Turns bench/run's measurements into docs/bench/results.md, results.json and burst.png."""
import json
import os
import statistics


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec=".0f", none="–"):
    return none if v is None else format(v, spec)


def mark(ok):
    return "met" if ok else "**MISSED**"


def group(rows, *keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


# ---------------------------------------------------------------------------------------------------

def burst_section(meta, results, targets, g):
    lines = []
    cap = g["BURST_WORKERS"] * 1000 / g["BURST_MS"]
    rows = results["burst"]
    if not rows:
        return [], []
    order = [c["id"] for c in g["BURST_CONTENDERS"]]
    labels = {c["id"]: c["label"] for c in g["BURST_CONTENDERS"]}
    verdicts = []
    for n, c in meta["params"]["burst"]:
        sel = [r for r in rows if r["n"] == n and r["c"] == c]
        if not sel:
            continue
        by = group(sel, "contender")
        lines += [f"### {n} requests at concurrency {c}", "",
                  "| contender | 200s | 502s | 503s | other errors | success ratio | goodput "
                  "(of capacity) | p50 of 200s | p99 of 200s | nginx EAGAIN lines | target |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for cid in order:
            rs = by.get((cid,))
            if not rs:
                continue
            ok, s502, s503 = med([r["ok"] for r in rs]), med([r["s502"] for r in rs]), med(
                [r["s503"] for r in rs])
            other = med([r["other"] for r in rs])
            success = med([r["ok"] / r["requests"] for r in rs])
            worst_success = min(r["ok"] / r["requests"] for r in rs)
            max502 = max(r["s502"] for r in rs)
            goodput = med([r["ok_per_s"] / cap for r in rs])
            p50, p99 = med([r["p50_ms"] for r in rs]), med([r["p99_ms"] for r in rs])
            target = ""
            if cid.startswith("ant-"):
                missed = []
                if worst_success < targets["burst_success"]:
                    missed.append(f"success {worst_success:.1%} in the worst round")
                if max502 > 0:
                    missed.append(f"{max502} 502s in the worst round")
                if goodput < targets["burst_goodput"]:
                    missed.append(f"goodput {goodput:.1%}")
                target = "met" if not missed else "**MISSED**: " + "; ".join(missed)
                verdicts.append((f"burst {n}@{c}, {labels[cid]}: 100% success, 0 502s, goodput ≥ "
                                 f"{targets['burst_goodput']:.0%}",
                                 f"success {worst_success:.1%} (worst round), 502s {max502} (worst "
                                 f"round), goodput {goodput:.1%} (median)", not missed))
            lines.append(
                f"| {labels[cid]} | {fmt(ok)} | {fmt(s502)} | {fmt(s503)} | {fmt(other)} | "
                f"{success:.1%} | {goodput:.1%} | {fmt(p50, '.0f')} ms | {fmt(p99, '.0f')} ms | "
                f"{fmt(med([r.get('eagain_log_lines') for r in rs]))} | {target} |")
        lines.append("")
    lines += [
        "Definitions (medians of the rounds, each cell on its own):",
        "",
        f"- **capacity** = workers / service time = {g['BURST_WORKERS']} / "
        f"{g['BURST_MS'] / 1000:g} s = **{cap:g} requests/s**: the most 200s any server can give with "
        "this pool.",
        "- **goodput** = number of 200 responses / wall time of the load run, where the wall time is oha's "
        "`summary.total` (from the start of the run to the last response); shown as a fraction of "
        "capacity. A row that refuses most requests at once finishes early, so its goodput can be close "
        "to capacity while its success ratio is low: read the two together.",
        "- **success ratio** = 200s / requests sent. **other errors** = any status other than 200, 502 "
        "and 503, plus requests that got no HTTP response at all (oha's `errorDistribution`: resets, "
        "timeouts...).",
        "- **p50 / p99** are of the 200 responses only (oha `--stats-success-breakdown`), measured by "
        "the client, so they include the time spent waiting in a queue or backlog.",
        "- **nginx EAGAIN lines**: lines of nginx's error log saying `connect() to unix:… failed (11: "
        "Resource temporarily unavailable) while connecting to upstream`, i.e. the server's listen "
        "backlog was full: the cause of the 502s.",
        "- **target** (anteroom rows): success 100% and zero 502s in *every* round, and median goodput ≥ "
        f"{targets['burst_goodput']:.0%} of capacity.",
        "",
        "![burst chart](burst.png)",
        "",
    ]
    return lines, verdicts


def overhead_section(meta, results, targets, g):
    rows = results["overhead"]
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    by_round = group(rows, "lang", "round")
    for lang in ("php", "python", "perl"):
        sel = [r for r in rows if r["lang"] == lang]
        if not sel:
            continue
        lines += [f"### {lang}", "",
                  "| path | req/s | p50 | p99 | non-200 | ratio to the peer (req/s) | target |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for role in ("peer", "direct", "behind_nginx", "behind_nginx_nok"):
            rs = [r for r in sel if r["role"] == role]
            if not rs:
                continue
            ratios = []
            for r in rs:
                peer = [x for x in by_round[(lang, r["round"])] if x["role"] == "peer"]
                if peer:
                    ratios.append(r["rps"] / peer[0]["rps"])
            ratio = med(ratios)
            target = ""
            if role == "direct":
                ok = ratio >= targets["overhead_direct"]
                target = f"≥ {targets['overhead_direct']:.2f}x: {mark(ok)}"
                verdicts.append((f"overhead {lang}: anteroom in nginx's place ≥ "
                                 f"{targets['overhead_direct']:.2f}x the peer", f"{ratio:.2f}x", ok))
            elif role == "behind_nginx":
                ok = ratio >= targets["overhead_behind_nginx"]
                target = f"≥ {targets['overhead_behind_nginx']:.2f}x: {mark(ok)}"
                verdicts.append((f"overhead {lang}: nginx → anteroom ≥ "
                                 f"{targets['overhead_behind_nginx']:.2f}x the peer", f"{ratio:.2f}x",
                                 ok))
            elif role == "behind_nginx_nok":
                target = "(extra row, no target)"
            non200 = med([r["requests"] - r["ok"] for r in rs])
            lines.append(f"| {rs[0]['label']} | {fmt(med([r['rps'] for r in rs]))} | "
                         f"{fmt(med([r['p50_ms'] for r in rs]), '.2f')} ms | "
                         f"{fmt(med([r['p99_ms'] for r in rs]), '.2f')} ms | {fmt(non200)} | "
                         f"{'1.00x' if role == 'peer' else fmt(ratio, '.2f') + 'x'} | {target} |")
        lines.append("")
    lines += [
        f"Trivial app (`?ms=0`), {g['OVERHEAD_WORKERS']} workers, {meta['params']['overhead_n']} requests "
        f"at concurrency {g['OVERHEAD_CONCURRENCY']} over keep-alive client connections, default "
        f"somaxconn ({meta.get('open_somaxconn', '?')}). The ratio is computed within each round "
        "(contender req/s / the peer's req/s in the same round), then the median of the rounds is "
        "shown. Everything (client, nginx, anteroom, workers) shares the same 2 cores, so a path with "
        "fewer processes also leaves more CPU to the workers.",
        "",
    ]
    return lines, verdicts


LATENCY_ORDER = ("gunicorn-direct", "ant-gunicorn", "ngx-gunicorn", "ngx-ka-gunicorn")


def added_p50_us(rows, mode, cid):
    """Median over rounds of (cid's p50 − the direct p50 of the same round), in µs."""
    direct = {r["round"]: r for r in rows if r["mode"] == mode and r["contender"] == "gunicorn-direct"}
    hop = {r["round"]: r for r in rows if r["mode"] == mode and r["contender"] == cid}
    return med([(hop[k]["p50_ms"] - direct[k]["p50_ms"]) * 1000 for k in hop
                if k in direct and hop[k]["p50_ms"] is not None and direct[k]["p50_ms"] is not None])


def latency_target(mode, cid, added, rows, targets):
    """The target cell and verdicts of one row: only anteroom's rows have targets."""
    if cid != "ant-gunicorn" or added is None:
        return "", []
    if mode == "keepalive":
        ok = added <= targets.get("latency_keepalive_p50_us", 50.0)
        lim = targets.get("latency_keepalive_p50_us", 50.0)
        return (f"≤ {lim:.0f} µs: {mark(ok)}",
                [(f"added p50, kept-alive client connection ≤ {lim:.0f} µs", f"{added:+.0f} µs", ok)])
    lim = targets["latency_p50_us"]
    ok = added <= lim
    cell = f"≤ {lim:.0f} µs: {mark(ok)}"
    out = [(f"added p50, new connection per request ≤ {lim:.0f} µs", f"{added:+.0f} µs", ok)]
    ngx = added_p50_us(rows, mode, "ngx-gunicorn")
    if ngx is not None:
        ok2 = added <= ngx
        cell += f"; ≤ nginx's {ngx:+.0f} µs: {mark(ok2)}"
        out.append(("added p50, new connection per request ≤ nginx's (proxy_pass to the same gunicorn, "
                    "same run)", f"anteroom {added:+.0f} µs, nginx {ngx:+.0f} µs", ok2))
    return cell, out


def latency_section(meta, results, targets, g):
    rows = results["latency"]
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    labels = {r["contender"]: r["label"] for r in rows}
    lines += ["| client connections | path | p50 | p99 | non-200 | p50 added by the hop | target |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for mode in ("no-keepalive", "keepalive"):
        conn = "new connection per request" if mode == "no-keepalive" else "keep-alive"
        for cid in LATENCY_ORDER:
            rs = [r for r in rows if r["mode"] == mode and r["contender"] == cid]
            if not rs:
                continue
            added = None if cid == "gunicorn-direct" else added_p50_us(rows, mode, cid)
            target, v = latency_target(mode, cid, added, rows, targets)
            verdicts += v
            lines.append(f"| {conn} | {labels[cid]} | {fmt(med([r['p50_ms'] * 1000 for r in rs]))} µs"
                         f" | {fmt(med([r['p99_ms'] * 1000 for r in rs]))} µs | "
                         f"{fmt(med([r['requests'] - r['ok'] for r in rs]))} | "
                         f"{fmt(added, '+.0f', '')}{' µs' if added is not None else ''} | {target} |")
    lines += ["",
              f"gunicorn sync workers (`-w 1`), trivial app, {meta['params']['latency_n']} sequential "
              f"requests (concurrency {g['LATENCY_CONCURRENCY']}) per row. **p50 added** = the row's p50 − "
              "the direct p50 in the same round, median over rounds. With a new connection per request on "
              "every path (`oha --disable-keepalive`) the only difference is the hop: its accept, parse, "
              "a unix-socket connection to gunicorn and back. nginx is the anchor: a plain `proxy_pass` to "
              "the same gunicorn over a unix socket, once without and once with upstream `keepalive 32` "
              "(gunicorn's sync worker closes every connection, so the two should agree). With a kept-alive "
              "client, the direct row still pays a TCP handshake per request (gunicorn closes every "
              "connection) while the client keeps its connection to the hop.", ""]
    return lines, verdicts


SCALE_ORDER = ("ant-demo", "ant-gunicorn", "haproxy")


def scale_row(rs, targets):
    """One contender's cells (medians of the rounds) and whether it met the target."""
    cl = [r["client"] for r in rs]
    hwm = med([r["vmhwm_mib"] for r in rs])
    before = med([r["rss_before_mib"] for r in rs])
    worst_errors = max(r["errors"] for r in rs)
    reqs = med([c["requests"] for c in cl])
    conns = med([c["established"] for c in cl]) or 1
    cpu = med([r["cpu_s"] for r in rs])
    idle = med([c.get("anteroom_rss_idle_kib") for c in cl])
    ok = hwm < targets["scale_rss_mib"] and worst_errors == 0
    cells = (f"{fmt(med([c['established'] for c in cl]))} / {fmt(med([c['anteroom_fds_held'] for c in cl]))}"
             f" | {fmt(reqs)} | {fmt(med([c['ok'] for c in cl]))} | {worst_errors} | {hwm:.1f} MiB | "
             f"{before:.1f} MiB | {fmt(idle / 1024 if idle else None, '.1f')} MiB | "
             f"{(hwm - before) * 1024 / conns:.1f} KiB | {cpu:.2f} s | {cpu / reqs * 1e6:.0f} µs | "
             f"{fmt(med([c['p50_ms'] for c in cl]))} ms | {fmt(med([c['p99_ms'] for c in cl]))} ms")
    return cells, hwm, worst_errors, ok


def scale_section(meta, results, targets, g):
    rows = results["scale"]
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    conns = meta["params"].get("scale_connections", g["SCALE_CONNECTIONS"])
    lines += ["| server | connections held (client / server fds) | requests | 200s | errors (worst round) | "
              "peak RSS (VmHWM) | RSS before | RSS with all connections idle | (peak − before) per "
              "connection | CPU | CPU per request | p50 | p99 | target |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    by = group(rows, "contender") if all("contender" in r for r in rows) else {("ant-demo",): rows}
    for cid in SCALE_ORDER:
        rs = by.get((cid,))
        if not rs:
            continue
        label = rs[0].get("label", "anteroom, built-in demo app")
        cells, hwm, worst_errors, ok = scale_row(rs, targets)
        target = "(reference)"
        if cid.startswith("ant-"):
            target = f"< {targets['scale_rss_mib']:.0f} MiB, no errors: {mark(ok)}"
            verdicts.append((f"{conns} connections with a request each in flight, {label}: peak RSS < "
                             f"{targets['scale_rss_mib']:.0f} MiB, no errors",
                             f"{hwm:.1f} MiB, {worst_errors} errors", ok))
        elif cid == "haproxy":
            verdicts.append((f"(reference) {conns} connections in flight, {label}", f"peak {hwm:.1f} MiB, "
                             f"{worst_errors} errors", True))
        lines.append(f"| {label} | {cells} | {target} |")
    lines += [
        "",
        f"{g['SCALE_WORKERS']} workers, `/sleep?ms={g['SCALE_MS']}` (anteroom's built-in demo app) or "
        f"`/?ms={g['SCALE_MS']}` (bench/apps/app.py under gunicorn's sync workers), listening on TCP. "
        f"anteroom runs with `--max-queue {g['SCALE_MAX_QUEUE']}` (the default, 4096, would refuse the "
        "rest with 503 by design); HAProxy queues in front of one `gunicorn -w "
        f"{g['SCALE_WORKERS']}` on a unix socket with `server … maxconn {g['SCALE_WORKERS']}`, its default "
        "buffers (`tune.bufsize` 16 KiB) and 2 threads. `bench/scale_client.py` opens "
        f"{conns} keep-alive connections and holds them (the server's fd count is taken while "
        f"all are idle), then {meta['params']['scale_waves']} time(s) sends one request on every connection "
        "at the same moment, so that all of them are in the server at once, nearly all waiting in its queue. "
        "**RSS with all connections idle** = `VmRSS` once every connection is open and before any request. "
        "**peak RSS** = `VmHWM` of the anteroom or HAProxy process (not the workers) from /proc/PID/status "
        "at the end; **CPU** = its utime + stime over the load; errors = connections not established + "
        "requests without a response + non-200 responses (+1 if the server died).",
        "",
    ]
    return lines, verdicts


def idle_section(meta, results, targets, g):
    rows = results.get("idle", [])
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    lim = targets.get("idle_bytes_per_conn", 1024.0)
    lines += ["| server | connections held (client / server fds) | errors (worst round) | RSS baseline | "
              "RSS, never spoke | per connection, never spoke | RSS after one request each | per "
              "connection, after one request | target |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (cid,), rs in group(rows, "contender").items():
        cl = [r["client"] for r in rs]
        worst = max(r["errors"] for r in rs)
        never = med([r["bytes_per_conn_idle"] for r in rs])
        after = med([r["bytes_per_conn_after_request"] for r in rs])
        target = "(reference)"
        if cid.startswith("ant-"):
            ok1, ok2 = never <= lim and worst == 0, after <= lim and worst == 0
            target = f"≤ {lim:.0f} B each: never spoke {mark(ok1)}, after one request {mark(ok2)}"
            what = f"{fmt(med([c['established'] for c in cl]))} idle connections"
            verdicts += [(f"{what}, never spoke: ≤ {lim / 1024:g} KiB each above the baseline, no errors",
                          f"{never:.0f} B each, {worst} errors", ok1),
                         (f"{what}, after one request each (kept alive): ≤ {lim / 1024:g} KiB each, no errors",
                          f"{after:.0f} B each, {worst} errors", ok2)]
        else:
            verdicts.append((f"(reference) idle connections, {rs[0]['label']}",
                             f"never spoke {never:.0f} B each, after one request {after:.0f} B each", True))
        mib = lambda k: fmt(med([c[k] / 1024 for c in cl]), ".1f") + " MiB"  # noqa: E731
        lines.append(f"| {rs[0]['label']} | {fmt(med([c['established'] for c in cl]))} / "
                     f"{fmt(med([c['fds_idle'] for c in cl]))} | {worst} | {mib('rss_baseline_kib')} | "
                     f"{mib('rss_idle_kib')} | {never:.0f} B | {mib('rss_after_request_kib')} | {after:.0f} B | "
                     f"{target} |")
    lines += [
        "",
        f"As many connections as the open-files limit ({meta.get('nofile', '?')}) allows on both sides, less "
        f"{g['IDLE_FD_RESERVE']} for everything else, to anteroom (its own process, not the workers) and to "
        "nginx (master and workers summed), each in front of the same gunicorn pool "
        f"({g['IDLE_WORKERS']} sync workers), with header and keep-alive timeouts of {g['IDLE_TIMEOUT_S']} s "
        "so that nothing is closed during the run, in a network namespace of their own with "
        f"`{g.get('IDLE_PORT_RANGE', '?')}` (with the default range, finding a free source port makes the "
        "connects ten times slower). **RSS baseline** = `VmRSS` after the warm-up, before any "
        "connection; **never spoke** = every connection open and silent (no byte sent); **after one "
        "request** = every connection has sent one trivial request (at most "
        f"{g['IDLE_REQUEST_CONCURRENCY']} at a time), read its response, and stays open, kept alive. **Per "
        "connection** = (RSS − baseline) / connections held. Errors = connections not established, requests "
        "without a 200, and connections the server closed while idle.",
        "",
    ]
    return lines, verdicts


def cpu_section(meta, results, targets, g):
    rows = results.get("cpu", [])
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    lines += ["| path | req/s | non-200 | front CPU (utime + stime) | processes summed | CPU per request | "
              "ratio to nginx | target |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    by_round = group(rows, "round")
    for (cid,), rs in group(rows, "contender").items():
        ratios = []
        for r in rs:
            ngx = [x for x in by_round[(r["round"],)] if x["contender"] == "ngx-cpu"]
            if ngx and ngx[0]["cpu_us_per_request"]:
                ratios.append(r["cpu_us_per_request"] / ngx[0]["cpu_us_per_request"])
        ratio = med(ratios)
        per = med([r["cpu_us_per_request"] for r in rs])
        target = ""
        if cid == "ant-cpu" and ratio is not None:
            ok = ratio <= targets.get("cpu_vs_nginx", 1.0) and all(r["ok"] == r["requests"] for r in rs)
            target = f"≤ nginx's: {mark(ok)}"
            ngx_per = med([r["cpu_us_per_request"] for r in rows if r["contender"] == "ngx-cpu"])
            verdicts.append(("anteroom CPU per proxied request ≤ nginx's (same load, same run)",
                             f"anteroom {per:.0f} µs, nginx {fmt(ngx_per)} µs ({ratio:.2f}x)", ok))
        lines.append(f"| {rs[0]['label']} | {fmt(med([r['rps'] for r in rs]))} | "
                     f"{fmt(med([r['requests'] - r['ok'] for r in rs]))} | "
                     f"{med([r['cpu_s'] for r in rs]):.2f} s | {rs[0]['pids']} | {per:.0f} µs | "
                     f"{fmt(ratio, '.2f')}x | {target} |")
    lines += [
        "",
        f"Trivial app (`?ms=0`) under gunicorn ({g['CPU_WORKERS']} sync workers), {meta['params']['cpu_n']} "
        f"requests at concurrency {g['CPU_CONCURRENCY']} over keep-alive client connections; both fronts "
        "reach gunicorn over a unix socket with a new connection per request (gunicorn's sync worker closes "
        "every one). **CPU** = utime + stime from /proc/PID/stat before and after the load: anteroom's own "
        "process (every thread; not the workers), nginx's master and workers summed. **CPU per request** = "
        "CPU / 200 responses; **ratio** computed within each round, median over rounds. /proc counts in "
        "ticks of 10 ms.",
        "",
    ]
    return lines, verdicts


def faults_section(meta, results, targets, g):
    rows = results.get("faults", [])
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    lines += ["| case | what | measured | target | |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['what']} | {r['measured']} | {r['target']} | {mark(r['ok'])} |")
        verdicts.append((f"fault: {r['case']}", r["measured"], r["ok"]))
    lines += ["", "Each case is an integration test (`tests/faults_*.rs`) run with `ANTEROOM_FAULTS=long`; "
              "`scripts/test` runs the same cases in a short form.", ""]
    return lines, verdicts


def appendix(results):
    lines = ["## Every round", "",
             "| scenario | round | contender | requests | 200 | 502 | 503 | other | wall | req/s | p50 | p99 |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["burst"]:
        lines.append(f"| burst {r['n']}@{r['c']} | {r['round']} | {r['label']} | {r['requests']} | "
                     f"{r['ok']} | {r['s502']} | {r['s503']} | {r['other']} | {r['wall_s']:.1f} s | "
                     f"{r['rps']:.0f} | {fmt(r['p50_ms'])} ms | {fmt(r['p99_ms'])} ms |")
    for r in results["overhead"]:
        lines.append(f"| overhead | {r['round']} | {r['label']} | {r['requests']} | {r['ok']} | "
                     f"{r['s502']} | {r['s503']} | {r['other']} | {r['wall_s']:.1f} s | "
                     f"{r['rps']:.0f} | {fmt(r['p50_ms'], '.2f')} ms | {fmt(r['p99_ms'], '.2f')} ms |")
    for r in results["latency"]:
        lines.append(f"| latency ({r['mode']}) | {r['round']} | {r['label']} | {r['requests']} | "
                     f"{r['ok']} | {r['s502']} | {r['s503']} | {r['other']} | {r['wall_s']:.1f} s | "
                     f"{r['rps']:.0f} | {fmt(r['p50_ms'] * 1000 if r['p50_ms'] else None)} µs | "
                     f"{fmt(r['p99_ms'] * 1000 if r['p99_ms'] else None)} µs |")
    for r in results.get("idle", []):
        c = r["client"]
        lines.append(f"| idle | {r['round']} | {r['label']}, {c['established']} conns, never spoke "
                     f"{r['bytes_per_conn_idle']:.0f} B each, after one request "
                     f"{r['bytes_per_conn_after_request']:.0f} B each | {c['requests']} | {c['ok']} | "
                     f"{c['statuses'].get('502', 0)} | {c['statuses'].get('503', 0)} | "
                     f"{c['request_errors'] + c['connect_errors']} | {sum(c['wave_s']):.1f} s | – | "
                     f"{fmt(c['p50_ms'])} ms | {fmt(c['p99_ms'])} ms |")
    for r in results.get("cpu", []):
        lines.append(f"| cpu | {r['round']} | {r['label']}, CPU {r['cpu_s']:.2f} s = "
                     f"{r['cpu_us_per_request']:.0f} µs per request | {r['requests']} | {r['ok']} | "
                     f"{r['s502']} | {r['s503']} | {r['other']} | {r['wall_s']:.1f} s | {r['rps']:.0f} | "
                     f"{fmt(r['p50_ms'], '.2f')} ms | {fmt(r['p99_ms'], '.2f')} ms |")
    for r in results["scale"]:
        c = r["client"]
        lines.append(f"| scale | {r['round']} | {r.get('label', 'anteroom demo')}, {c['established']} conns, VmHWM "
                     f"{r['vmhwm_mib']:.1f} MiB, CPU {r['cpu_s']:.2f} s | {c['requests']} | {c['ok']} | "
                     f"{c['statuses'].get('502', 0)} | {c['statuses'].get('503', 0)} | "
                     f"{c['request_errors'] + c['connect_errors']} | {sum(c['wave_s']):.1f} s | "
                     f"{c['ok'] / max(sum(c['wave_s']), 1e-9):.0f} | {fmt(c['p50_ms'])} ms | "
                     f"{fmt(c['p99_ms'])} ms |")
    lines.append("")
    return lines


def header(meta, g):
    m, v, p = meta["machine"], meta["versions"], meta["params"]
    rev = v["anteroom_git_rev"]
    if v["anteroom_uncommitted"]:
        rev += " + uncommitted changes in " + ", ".join(v["anteroom_uncommitted"])
    lines = [
        "# anteroom benchmark results", "",
        f"Written by `bench/run{'' if meta['mode'] == 'full' else ' --' + meta['mode']}` "
        f"({meta['mode']} run: {p['rounds']} interleaved round(s), medians shown) on "
        f"{meta['started']}; the run took {meta['wall_s'] / 60:.1f} minutes ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in meta.get("scenario_wall_s", {}).items())
        + "). How to run it and what "
        "each scenario measures: [bench/README.md](../../bench/README.md). Raw numbers: "
        "[results.json](results.json).", "",
        "## Machine and versions", "",
        "| | |", "| --- | --- |",
        f"| machine | {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, kernel {m['kernel']}, Debian "
        f"{m['debian']}; shared with other work (load average {' '.join(meta['loadavg_start'])} at the "
        f"start, {' '.join(meta['loadavg_end'])} at the end) |",
        f"| anteroom | {v['anteroom']}, git {rev}; binary: {v['anteroom_build']} |",
    ]
    for k in ("nginx", "haproxy", "php-cgi", "php-fpm", "perl", "Starman", "Plack", "FCGI (Perl)", "python",
              "gunicorn", "flup", "oha"):
        if k in v:
            lines.append(f"| {k} | {v[k]} |")
    lines += [
        "", "## Parameters", "",
        f"- Rounds: {p['rounds']}; contenders run interleaved (A B C … A B C …), each started fresh, "
        "warmed up identically (4×workers requests of 20 ms at concurrency 2×workers, then 50×workers "
        "trivial ones), measured, stopped.",
        f"- Burst: {g['BURST_WORKERS']} workers, app sleeps {g['BURST_MS']} ms, loads "
        + ", ".join(f"{n} requests at concurrency {c}" for n, c in p["burst"])
        + f"; network namespace with `net.core.somaxconn={g['BURST_SOMAXCONN']}` holding nginx, the "
        "server and oha. Peers on unix sockets with their default backlogs (gunicorn 2048, Starman "
        "1024, php-fpm 511: all clamped to 128); anteroom on a unix socket behind nginx (upstream "
        "keepalive 32, as its README shows) with its defaults (`--max-queue 4096 --queue-timeout 30`).",
        f"- Overhead: {g['OVERHEAD_WORKERS']} workers, trivial app, {p['overhead_n']} requests at "
        f"concurrency {g['OVERHEAD_CONCURRENCY']}; added latency: {p['latency_n']} requests at "
        f"concurrency {g['LATENCY_CONCURRENCY']}. Own network namespace with the default somaxconn "
        f"({meta.get('open_somaxconn', '?')}).",
        f"- Scale: {g['SCALE_CONNECTIONS']} connections, {g['SCALE_WORKERS']} workers, "
        f"{p['scale_waves']} wave(s) of one request per connection, same namespace as overhead; "
        "anteroom (demo app, then gunicorn) and HAProxy in front of gunicorn, interleaved.",
        f"- Idle connections: {meta.get('idle_connections', '?')} per server (open-files limit "
        f"{meta.get('nofile', '?')}), anteroom and nginx in front of {g['IDLE_WORKERS']} gunicorn workers. "
        f"CPU per request: {p.get('cpu_n', '?')} requests at concurrency {g['CPU_CONCURRENCY']}, anteroom "
        f"and nginx in front of {g['CPU_WORKERS']} gunicorn workers, same namespace as overhead; idle "
        "connections in a namespace of their own with a wider ephemeral port range "
        f"(`{g.get('IDLE_PORT_RANGE', '?')}`).",
        "- nginx: `worker_processes auto` (2), `worker_connections 16384`, `multi_accept on`, access log "
        "off, read timeouts 300 s. To the peers as usually deployed: `fastcgi_pass` to php-fpm, "
        "`proxy_pass` to gunicorn and Starman, a new upstream connection per request (gunicorn's sync "
        "worker closes every connection, and an idle keep-alive connection would pin a Starman or "
        "php-fpm process). To anteroom as its README configures it: `upstream { server unix:…; "
        "keepalive 32; }`, `proxy_http_version 1.1`, `Connection \"\"`; the overhead scenario adds a "
        "row without upstream keepalive. oha: `-t 120s --connect-timeout 30s`.",
        "- Workers: php-fpm `pm = static`; `anteroom … -- php-cgi` with `PHP_FCGI_MAX_REQUESTS=0`; "
        "`gunicorn -w N` (sync); `starman --workers N`; `anteroom … -- plackup -E deployment -s FCGI --manager=` "
        "(deployment, like `starman`'s default, so no development middleware); `anteroom … -- python3 "
        "app_flup.py`. The apps are bench/apps/app.php, app.psgi, app.py.",
        "",
    ]
    return lines


def write(out, meta, results, targets, g):
    sections = []
    verdicts = []
    for title, fn in (("1. Burst", burst_section), ("2. Overhead", overhead_section),
                      ("2b. Latency added by a hop: anteroom, and nginx as the anchor", latency_section),
                      ("3. Scale: 10,000 connections with a request each in flight", scale_section),
                      ("3b. Idle connections", idle_section),
                      ("3c. CPU per proxied request", cpu_section),
                      ("4. Faults and abuse", faults_section)):
        lines, v = fn(meta, results, targets, g)
        if lines:
            sections += [f"## {title}", ""] + lines
            verdicts += v
    summary = ["## Targets", "", "| target | result | |", "| --- | --- | --- |"]
    for name, value, ok in verdicts:
        summary.append(f"| {name} | {value} | {'' if name.startswith('(reference)') else mark(ok)} |")
    summary.append("")
    text = "\n".join(header(meta, g) + summary + sections + appendix(results))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "targets": targets, "results": results,
                   "verdicts": [{"target": n, "result": v, "met": ok} for n, v, ok in verdicts
                                if not n.startswith("(reference)")]},
                  f, indent=1, default=str)
    if results["burst"]:
        chart(os.path.join(out, "burst.png"), meta, results, g)


def chart(path, meta, results, g):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = g["BURST_WORKERS"] * 1000 / g["BURST_MS"]
    configs = [(n, c) for n, c in meta["params"]["burst"]
               if any(r["n"] == n and r["c"] == c for r in results["burst"])]
    order = [c for c in g["BURST_CONTENDERS"]]
    fig, axes = plt.subplots(len(configs), 1, figsize=(10, 1.0 + 3.4 * len(configs)), squeeze=False)
    colors = {"200": "#2e8b57", "502": "#d62728", "503": "#ff9f1c", "other": "#888888"}
    for ax, (n, c) in zip(axes[:, 0], configs):
        labels, segs, notes = [], [], []
        for spec in reversed(order):
            rs = [r for r in results["burst"] if r["n"] == n and r["c"] == c
                  and r["contender"] == spec["id"]]
            if not rs:
                continue
            labels.append(spec["label"])
            vals = {k: med([r[f] / r["requests"] * 100 for r in rs])
                    for k, f in (("200", "ok"), ("502", "s502"), ("503", "s503"), ("other", "other"))}
            segs.append(vals)
            p99 = med([r["p99_ms"] for r in rs])
            notes.append(f"p99 of 200s {p99 / 1000:.1f} s" if p99 is not None else "no 200s")
        y = range(len(labels))
        left = [0.0] * len(labels)
        for k in ("200", "502", "503", "other"):
            widths = [s[k] for s in segs]
            ax.barh(y, widths, left=left, color=colors[k], label=k if k != "other" else "other errors")
            left = [a + b for a, b in zip(left, widths)]
        for i, s in enumerate(segs):
            parts = [f"{s['200']:.1f}% 200"] + [f"{s[k]:.1f}% {k}" for k in ("502", "503", "other")
                                                  if s[k] >= 0.05]
            ax.text(1, i, " " + " · ".join(parts) + " · " + notes[i], va="center", ha="left",
                    fontsize=8.5, color="white", fontweight="bold")
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=9)
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of requests")
        ax.set_title(f"{n} requests at concurrency {c}: {g['BURST_WORKERS']} workers × {g['BURST_MS']} ms, "
                     f"somaxconn {g['BURST_SOMAXCONN']}", fontsize=10)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=8, ncol=4, frameon=False)
    fig.suptitle(f"Burst behind nginx ({meta['mode']} run, median of {meta['params']['rounds']} "
                 f"round(s), {meta['started'][:10]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
