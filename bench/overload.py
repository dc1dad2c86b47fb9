#!/usr/bin/env python3
"""The "overload" scenario of bench/run (issue 13): sustained overload, open loop.

5 workers x 100 ms (capacity 50/s) under a fixed arrival rate of 100 requests/s, with a client patience of
5 s (a 200 later than that counts as useless), for three contenders side by side: nginx -> php-fpm, nginx ->
anteroom + php-cgi with the plain FIFO queue (--queue-target 0), and the same with the controlled delay
(--queue-target 1, the default). Then the fairness row: one client at 500 requests/s plus 20 clients at 1 request/s each
(source addresses 127.0.0.2-21), straight to anteroom (behind nginx every request comes from nginx).

The load generator is this file run as a script (`overload.py gen`), inside the namespace: an asyncio loop
that opens one connection per request at its scheduled time whatever is still waiting (oha's --qps waits
for a free connection, so it turns closed-loop once its connections are all waiting). Latency is counted
from the scheduled time; each request waits for its answer up to 60 s, so a late answer is seen and counted
useless rather than cut.

bench/run calls scenario(); bench/run appends section() to results.md and draws chart().
"""

import asyncio
import json
import os
import subprocess
import sys

WORKERS = 5
SERVICE_MS = 100
CAPACITY = WORKERS * 1000 / SERVICE_MS
RATE = 100
PATIENCE_S = 5.0
BIG_RATE = 500
SMALL_CLIENTS = 20
TARGET = 1.0  # the --queue-target the controlled-delay contenders run with, for the p99 target
TARGETS = {"useful_share": 0.90, "p99_200_s": 2 * TARGET + SERVICE_MS / 1000, "p99_503_ms": 50.0,
           "small_ok": 0.95}

CONTENDERS = [
    dict(id="php-fpm", label="nginx → php-fpm"),
    dict(id="fifo", label="nginx → anteroom + php-cgi, FIFO (--queue-target 0)", extra=["--queue-target", "0"]),
    dict(id="codel", label="nginx → anteroom + php-cgi, controlled delay (--queue-target 1)",
         extra=["--queue-target", "1"]),
]
FAIR_CONTENDERS = [
    dict(id="fair-fifo", label="anteroom + php-cgi, FIFO (--queue-target 0)", extra=["--queue-target", "0"]),
    dict(id="fair-codel", label="anteroom + php-cgi, controlled delay (--queue-target 1)",
         extra=["--queue-target", "1"]),
]


# ---------------------------------------------------------------------------------------------------
# The generator (runs inside the namespace)

async def _one(host, port, path, src, at, t0, out, client):
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + at - loop.time()))
    status = 0
    try:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(src, 0) if src else None), 60)
        w.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(r.readline(), 60)
        status = int(line.split()[1])
        await asyncio.wait_for(r.read(), 10)
        w.close()
    except asyncio.TimeoutError:
        status = -1
    except (OSError, ValueError, IndexError):
        status = -2
    out.append((round(at, 4), round(loop.time() - t0 - at, 4), status, client))


async def _generate(host, port, path, plan):
    """plan: [(src, rate, client_label)]; runs `seconds` of each; returns every request's record."""
    out = []
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    tasks = []
    for src, rate, seconds, label in plan:
        n = int(rate * seconds)
        # Spread evenly, each client offset a little so the small ones do not all arrive at once.
        off = (sum(label.encode()) % 1000) / 1000 / rate
        tasks += [_one(host, port, path, src, off + i / rate, t0, out, label) for i in range(n)]
    await asyncio.gather(*tasks)
    return out


def gen_main(argv):
    """overload.py gen HOST PORT PATH PLAN_JSON"""
    host, port, path, plan = argv[0], int(argv[1]), argv[2], json.loads(argv[3])
    out = asyncio.run(_generate(host, port, path, plan))
    json.dump(out, sys.stdout)


def generate(ns, url, path, plan, seconds):
    host, port = url.rsplit("/", 1)[-1].split(":")
    plan = [(src, rate, seconds, label) for src, rate, label in plan]
    cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "gen", host, port, path,
           json.dumps(plan)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 200)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed ({r.returncode}): {r.stderr[-800:]}")
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------------
# Measures

