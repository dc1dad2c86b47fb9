#!/usr/bin/env python3
"""Many anteroom hosts behind one HAProxy (issue 15): the `multihost` scenario of bench/run, and the engine of
tests/multihost.rs (its short form).

Network namespaces, made and deleted here with names unique to the run: `lb` holds HAProxy (deploy/haproxy.cfg,
its variables set) and the load generator; `host1..3` each run anteroom with 3 workers of a 50 ms FastCGI app
(tests/fixtures/multihost_app.py), joined to `lb` by a veth pair each (10.215.N.1 <-> 10.215.N.2):

                          +-- veth --> host1: anteroom (8000 HTTP, 8001 admin, 8002 agent) + 3 workers
    lb: load -> HAProxy --+-- veth --> host2: ...
                          +-- veth --> host3: ...

Every scenario runs under a steady open-loop load of 80% of the cluster's capacity (3 hosts x 3 workers /
50 ms = 180 requests/s), once with HAProxy's round-robin and plain health checks (`option httpchk GET
/health/ready`, the agent-check line removed) and once with the agent:
  crash    host3 is reloaded (SIGHUP) onto a broken app whose workers exit at start
  broken   host3 is restarted (SIGTERM, a fresh start) onto that broken app: every slot crash-loops
  restart  host2 is stopped (SIGTERM, --drain-delay 2) and started afresh
  slow     host3's workers take 10x longer from the start
  burst    5x the capacity for a few seconds on top of the steady load
Measured: requests, 200s, 5xx by code, errors (no answer), each host's share of what HAProxy sent (its stats
socket), the lowest weight HAProxy gave the host the scenario is about.

    multihost.py [--seconds S] [--burst-seconds B] [--scenarios crash,restart,slow,burst] [--json OUT]
    multihost.py gen PLAN_JSON OUT  (the load generator, run inside the lb namespace)

Needs root (ip netns), haproxy, flup, and target/release/anteroom (or --anteroom).
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
APP = os.path.join(ROOT, "tests", "fixtures", "multihost_app.py")
CFG = os.path.join(ROOT, "deploy", "haproxy.cfg")
NGINX_CFG = os.path.join(ROOT, "deploy", "nginx-upstream.conf")
BALANCERS = {"plain": "haproxy round-robin, health checks", "agent": "haproxy + agent",
             "nginx": "nginx proxy_next_upstream"}

HOSTS = 3
WORKERS = 3
SERVICE_MS = 50
CAPACITY = HOSTS * WORKERS * 1000 / SERVICE_MS  # requests per second
STEADY = 0.8 * CAPACITY
BURST = 5 * CAPACITY
SLOW_FACTOR = 10
DRAIN_DELAY = 2
CLIENT_TIMEOUT = 60
FRONT = "127.0.0.1:8080"
SCENARIOS = ["crash", "broken", "restart", "slow", "burst"]
TARGETS = {
    "crash": "zero failed requests with the agent",
    "broken": "zero failed requests with the agent",
    "restart": "zero failed requests with the agent",
    "slow": "the slow host's share with the agent < 1/3 of its round-robin share",
    "burst": "zero 502s, every request answered",
}


def log(msg):
    print(f"[multihost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# The load generator (runs inside the lb namespace): one connection per request at its scheduled time.

async def _one(host, port, at, t0, out):
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + at - loop.time()))
    status = 0
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), CLIENT_TIMEOUT)
        w.write(b"GET / HTTP/1.1\r\nHost: multihost\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(r.readline(), CLIENT_TIMEOUT)
        status = int(line.split()[1])
        await asyncio.wait_for(r.read(), 10)
        w.close()
    except asyncio.TimeoutError:
        status = -1
    except (OSError, ValueError, IndexError):
        status = -2
    out.append((round(at, 3), round(loop.time() - t0 - at, 4), status))


async def _generate(plan):
    """plan: {"front": "ip:port", "phases": [[start_s, seconds, rate], ...]}."""
    host, port = plan["front"].rsplit(":", 1)
    out, tasks = [], []
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.1
    for start, seconds, rate in plan["phases"]:
        tasks += [_one(host, int(port), start + i / rate, t0, out) for i in range(int(rate * seconds))]
    await asyncio.gather(*tasks)
    return out


def gen_main(argv):
    """gen PLAN_JSON OUT_FILE: to a file, since the parent reads nothing until the generator is done."""
    # A burst that a balancer holds keeps more connections open than the usual soft limit of 1024 allows:
    # each would fail with EMFILE and be counted as unanswered (seen once in the short form, on a loaded
    # machine: 116 of them).
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = asyncio.run(_generate(json.loads(argv[0])))
    with open(argv[1], "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------------------
# The namespaces and processes of one run

def sh(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def remove_stale_netns():
    """Deletes the namespaces of a run that was SIGKILLed (its pid is in their names)."""
    import re
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(r"(mh(\d+)(lb|h\d))\b", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            sh("ip", "netns", "del", m.group(1), check=False)


class Cluster:
    def __init__(self, anteroom, tag=None):
        self.anteroom = anteroom
        self.tag = tag or str(os.getpid())
        self.lb = f"mh{self.tag}lb"
        self.ns = [f"mh{self.tag}h{i}" for i in range(1, HOSTS + 1)]
        self.ips = [f"10.215.{i}.2" for i in range(1, HOSTS + 1)]
        self.dir = tempfile.mkdtemp(prefix=f"multihost{self.tag}-")
        self.procs = []  # every process started here, stopped by pid
        self.hosts = [None] * HOSTS
        self.haproxy = None
        self.seq = 0
        self.queue_timeout = 30
        self.balancer = None

    def path(self, name):
        return os.path.join(self.dir, name)

    def setup(self):
        remove_stale_netns()
        for ns in [self.lb] + self.ns:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.ns, 1):
            a, b = f"mh{self.tag}l{i}", f"mh{self.tag}v{i}"
            sh("ip", "link", "add", a, "netns", self.lb, "type", "veth", "peer", "name", b, "netns", ns)
            sh("ip", "-n", self.lb, "addr", "add", f"10.215.{i}.1/24", "dev", a)
            sh("ip", "-n", ns, "addr", "add", f"10.215.{i}.2/24", "dev", b)
            sh("ip", "-n", self.lb, "link", "set", a, "up")
            sh("ip", "-n", ns, "link", "set", b, "up")
        # The generator opens thousands of connections a burst: room for them.
        sh("ip", "netns", "exec", self.lb, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000",
           check=False)
        sh("ip", "netns", "exec", self.lb, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", check=False)

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in [self.lb] + self.ns:
            # Anything left in the namespace (workers of a killed anteroom) was started by this run.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def spawn(self, ns, cmd, logname, env=None):
        self.seq += 1
        logf = open(self.path(f"{self.seq:03}-{logname}.log"), "w")
        p = subprocess.Popen(["ip", "netns", "exec", ns] + cmd, stdout=subprocess.DEVNULL, stderr=logf,
                             env=dict(os.environ, **(env or {})), start_new_session=True)
        self.procs.append(p)
        return p

    def state_dir(self, i):
        d = self.path(f"host{i + 1}-state")
        os.makedirs(d, exist_ok=True)
        return d

    def start_host(self, i):
        ip = self.ips[i]
        cmd = [self.anteroom, "--listen", f"{ip}:8000", "--admin", f"{ip}:8001", "--agent", f"{ip}:8002",
               "--workers", str(WORKERS), "--drain-delay", str(DRAIN_DELAY),
               "--queue-timeout", str(self.queue_timeout), "--",
               sys.executable, APP]
        self.hosts[i] = self.spawn(self.ns[i], cmd, f"host{i + 1}",
                                   {"MH_STATE": self.state_dir(i), "MH_MS": str(SERVICE_MS),
                                    "ANTEROOM_LOG": "info"})

    def stop_host(self, i, sig=signal.SIGTERM, wait=30):
        p = self.hosts[i]
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def start_haproxy(self, agent):
        with open(CFG) as f:
            lines = f.read().splitlines()
        cfg = "\n".join(l for l in lines if agent or "agent-check" not in l) + "\n"
        if agent != ("agent-check" in cfg):
            raise RuntimeError("deploy/haproxy.cfg has no agent-check line")
        path = self.path(f"haproxy-{'agent' if agent else 'plain'}.cfg")
        with open(path, "w") as f:
            f.write(cfg)
        self.stats = self.path("stats.sock")
        env = {"STATS_SOCKET": self.stats, "FRONT": FRONT}
        env.update({f"HOST{i + 1}": ip for i, ip in enumerate(self.ips)})
        self.haproxy = self.spawn(self.lb, ["haproxy", "-db", "-f", path], "haproxy", env)
        self.balancer = "agent" if agent else "plain"

    def start_nginx(self):
        with open(NGINX_CFG) as f:
            conf = f.read()
        for i, ip in enumerate(self.ips, 1):
            conf = conf.replace(f"10.0.0.1{i}:", f"{ip}:")
        conf = conf.replace("listen 80;", f"listen {FRONT};")
        prefix = self.path("nginx")
        os.makedirs(prefix, exist_ok=True)
        self.nginx_log = os.path.join(prefix, "upstreams.log")
        if os.path.exists(self.nginx_log):
            os.remove(self.nginx_log)
        main = (f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
                f"events {{ worker_connections 8192; }}\n"
                f"http {{\n log_format up '$upstream_addr';\n access_log {self.nginx_log} up;\n"
                f" client_body_temp_path {prefix}; proxy_temp_path {prefix};\n{conf}\n}}\n")
        path = os.path.join(prefix, "nginx.conf")
        with open(path, "w") as f:
            f.write(main)
        self.haproxy = self.spawn(self.lb, ["nginx", "-p", prefix, "-c", path, "-g", "daemon off;"], "nginx")
        self.balancer = "nginx"

    def nginx_counts(self):
        """{host: (attempts, 0, retries, 0)} from the access log's $upstream_addr (every host tried)."""
        out = {f"host{i + 1}": [0, 0, 0, 0] for i in range(HOSTS)}
        by_ip = {f"{ip}:8000": f"host{i + 1}" for i, ip in enumerate(self.ips)}
        try:
            with open(self.nginx_log) as f:
                for line in f:
                    tried = [a.strip() for a in line.replace(" : ", ", ").split(",")]
                    for n, a in enumerate(tried):
                        if a in by_ip:
                            out[by_ip[a]][0] += 1
                            out[by_ip[a]][2] += n > 0
        except OSError:
            pass
        return {h: tuple(v) for h, v in out.items()}

    def stop_haproxy(self):
        if self.haproxy and self.haproxy.poll() is None:
            # nginx's master stops its workers on SIGTERM; SIGKILLed, it would leave them on the port.
            self.haproxy.send_signal(signal.SIGTERM)
            try:
                self.haproxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
        self.haproxy = None

    def command(self, line):
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(self.stats)
        s.sendall(line.encode() + b"\n")
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
        s.close()
        return out.decode()

    def servers(self):
        """{name: (op_state, admin_state, weight)} from `show servers state`."""
        out = {}
        for line in self.command("show servers state app").splitlines():
            f = line.split()
            if len(f) > 8 and not line.startswith("#") and f[3].startswith("host"):
                out[f[3]] = (int(f[5]), int(f[6]), int(f[7]))
        return out

    def counts(self):
        """{host: (sessions, 5xx, retries, redispatches)} from `show stat`."""
        if self.balancer == "nginx":
            return self.nginx_counts()
        text = self.command("show stat")
        head, *rows = [l for l in text.splitlines() if l]
        cols = head.lstrip("# ").split(",")
        ix = {c: cols.index(c) for c in ("pxname", "svname", "stot", "hrsp_5xx", "wretr", "wredis")}
        out = {}
        for r in rows:
            f = r.split(",")
            if f[ix["pxname"]] == "app" and f[ix["svname"]].startswith("host"):
                val = lambda c: int(f[ix[c]] or 0)  # noqa: E731
                out[f[ix["svname"]]] = (val("stot"), val("hrsp_5xx"), val("wretr"), val("wredis"))
        return out

    def wait_all_up(self, agent, timeout=40):
        deadline = time.time() + timeout
        if self.balancer == "nginx":
            # No health checks to watch: every host answers on its own.
            for ip in self.ips:
                while sh("ip", "netns", "exec", self.lb, "curl", "-sf", "-o", "/dev/null", "--max-time", "2",
                         f"http://{ip}:8001/health/ready", check=False).returncode != 0:
                    if time.time() > deadline:
                        raise RuntimeError(f"{ip} not ready")
                    time.sleep(0.2)
            return
        while time.time() < deadline:
            try:
                s = self.servers()
                if len(s) == HOSTS and all(v[0] == 2 and v[1] == 0 and (not agent or v[2] >= 90)
                                           for v in s.values()):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"hosts not all UP in HAProxy: {self.servers()}")

    def generate(self, phases):
        """The generator, started; its records go to the file returned."""
        plan = json.dumps({"front": FRONT, "phases": phases})
        self.seq += 1
        out = self.path(f"{self.seq:03}-records.json")
        errs = open(self.path(f"{self.seq:03}-gen.log"), "w")
        p = subprocess.Popen(["ip", "netns", "exec", self.lb, sys.executable, os.path.abspath(__file__), "gen",
                              plan, out], stdout=subprocess.DEVNULL, stderr=errs)
        return p, out


