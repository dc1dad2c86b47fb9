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


def latency_section(meta, results, targets, g):
    rows = results["latency"]
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    lines += ["| client connections | path | p50 | p99 | non-200 | p50 added by anteroom | target |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for mode in ("no-keepalive", "keepalive"):
        direct = {r["round"]: r for r in rows if r["mode"] == mode and r["contender"] == "gunicorn-direct"}
        ant = {r["round"]: r for r in rows if r["mode"] == mode and r["contender"] == "ant-gunicorn"}
        diffs = [(ant[k]["p50_ms"] - direct[k]["p50_ms"]) * 1000 for k in ant if k in direct]
        diff = med(diffs)
        for rs, is_ant in ((list(direct.values()), False), (list(ant.values()), True)):
            if not rs:
                continue
            target = ""
            added = ""
            if is_ant and diff is not None:
                added = f"{diff:+.0f} µs"
                if mode == "no-keepalive":
                    ok = diff <= targets["latency_p50_us"]
                    target = f"≤ {targets['latency_p50_us']:.0f} µs: {mark(ok)}"
                    verdicts.append((f"added latency p50 ≤ {targets['latency_p50_us']:.0f} µs "
                                     "(same client connections)", f"{diff:+.0f} µs", ok))
                else:
                    target = "(client keeps its connection to anteroom; gunicorn's sync worker closes "\
                             "every connection, so the direct row pays a TCP handshake per request)"
            conn = "new connection per request" if mode == "no-keepalive" else "keep-alive"
            lines.append(f"| {conn} | {rs[0]['label']} | {fmt(med([r['p50_ms'] * 1000 for r in rs]))} µs"
                         f" | {fmt(med([r['p99_ms'] * 1000 for r in rs]))} µs | "
                         f"{fmt(med([r['requests'] - r['ok'] for r in rs]))} | {added} | {target} |")
    lines += ["",
              f"One gunicorn sync worker, trivial app, {meta['params']['latency_n']} sequential requests "
              f"(concurrency {g['LATENCY_CONCURRENCY']}). **p50 added** = anteroom's p50 − direct p50 in "
              "the same round, median over rounds. The target is read on the first pair, where the client "
              "opens a new TCP connection per request on both paths (`oha --disable-keepalive`), so the "
              "only difference is the anteroom hop (its accept, parse, queue, unix-socket hop to the "
              "worker and back).", ""]
    return lines, verdicts


def scale_section(meta, results, targets, g):
    rows = results["scale"]
    lines, verdicts = [], []
    if not rows:
        return lines, verdicts
    cl = [r["client"] for r in rows]
    hwm = med([r["vmhwm_mib"] for r in rows])
    worst_errors = max(r["errors"] for r in rows)
    ok = hwm < targets["scale_rss_mib"] and worst_errors == 0
    reqs = med([c["requests"] for c in cl])
    cpu = med([r["cpu_s"] for r in rows])
    idle = med([c.get("anteroom_rss_idle_kib") for c in cl])
    lines += ["| connections held (client / anteroom fds) | requests | 200s | errors (worst round) | "
              "peak RSS (VmHWM) | RSS before | RSS with all connections idle | anteroom CPU | "
              "CPU per request | p50 | p99 | target |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
              f"| {fmt(med([c['established'] for c in cl]))} / "
              f"{fmt(med([c['anteroom_fds_held'] for c in cl]))} | {fmt(reqs)} | "
              f"{fmt(med([c['ok'] for c in cl]))} | {worst_errors} | {hwm:.1f} MiB | "
              f"{med([r['rss_before_mib'] for r in rows]):.1f} MiB | "
              f"{fmt(idle / 1024 if idle else None, '.1f')} MiB | {cpu:.2f} s | "
              f"{cpu / reqs * 1e6:.0f} µs | {fmt(med([c['p50_ms'] for c in cl]))} ms | "
              f"{fmt(med([c['p99_ms'] for c in cl]))} ms | < {targets['scale_rss_mib']:.0f} MiB, no "
              f"errors: {mark(ok)} |", ""]
    verdicts.append((f"{g['SCALE_CONNECTIONS']} connections: RSS < {targets['scale_rss_mib']:.0f} MiB, "
                     "no errors", f"{hwm:.1f} MiB, {worst_errors} errors", ok))
    lines += [
        f"anteroom with {g['SCALE_WORKERS']} workers (its built-in demo app, `/sleep?ms={g['SCALE_MS']}`), "
        f"`--max-queue {g['SCALE_MAX_QUEUE']}` (the default, 4096, would refuse the rest with 503 by "
        f"design), listening on TCP. `bench/scale_client.py` opens {g['SCALE_CONNECTIONS']} keep-alive "
        "connections and holds them (the anteroom fd count is taken while all are idle), then "
        f"{meta['params']['scale_waves']} time(s) sends one request on every connection at the same "
        "moment, so that all of them are in anteroom at once, nearly all waiting in its queue. **RSS with "
        "all connections idle** = `VmRSS` once every connection is open and before any request. **peak "
        "RSS** = `VmHWM` of the anteroom process (not its workers) from /proc/PID/status at the end; "
        "**CPU** = its utime + stime over the load; errors = connections not established + requests "
        "without a response + non-200 responses (+1 if anteroom died).",
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
    for r in results["scale"]:
        c = r["client"]
        lines.append(f"| scale | {r['round']} | anteroom demo, {c['established']} conns, VmHWM "
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
        f"Written by `bench/run{' --quick' if meta['mode'] == 'quick' else ''}` "
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
    for k in ("nginx", "php-cgi", "php-fpm", "perl", "Starman", "Plack", "FCGI (Perl)", "python",
              "gunicorn", "flup", "oha"):
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
        f"{p['scale_waves']} wave(s) of one request per connection, same namespace as overhead.",
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
                      ("2b. Latency added by anteroom", latency_section),
                      ("3. Scale: 10,000 connections", scale_section),
                      ("4. Faults and abuse", faults_section)):
        lines, v = fn(meta, results, targets, g)
        if lines:
            sections += [f"## {title}", ""] + lines
            verdicts += v
    summary = ["## Targets", "", "| target | result | |", "| --- | --- | --- |"]
    for name, value, ok in verdicts:
        summary.append(f"| {name} | {value} | {mark(ok)} |")
    summary.append("")
    text = "\n".join(header(meta, g) + summary + sections + appendix(results))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "targets": targets, "results": results}, f, indent=1, default=str)
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