def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def summarize(recs, seconds):
    ok = [lat for _, lat, st, _ in recs if st == 200]
    s503 = [lat for _, lat, st, _ in recs if st == 503]
    useful = sum(1 for lat in ok if lat <= PATIENCE_S)
    codes = {}
    for _, _, st, _ in recs:
        codes[str(st)] = codes.get(str(st), 0) + 1
    # Over the run and the drain after it: answers to requests of the last seconds come after them.
    span = max([seconds] + [at + lat for at, lat, st, _ in recs if st == 200 and lat <= PATIENCE_S])
    # Useful 200s per second of the run, for the chart.
    per_s = [0] * (int(span) + 1)
    for at, lat, st, _ in recs:
        if st == 200 and lat <= PATIENCE_S:
            per_s[int(at + lat)] += 1
    return {
        "requests": len(recs), "codes": codes, "ok": len(ok), "useful": useful, "span_s": span,
        "useful_per_s": useful / span, "useful_share": useful / span / CAPACITY,
        "p99_200_s": pct(ok, 0.99), "p50_200_s": pct(ok, 0.50),
        "p99_503_ms": None if not s503 else pct(s503, 0.99) * 1000,
        "useful_by_second": per_s,
    }


def start_anteroom(h, srv, ns, extra, listen):
    return srv.start_anteroom(ns, "php", WORKERS, listen, extra)


def start(h, srv, ns, spec):
    """(url, procs) for a contender of the sustained run: all behind nginx, as the burst scenario."""
    if spec["id"] == "php-fpm":
        url, procs, _ = srv.start(ns, dict(front="nginx", backend="php-fpm", lang="php"), WORKERS)
        return url, procs
    sockdir = h.path(f"ov{h.seq + 1}")
    os.makedirs(sockdir)
    sock = os.path.join(sockdir, "anteroom.sock")
    procs = [start_anteroom(h, srv, ns, spec["extra"], f"unix:{sock}")]
    try:
        srv.wait_ready(ns, "http://localhost/?ms=0", procs, unix=sock)
        ngx, url, _ = srv.nginx(ns, "proxy", sock, keepalive=True)
        procs.append(ngx)
        srv.wait_ready(ns, url + "/?ms=0", procs)
    except BaseException:
        h.stop_all(procs)
        raise
    return url, procs


def scenario(h, srv, results, seconds=60, log=print):
    """Runs the sustained-overload and fairness rows; appends to results["overload"]."""
    rows = results.setdefault("overload", [])
    ns = h.make_netns("overload", somaxconn=4096)
    path = f"/?ms={SERVICE_MS}"
    for spec in CONTENDERS:
        log(f"overload: {RATE}/s for {seconds}s: {spec['label']}")
        url, procs = start(h, srv, ns, spec)
        try:
            recs = generate(ns, url, path, [("127.0.0.1", RATE, "one")], seconds)
        finally:
            h.stop_all(procs)
        s = summarize(recs, seconds)
        s.update(kind="sustained", contender=spec["id"], label=spec["label"], seconds=seconds)
        rows.append(s)
        log(f"  useful {s['useful_per_s']:.1f}/s ({s['useful_share']:.0%} of capacity) codes {s['codes']} "
            f"p99 200 {s['p99_200_s']} s, p99 503 {s['p99_503_ms']} ms")
    for spec in FAIR_CONTENDERS:
        log(f"overload: fairness, one client at {BIG_RATE}/s + {SMALL_CLIENTS} at 1/s: {spec['label']}")
        srv.port += 1
        url = f"http://127.0.0.1:{srv.port}"
        procs = [start_anteroom(h, srv, ns, spec["extra"], f"127.0.0.1:{srv.port}")]
        try:
            srv.wait_ready(ns, url + "/?ms=0", procs)
            plan = [("127.0.0.1", BIG_RATE, "big")]
            plan += [(f"127.0.0.{i + 2}", 1, f"small{i}") for i in range(SMALL_CLIENTS)]
            recs = generate(ns, url, path, plan, seconds)
        finally:
            h.stop_all(procs)
        small = [r for r in recs if r[3] != "big"]
        big = [r for r in recs if r[3] == "big"]
        s = {
            "kind": "fairness", "contender": spec["id"], "label": spec["label"], "seconds": seconds,
            "small_requests": len(small), "small_ok": sum(1 for r in small if r[2] == 200),
            "small_useful": sum(1 for r in small if r[2] == 200 and r[1] <= PATIENCE_S),
            "small_p99_s": pct([r[1] for r in small if r[2] == 200], 0.99),
            "big": summarize(big, seconds),
        }
        s["small_share"] = s["small_ok"] / max(1, s["small_requests"])
        rows.append(s)
        log(f"  small clients {s['small_ok']}/{s['small_requests']} 200 ({s['small_useful']} within "
            f"{PATIENCE_S:.0f} s); big client codes {s['big']['codes']}")


# ---------------------------------------------------------------------------------------------------
# Report

def _f(v, spec):
    return "–" if v is None else format(v, spec)


def _mark(ok):
    return "met" if ok else "**MISSED**"