# ---------------------------------------------------------------------------------------------------
# Scenarios

def run_one(c, scenario, balancer, seconds, burst_seconds):
    """One scenario with one HAProxy configuration, on fresh hosts; returns its measures."""
    for i in range(HOSTS):
        d = c.state_dir(i)
        for f in ("broken", "slow"):
            if os.path.exists(os.path.join(d, f)):
                os.remove(os.path.join(d, f))
    focus = {"crash": 2, "broken": 2, "restart": 1, "slow": 2, "burst": 0}[scenario]
    if scenario == "slow":
        with open(os.path.join(c.state_dir(focus), "slow"), "w") as f:
            f.write(str(SLOW_FACTOR))
    agent = balancer == "agent"
    for i in range(HOSTS):
        c.start_host(i)
    if balancer == "nginx":
        c.start_nginx()
    else:
        c.start_haproxy(agent)
    try:
        c.wait_all_up(agent)
        before = c.counts()
        phases = [[0, seconds, STEADY]]
        if scenario == "burst":
            phases.append([seconds / 3, burst_seconds, BURST])
        gen, records = c.generate(phases)
        t0 = time.time()
        min_weight, states, acted = 100, set(), False
        while gen.poll() is None:
            elapsed = time.time() - t0
            if not acted and elapsed >= seconds / 4:
                acted = True
                act(c, scenario, focus)
            try:
                st = c.servers().get(f"host{focus + 1}") if balancer != "nginx" else None
                if st and elapsed < seconds:
                    min_weight = min(min_weight, st[2] if st[0] == 2 and not st[1] else 0)
                    states.add("UP" if st[0] == 2 else "DOWN")
                    if st[1] & 0x18:
                        states.add("DRAIN")
            except OSError:
                pass
            time.sleep(0.25)
        if gen.wait() != 0:
            raise RuntimeError(f"load generator failed (exit {gen.returncode})")
        with open(records) as f:
            recs = json.load(f)
        after = c.counts()
    finally:
        c.stop_haproxy()
        for i in range(HOSTS):
            c.stop_host(i)
    return summarize(scenario, balancer, recs, before, after, focus, min_weight, sorted(states))


