#!/usr/bin/env python3
"""The scale scenario's client: holds N keep-alive connections open to one HTTP server at once.

1. Opens --connections TCP connections (at most --connect-parallel handshakes in flight, so that the
   server's listen backlog is not what is measured) and keeps every one open.
2. Counts the server's open file descriptors (--pid) while all of them are held and idle.
3. --waves times: sends one request on every connection at the same moment and reads every response, so
   that all N requests are in the server at once (most of them waiting in its queue).

With --idle (the idle-connection scenario), instead of waves: the servers' RSS is read before any
connection (the baseline), with all of them open and silent ("never spoke"), and again once every
connection has sent one request (at most --request-concurrency at a time, a steady load rather than a
burst), read its response and gone quiet, kept alive ("after one request").

--pid may be given more than once (nginx's master and workers): RSS and descriptors are summed over them.
Prints one JSON line with counts and latencies. Bounded: every step has a timeout.
"""
import argparse
import asyncio
import json
import os
import resource
import sys
import time
from urllib.parse import urlsplit


async def open_one(host, port, sem, timeout):
    async with sem:
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)


async def request(conn, raw, timeout):
    reader, writer = conn
    t0 = time.perf_counter()
    writer.write(raw)
    await writer.drain()

    async def read_response():
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        if length:
            await reader.readexactly(length)
        return status

    status = await asyncio.wait_for(read_response(), timeout)
    return status, time.perf_counter() - t0


def vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def rss(pids):
    """VmRSS in KiB, summed over pids."""
    return sum(vm(pid, "VmRSS") or 0 for pid in pids)


def fds(pids):
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


async def settle(pids, limit=30.0):
    """Waits until the servers' descriptor count stops growing (every connection accepted), at least 1 s
    and at most `limit` s, so that a measurement does not race the accept loop."""
    await asyncio.sleep(1.0)
    if not pids:
        return
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        try:
            now = fds(pids)
        except OSError:
            return
        if now == last:
            return
        last = now
        await asyncio.sleep(0.5)


SAMPLES = []


async def sample_rss(pids):
    """The servers' VmRSS every 100 ms while the waves run (VmHWM gives only the peak)."""
    while True:
        try:
            SAMPLES.append(rss(pids))
        except OSError:
            return SAMPLES
        await asyncio.sleep(0.1)


async def one_request_each(conns, raw, concurrency, timeout):
    """One request on every connection, at most `concurrency` at a time; the connections stay open."""
    sem = asyncio.Semaphore(concurrency)

    async def one(c):
        async with sem:
            return await request(c, raw, timeout)

    return await asyncio.gather(*(one(c) for c in conns), return_exceptions=True)


def tally(res, statuses, latencies, request_errors):
    for r in res:
        if isinstance(r, BaseException):
            name = type(r).__name__
            request_errors[name] = request_errors.get(name, 0) + 1
        else:
            statuses[r[0]] = statuses.get(r[0], 0) + 1
            if r[0] == 200:
                latencies.append(r[1])


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(args):
    u = urlsplit(args.url)
    host, port = u.hostname, u.port or 80
    target = u.path + ("?" + u.query if u.query else "")
    raw = f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode()

    rss_baseline = rss(args.pid) if args.pid else None
    sem = asyncio.Semaphore(args.connect_parallel)
    t0 = time.perf_counter()
    opened = await asyncio.gather(*(open_one(host, port, sem, args.timeout)
                                    for _ in range(args.connections)), return_exceptions=True)
    conns = [c for c in opened if not isinstance(c, BaseException)]
    connect_errors = {}
    for c in opened:
        if isinstance(c, BaseException):
            connect_errors[type(c).__name__] = connect_errors.get(type(c).__name__, 0) + 1
    connect_s = time.perf_counter() - t0

    # All held and idle: let the server accept the last ones, then count its descriptors.
    pids = args.pid or []
    await settle(pids)
    fds_held = rss_idle = None
    if pids:
        try:
            fds_held = fds(pids)
            rss_idle = rss(pids)
        except OSError:
            pass
    sampler = asyncio.create_task(sample_rss(pids)) if pids and not args.idle else None

    statuses, latencies, request_errors, wave_s = {}, [], {}, []
    idle = {}
    if args.idle:
        w0 = time.perf_counter()
        tally(await one_request_each(conns, raw, args.request_concurrency, args.timeout), statuses,
              latencies, request_errors)
        wave_s.append(time.perf_counter() - w0)
        await settle(pids)
        closed = sum(1 for r, _ in conns if r.at_eof())
        if closed:
            request_errors["closed by the server while idle"] = closed
        idle = {"rss_baseline_kib": rss_baseline, "rss_idle_kib": rss_idle, "fds_idle": fds_held,
                "rss_after_request_kib": rss(pids) if pids else None,
                "fds_after_request": fds(pids) if pids else None, "closed_while_idle": closed}
    for _ in range(args.waves):
        w0 = time.perf_counter()
        live = [c for c in conns if not c[1].is_closing()]
        tally(await asyncio.gather(*(request(c, raw, args.timeout) for c in live),
                                   return_exceptions=True), statuses, latencies, request_errors)
        wave_s.append(time.perf_counter() - w0)
        if len(live) < len(conns):
            request_errors["connection closed between waves"] = (
                request_errors.get("connection closed between waves", 0) + len(conns) - len(live))

    rss_samples = []
    if sampler:
        sampler.cancel()
        try:
            rss_samples = await sampler
        except asyncio.CancelledError:
            rss_samples = SAMPLES
    rss_peak = max(rss_samples, default=None)
    for _, w in conns:
        w.close()
    ok = statuses.get(200, 0)
    print(json.dumps({
        "connections": args.connections,
        "established": len(conns),
        "connect_errors": sum(connect_errors.values()),
        "connect_error_kinds": connect_errors,
        "connect_s": round(connect_s, 3),
        # "anteroom_": the names of the first version; they are the measured server's (--pid), whichever.
        "anteroom_fds_held": fds_held,
        "anteroom_rss_idle_kib": rss_idle,
        "anteroom_rss_peak_sampled_kib": rss_peak,
        "waves": args.waves,
        "wave_s": [round(w, 3) for w in wave_s],
        "requests": (args.waves + (1 if args.idle else 0)) * len(conns),
        "ok": ok,
        "statuses": {str(k): v for k, v in statuses.items()},
        "non_200": sum(v for k, v in statuses.items() if k != 200),
        "request_errors": sum(request_errors.values()),
        "request_error_kinds": request_errors,
        "p50_ms": round(pct(latencies, 0.5) * 1000, 1) if latencies else None,
        "p99_ms": round(pct(latencies, 0.99) * 1000, 1) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        **idle,
    }))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--connect-parallel", type=int, default=256)
    ap.add_argument("--waves", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--pid", type=int, action="append", help="a server process to measure (repeatable)")
    ap.add_argument("--idle", action="store_true",
                    help="measure idle connections: never spoke, then after one request each")
    ap.add_argument("--request-concurrency", type=int, default=64, help="with --idle")
    args = ap.parse_args()
    # Up to the hard limit (raising it needs CAP_SYS_RESOURCE): the harness sizes --connections to fit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 64 if hard == resource.RLIM_INFINITY else min(args.connections + 64, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    sys.exit(asyncio.run(main(args)))