def section(results):
    """(markdown lines, [(target, result, ok)]) for results.md."""
    rows = results.get("overload") or []
    if not rows:
        return [], []
    sus = [r for r in rows if r["kind"] == "sustained"]
    seconds = sus[0]["seconds"] if sus else rows[0]["seconds"]
    lines = [f"{RATE} requests/s for {seconds} s, open loop (one connection per request at its scheduled time), "
             f"against {WORKERS} workers × {SERVICE_MS} ms (capacity {CAPACITY:.0f}/s); a 200 later than "
             f"{PATIENCE_S:.0f} s is useless. Latency from the scheduled time; useful 200s/s over the run and the "
             "drain after it.", "",
             "| contender | useful 200s/s | of capacity | 200 (useful) | 503 | other | p50 / p99 of 200s | p99 of 503s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sus:
        c = r["codes"]
        other = sum(v for k, v in c.items() if k not in ("200", "503"))
        lines.append(f"| {r['label']} | {r['useful_per_s']:.1f} | {r['useful_share']:.0%} | {r['ok']} ({r['useful']}) "
                     f"| {c.get('503', 0)} | {other} | {_f(r['p50_200_s'], '.2f')} / {_f(r['p99_200_s'], '.2f')} s "
                     f"| {_f(r['p99_503_ms'], '.0f')} ms |")
    fair = [r for r in rows if r["kind"] == "fairness"]
    if fair:
        lines += ["", f"Fairness: one client at {BIG_RATE}/s from 127.0.0.1 plus {SMALL_CLIENTS} clients at 1/s "
                  f"each from 127.0.0.2-{SMALL_CLIENTS + 1}, straight to anteroom, {seconds} s.", "",
                  "| contender | small clients: 200 | within 5 s | p99 of their 200s | big client: 200 (useful) | 503 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in fair:
            b = r["big"]
            lines.append(f"| {r['label']} | {r['small_ok']}/{r['small_requests']} ({r['small_share']:.1%}) "
                         f"| {r['small_useful']} | {_f(r['small_p99_s'], '.2f')} s | {b['ok']} ({b['useful']}) "
                         f"| {b['codes'].get('503', 0)} |")
    lines.append("")
    verdicts = []
    new = next((r for r in sus if r["contender"] == "codel"), None)
    fifo = next((r for r in sus if r["contender"] == "fifo"), None)
    if new:
        ok = new["useful_share"] >= TARGETS["useful_share"]
        beside = f" (FIFO {fifo['useful_share']:.0%})" if fifo else ""
        verdicts.append(("overload: useful goodput ≥ 90% of capacity", f"{new['useful_share']:.0%}{beside}", ok))
        p = new["p99_200_s"]
        verdicts.append((f"overload: p99 of 200s ≤ {TARGETS['p99_200_s']:.1f} s", f"{_f(p, '.2f')} s",
                         p is not None and p <= TARGETS["p99_200_s"]))
        p = new["p99_503_ms"]
        verdicts.append(("overload: p99 of 503s ≤ 50 ms", f"{_f(p, '.0f')} ms", p is None or p <= 50.0))
    fnew = next((r for r in fair if r["contender"] == "fair-codel"), None)
    if fnew:
        verdicts.append(("overload: small clients ≥ 95% 200s", f"{fnew['small_share']:.1%}",
                         fnew["small_share"] >= TARGETS["small_ok"]))
    lines += ["| target | result | |", "| --- | --- | --- |"]
    lines += [f"| {n} | {v} | {_mark(ok)} |" for n, v, ok in verdicts] + [""]
    return lines, verdicts


def chart(path, results):
    sus = [r for r in results.get("overload") or [] if r["kind"] == "sustained"]
    if not sus:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in sus:
        ax.plot(range(len(r["useful_by_second"])), r["useful_by_second"], label=r["label"])
    ax.axhline(CAPACITY, color="grey", linestyle=":", label=f"capacity ({CAPACITY:.0f}/s)")
    ax.set_xlabel("second of the run")
    ax.set_ylabel(f"200s answered within {PATIENCE_S:.0f} s, per second")
    ax.set_title(f"Sustained overload: {RATE} requests/s open loop against {CAPACITY:.0f}/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def append_to(out, results):
    """Appends the section to out/results.md and draws out/overload.png (called by bench/run)."""
    lines, _ = section(results)
    if not lines:
        return
    with open(os.path.join(out, "results.md"), "a") as f:
        f.write("\n## 5. Sustained overload (issue 13)\n\n![useful goodput per second](overload.png)\n\n")
        f.write("\n".join(lines) + "\n")
    chart(os.path.join(out, "overload.png"), results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "gen":
        gen_main(sys.argv[2:])
    else:
        sys.exit(__doc__)