def act(c, scenario, focus):
    if scenario == "crash":
        open(os.path.join(c.state_dir(focus), "broken"), "w").close()
        c.hosts[focus].send_signal(signal.SIGHUP)
        log(f"crash: host{focus + 1} reloaded onto a broken app")
    elif scenario == "broken":
        log(f"broken: host{focus + 1} restarted onto a broken app")
        c.stop_host(focus)
        open(os.path.join(c.state_dir(focus), "broken"), "w").close()
        c.start_host(focus)
    elif scenario == "restart":
        log(f"restart: SIGTERM to host{focus + 1} (--drain-delay {DRAIN_DELAY})")
        c.stop_host(focus)
        c.start_host(focus)
        log(f"restart: host{focus + 1} started afresh")


def summarize(scenario, balancer, recs, before, after, focus, min_weight, states):
    codes = {}
    for _, _, st in recs:
        codes[str(st)] = codes.get(str(st), 0) + 1
    sent = {h: after[h][0] - before.get(h, (0,))[0] for h in after}
    total = sum(sent.values()) or 1
    ok = codes.get("200", 0)
    lat = sorted(l for _, l, st in recs if st == 200)
    return {
        "scenario": scenario,
        "balancer": BALANCERS[balancer],
        "agent": balancer == "agent",
        "kind": balancer,
        "requests": len(recs),
        "ok": ok,
        "codes": codes,
        "failed": len(recs) - ok,
        "s5xx": {k: v for k, v in codes.items() if k.startswith("5")},
        "errors": sum(v for k, v in codes.items() if int(k) <= 0),
        "share": {h: round(n / total, 4) for h, n in sorted(sent.items())},
        "retries": sum(after[h][2] - before.get(h, (0, 0, 0, 0))[2] for h in after),
        "redispatches": sum(after[h][3] - before.get(h, (0, 0, 0, 0))[3] for h in after),
        "focus": f"host{focus + 1}",
        "focus_min_weight": min_weight,
        "focus_states": states,
        "p50_s": lat[len(lat) // 2] if lat else None,
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
    }


def verdicts(results):
    """The targets, judged: {scenario: (ok, measured)}."""
    by = {(r["scenario"], r["agent"]): r for r in results if r.get("kind") != "nginx"}
    out = {}
    for s in SCENARIOS:
        a, p = by.get((s, True)), by.get((s, False))
        if not a:
            continue
        if s in ("crash", "broken", "restart"):
            out[s] = (a["failed"] == 0, f"{a['failed']} failed of {a['requests']}")
        elif s == "slow" and p:
            sa, sp = a["share"].get(a["focus"], 0), p["share"].get(p["focus"], 0)
            out[s] = (sp > 0 and sa < sp / 3, f"{a['focus']} share {sa:.1%} with the agent, {sp:.1%} round-robin")
        elif s == "burst":
            out[s] = (a["codes"].get("502", 0) == 0 and a["errors"] == 0,
                      f"{a['codes'].get('502', 0)} 502s, {a['errors']} unanswered of {a['requests']}")
    return out


def table(results):
    lines = ["| scenario | balancer | requests | 200 | 5xx | no answer | share host1/2/3 | lowest weight of the host concerned | p99 (s) |",
             "| --- | --- | ---: | ---: | --- | ---: | --- | --- | ---: |"]
    for r in results:
        s5 = ", ".join(f"{k}: {v}" for k, v in sorted(r["s5xx"].items())) or "0"
        share = " / ".join(f"{v:.0%}" for v in r["share"].values())
        w = f"{r['focus']}: {r['focus_min_weight']}% ({', '.join(r['focus_states'])})" if r["agent"] else \
            f"{r['focus']}: ({', '.join(r['focus_states'])})" if r["focus_states"] else "-"
        p99 = f"{r['p99_s']:.2f}" if r["p99_s"] is not None else "-"
        lines.append(f"| {r['scenario']} | {r['balancer']} | {r['requests']} | {r['ok']} | {s5} | {r['errors']} "
                     f"| {share} | {w} | {p99} |")
    return "\n".join(lines)


def section(doc):
    """Markdown lines for bench/run's results.md."""
    if not doc:
        return []
    p = doc["params"]
    lines = [f"{p['hosts']} hosts x {p['workers']} workers x {p['service_ms']} ms (capacity "
             f"{p['capacity_rps']:.0f}/s) behind HAProxy (deploy/haproxy.cfg), {p['steady_rps']:.0f} requests/s "
             f"open loop for {p['seconds']:.0f} s per run; burst {p['burst_rps']:.0f}/s for {p['burst_seconds']:.0f} s; "
             f"slow host x{p['slow_factor']}; --drain-delay {p['drain_delay_s']}; --queue-timeout "
             f"{p.get('queue_timeout_s', 30):g}.", "", table(doc["results"]), ""]
    for k, v in doc["verdicts"].items():
        lines.append(f"- {k}: {'met' if v['ok'] else '**missed**'}: {v['measured']} (target: {v['target']})")
    return lines


def append_to(out, doc):
    lines = section(doc)
    if lines:
        with open(os.path.join(out, "results.md"), "a") as f:
            f.write("\n## 6. Many hosts behind HAProxy (issue 15)\n\n" + "\n".join(lines) + "\n")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "gen":
        return gen_main(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20, help="steady load per scenario")
    ap.add_argument("--burst-seconds", type=float, default=5)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--anteroom", default=os.path.join(ROOT, "target", "release", "anteroom"))
    ap.add_argument("--queue-timeout", type=float, default=30,
                    help="anteroom's --queue-timeout on every host (the short form lowers it: a slow host's "
                         "queue under round-robin is then worked off sooner)")
    ap.add_argument("--balancers", default="plain,agent",
                    help="plain (HAProxy, health checks), agent (HAProxy + agent), nginx")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("multihost.py needs root (ip netns)")
    for tool in ("haproxy", "ip"):
        if not shutil.which(tool):
            sys.exit(f"multihost.py needs {tool} (scripts/test installs it)")
    c = Cluster(os.path.abspath(args.anteroom))
    c.queue_timeout = args.queue_timeout
    results = []

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        c.setup()
        for s in [x.strip() for x in args.scenarios.split(",") if x.strip()]:
            if s not in SCENARIOS:
                sys.exit(f"unknown scenario {s}")
            for b in [x.strip() for x in args.balancers.split(",") if x.strip()]:
                if b not in BALANCERS:
                    sys.exit(f"unknown balancer {b}")
                log(f"{s}: {BALANCERS[b]}")
                r = run_one(c, s, b, args.seconds, args.burst_seconds)
                log(f"{s}: {r['requests']} requests, codes {r['codes']}, share {r['share']}, "
                    f"{r['focus']} lowest weight {r['focus_min_weight']} {r['focus_states']}")
                results.append(r)
                if args.json:
                    # What is measured so far survives a later failure.
                    with open(args.json + ".partial", "w") as f:
                        json.dump(results, f, indent=1)
    except BaseException:
        for f in sorted(os.listdir(c.dir)):
            if f.endswith(".log"):
                with open(c.path(f)) as fh:
                    tail = fh.read()[-1500:]
                log(f"--- {f} (tail)\n{tail}")
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        c.cleanup()
    doc = {"params": {"hosts": HOSTS, "workers": WORKERS, "service_ms": SERVICE_MS, "capacity_rps": CAPACITY,
                      "steady_rps": STEADY, "burst_rps": BURST, "seconds": args.seconds,
                      "burst_seconds": args.burst_seconds, "slow_factor": SLOW_FACTOR,
                      "drain_delay_s": DRAIN_DELAY, "queue_timeout_s": args.queue_timeout},
           "results": results,
           "verdicts": {k: {"ok": v[0], "measured": v[1], "target": TARGETS[k]}
                        for k, v in verdicts(results).items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(table(results))
    for k, v in doc["verdicts"].items():
        print(f"{k}: {'ok' if v['ok'] else 'MISSED'}: {v['measured']} (target: {v['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
