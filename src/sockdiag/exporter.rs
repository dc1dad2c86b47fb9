//! `anteroom sockets --serve ADDR`: every listening socket's accept queue as Prometheus metrics, whatever
//! server owns it, with the highest queue seen since the previous scrape.
//!
//! A queue that fills for 50 ms is invisible to a scrape every 15 s, and to `--watch 1` too: by the time
//! anyone looks it has drained, and all that is left is the machine-wide `ListenOverflows` counter, which
//! says a queue overflowed but not which one, nor how close the others came. So a sampler thread reads every
//! listening socket's queue often (every 10 ms by default, one netlink dump per socket kind, about what `ss
//! -lnt` costs), and keeps the highest value seen per socket; a scrape takes one more sample, reports the
//! highest and starts a new period.
//! With more than one Prometheus scraping the same exporter, each sees the highest since *any* scrape.
//!
//! Series are keyed by kind and local address, so they stay as many as the listening sockets: sockets
//! sharing an address (`SO_REUSEPORT`, one per nginx worker) add up into one series, their queues and
//! backlogs summed, since together they are that address's queue. The owning process (name and pid, the
//! lowest pid holding the socket, usually the server's master) is read from `/proc` at scrape time, once
//! per new socket.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::cli::OwnerCache;
use super::netlink::{DiagSocket, Family};
use super::{Kind, ListenSocket, SockDiagError, SocketsArgs};

/// Prometheus' text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One series: a listening address of one kind.
type Key = (Kind, String);

/// What the sampler has seen since the last scrape.
#[derive(Debug, Default)]
struct Peaks {
    /// The latest sample, filtered, one entry per socket.
    latest: Vec<ListenSocket>,
    /// The highest summed queue per address since the last scrape.
    max: HashMap<Key, u32>,
    samples: u64,
    failures: u64,
}

impl Peaks {
    fn record(&mut self, sockets: Vec<ListenSocket>) {
        for (key, (queued, _)) in totals(&sockets) {
            let m = self.max.entry(key).or_insert(0);
            *m = (*m).max(queued);
        }
        self.latest = sockets;
        self.samples += 1;
    }

    /// The sockets now and the highest queue of each since the last call, which starts a new period at
    /// the queues of now.
    fn take(&mut self) -> (Vec<ListenSocket>, HashMap<Key, u32>, u64, u64) {
        let now: HashMap<Key, u32> = totals(&self.latest)
            .into_iter()
            .map(|(k, (q, _))| (k, q))
            .collect();
        let max = std::mem::replace(&mut self.max, now);
        (self.latest.clone(), max, self.samples, self.failures)
    }
}

/// Queue and backlog per address, summed over the sockets sharing it.
fn totals(sockets: &[ListenSocket]) -> BTreeMap<Key, (u32, u32)> {
    let mut out: BTreeMap<Key, (u32, u32)> = BTreeMap::new();
    for s in sockets {
        let t = out.entry((s.kind, s.local.clone())).or_default();
        t.0 = t.0.saturating_add(s.queued);
        t.1 = t.1.saturating_add(s.backlog);
    }
    out
}

/// Reads the queues of the sockets `args` selects, every `every`, from one netlink socket kept open.
struct Sampler {
    diag: DiagSocket,
    args: SocketsArgs,
    seq: u32,
}

impl Sampler {
    fn sample(&mut self) -> Result<Vec<ListenSocket>, SockDiagError> {
        let mut all = Vec::new();
        if self.args.tcp || !self.args.unix {
            for family in [Family::V4, Family::V6] {
                self.seq = self.seq.wrapping_add(1);
                all.extend(self.diag.dump_tcp(family, self.seq)?);
            }
        }
        if self.args.unix || !self.args.tcp {
            self.seq = self.seq.wrapping_add(1);
            all.extend(self.diag.dump_unix(self.seq)?);
        }
        all.retain(|s| self.args.wants(s));
        Ok(all)
    }

    /// Samples until the process ends. A failed sample is counted and skipped: one bad dump must not
    /// stop the exporter.
    fn run(sampler: &Mutex<Sampler>, every: Duration, peaks: &Mutex<Peaks>) {
        let mut next = Instant::now();
        loop {
            let result = crate::sync::lock(sampler).sample();
            {
                let mut p = crate::sync::lock(peaks);
                match result {
                    Ok(sockets) => p.record(sockets),
                    Err(_) => p.failures += 1,
                }
            }
            next += every;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                // Behind (a slow dump, a busy machine): start again from now rather than catch up.
                next = now;
            }
        }
    }
}

/// What the HTTP side reads.
struct Exporter {
    /// Shared with the sampler thread: a scrape takes a sample of its own, so that the queue of now is
    /// that of now even when a busy machine has kept the thread from running for a while.
    sampler: Arc<Mutex<Sampler>>,
    peaks: Arc<Mutex<Peaks>>,
    owners: Mutex<OwnerCache>,
    every: Duration,
}

impl Exporter {
    fn scrape(&self) -> String {
        let fresh = crate::sync::lock(&self.sampler).sample();
        let (mut sockets, max, samples, failures) = {
            let mut p = crate::sync::lock(&self.peaks);
            match fresh {
                Ok(sockets) => p.record(sockets),
                Err(_) => p.failures += 1,
            }
            p.take()
        };
        crate::sync::lock(&self.owners).attach(&mut sockets);
        render(&Scrape {
            sockets: &sockets,
            max: &max,
            samples,
            failures,
            every: self.every,
            somaxconn: super::somaxconn(),
            counters: super::listen_counters(),
        })
    }
}

/// Everything one scrape shows.
struct Scrape<'a> {
    sockets: &'a [ListenSocket],
    max: &'a HashMap<Key, u32>,
    samples: u64,
    failures: u64,
    every: Duration,
    somaxconn: Option<u32>,
    counters: Option<(u64, u64)>,
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn render(s: &Scrape<'_>) -> String {
    // The owner of an address: the lowest pid found among its sockets.
    let mut owner: HashMap<Key, (u32, String)> = HashMap::new();
    for sock in s.sockets {
        if let Some(pid) = sock.pid {
            let key = (sock.kind, sock.local.clone());
            let name = sock.process.clone().unwrap_or_default();
            owner
                .entry(key)
                .and_modify(|o| {
                    if pid < o.0 {
                        *o = (pid, name.clone());
                    }
                })
                .or_insert((pid, name));
        }
    }
    let totals = totals(s.sockets);
    let labels = |key: &Key| {
        let (pid, process) = owner
            .get(key)
            .map(|(p, n)| (p.to_string(), n.as_str()))
            .unwrap_or_default();
        let local = if key.1.is_empty() { "*" } else { &key.1 };
        format!(
            "{{kind=\"{}\",local=\"{}\",process=\"{}\",pid=\"{pid}\"}}",
            key.0,
            escape(local),
            escape(process)
        )
    };
    let mut out = String::new();
    let every_ms = s.every.as_secs_f64() * 1000.0;
    header(
        &mut out,
        "anteroom_listen_queue",
        "gauge",
        "Connections waiting in the listening socket's accept queue, not yet accepted by its server (latest sample)",
    );
    for (key, (queued, _)) in &totals {
        let _ = writeln!(out, "anteroom_listen_queue{} {queued}", labels(key));
    }
    header(
        &mut out,
        "anteroom_listen_queue_max",
        "gauge",
        &format!(
            "Highest accept queue seen since the previous scrape, sampled every {every_ms} ms"
        ),
    );
    for key in totals.keys() {
        let m = s.max.get(key).copied().unwrap_or(0);
        let _ = writeln!(out, "anteroom_listen_queue_max{} {m}", labels(key));
    }
    header(
        &mut out,
        "anteroom_listen_backlog",
        "gauge",
        "Backlog in effect of the listening socket (what listen(2) asked, after the clamp to net.core.somaxconn)",
    );
    for (key, (_, backlog)) in &totals {
        let _ = writeln!(out, "anteroom_listen_backlog{} {backlog}", labels(key));
    }
    kernel_and_sampler(&mut out, s);
    out
}

/// The machine-wide series, and the sampler's own counts.
fn kernel_and_sampler(out: &mut String, s: &Scrape<'_>) {
    if let Some(n) = s.somaxconn {
        header(
            out,
            "anteroom_kernel_somaxconn",
            "gauge",
            "net.core.somaxconn: the largest listen backlog the kernel grants",
        );
        let _ = writeln!(out, "anteroom_kernel_somaxconn {n}");
    }
    if let Some((overflows, drops)) = s.counters {
        header(
            out,
            "anteroom_kernel_listen_overflows_total",
            "counter",
            "TCP connections the kernel dropped because an accept queue was full (ListenOverflows, whole machine)",
        );
        let _ = writeln!(out, "anteroom_kernel_listen_overflows_total {overflows}");
        header(
            out,
            "anteroom_kernel_listen_drops_total",
            "counter",
            "TCP connections the kernel dropped while listening, for any reason (ListenDrops, whole machine)",
        );
        let _ = writeln!(out, "anteroom_kernel_listen_drops_total {drops}");
    }
    header(
        out,
        "anteroom_listen_samples_total",
        "counter",
        "Samples of the accept queues taken since the exporter started",
    );
    let _ = writeln!(out, "anteroom_listen_samples_total {}", s.samples);
    header(
        out,
        "anteroom_listen_sample_failures_total",
        "counter",
        "Samples that failed (the kernel's dump could not be read), skipped",
    );
    let _ = writeln!(out, "anteroom_listen_sample_failures_total {}", s.failures);
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn route(req: &Request<Incoming>, exporter: &Exporter) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, TEXT_FORMAT, exporter.scrape()),
        "/" => reply(
            StatusCode::OK,
            PLAIN,
            "anteroom sockets: the listen queues of this host are at /metrics\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

/// Samples in a thread of its own and serves `/metrics` on `addr` until the process is stopped.
pub fn serve(args: &SocketsArgs, addr: SocketAddr, every: Duration) -> Result<(), SockDiagError> {
    let mut sampler = Sampler {
        diag: DiagSocket::open()?,
        args: args.clone(),
        seq: 0,
    };
    // The first sample before serving: a kernel that cannot dump fails here, in words, not in a counter.
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    crate::sync::lock(&peaks).record(sampler.sample()?);
    let sampler = Arc::new(Mutex::new(sampler));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SockDiagError::Serve)?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|source| SockDiagError::Bind { addr, source })?;
    {
        let (sampler, peaks) = (sampler.clone(), peaks.clone());
        std::thread::Builder::new()
            .name("sockets-sampler".into())
            .spawn(move || Sampler::run(&sampler, every, &peaks))
            .map_err(SockDiagError::Serve)?;
    }
    eprintln!(
        "anteroom sockets: serving http://{}/metrics, sampling every {} ms",
        listener.local_addr().unwrap_or(addr),
        every.as_secs_f64() * 1000.0
    );
    let exporter = Arc::new(Exporter {
        sampler,
        peaks,
        owners: Mutex::new(OwnerCache::default()),
        every,
    });
    runtime.block_on(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors or the like: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let exporter = exporter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = route(&req, &exporter);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(kind: Kind, local: &str, queued: u32, backlog: u32, inode: u64) -> ListenSocket {
        ListenSocket {
            kind,
            local: local.into(),
            queued,
            backlog,
            inode,
            pid: None,
            process: None,
        }
    }

    #[test]
    fn the_max_is_the_highest_since_the_last_scrape_then_starts_from_now() {
        let mut p = Peaks::default();
        let key = (Kind::Tcp, "127.0.0.1:80".to_string());
        for q in [0, 7, 30, 2, 0] {
            p.record(vec![sock(Kind::Tcp, "127.0.0.1:80", q, 128, 1)]);
        }
        let (now, max, samples, _) = p.take();
        assert_eq!((now[0].queued, max[&key], samples), (0, 30, 5));
        // Nothing sampled since: the new period starts at the queue of now.
        assert_eq!(p.take().1[&key], 0);
        p.record(vec![sock(Kind::Tcp, "127.0.0.1:80", 4, 128, 1)]);
        p.record(vec![sock(Kind::Tcp, "127.0.0.1:80", 1, 128, 1)]);
        assert_eq!(p.take().1[&key], 4);
        assert_eq!(p.take().1[&key], 1);
    }

    #[test]
    fn sockets_sharing_an_address_add_up() {
        let mut p = Peaks::default();
        // Two SO_REUSEPORT sockets, each half full: the address's queue is their sum.
        p.record(vec![
            sock(Kind::Tcp, "0.0.0.0:80", 3, 511, 1),
            sock(Kind::Tcp, "0.0.0.0:80", 4, 511, 2),
            sock(Kind::Tcp6, "[::]:80", 1, 511, 3),
        ]);
        let (sockets, max, _, _) = p.take();
        assert_eq!(max[&(Kind::Tcp, "0.0.0.0:80".to_string())], 7);
        let mut a = sockets[0].clone();
        a.pid = Some(20);
        a.process = Some("nginx".into());
        let mut b = sockets[1].clone();
        b.pid = Some(10);
        b.process = Some("nginx: master".into());
        let text = render(&Scrape {
            sockets: &[a, b, sockets[2].clone()],
            max: &max,
            samples: 1,
            failures: 0,
            every: Duration::from_millis(10),
            somaxconn: Some(4096),
            counters: Some((5, 6)),
        });
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                r#"anteroom_listen_queue{kind="tcp",local="0.0.0.0:80",process="nginx: master",pid="10"} 7"#,
                r#"anteroom_listen_queue{kind="tcp6",local="[::]:80",process="",pid=""} 1"#,
                r#"anteroom_listen_queue_max{kind="tcp",local="0.0.0.0:80",process="nginx: master",pid="10"} 7"#,
                r#"anteroom_listen_queue_max{kind="tcp6",local="[::]:80",process="",pid=""} 1"#,
                r#"anteroom_listen_backlog{kind="tcp",local="0.0.0.0:80",process="nginx: master",pid="10"} 1022"#,
                r#"anteroom_listen_backlog{kind="tcp6",local="[::]:80",process="",pid=""} 511"#,
                "anteroom_kernel_somaxconn 4096",
                "anteroom_kernel_listen_overflows_total 5",
                "anteroom_kernel_listen_drops_total 6",
                "anteroom_listen_samples_total 1",
                "anteroom_listen_sample_failures_total 0",
            ]
        );
        assert!(
            text.contains("# TYPE anteroom_listen_queue_max gauge\n"),
            "{text}"
        );
        assert!(text.contains("sampled every 10 ms"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"/run/a"b\c"#), r#"/run/a\"b\\c"#);
        assert_eq!(escape("@x\ny"), "@x\\ny");
        let s = sock(Kind::Unix, "", 0, 5, 1);
        let text = render(&Scrape {
            sockets: &[s],
            max: &HashMap::new(),
            samples: 0,
            failures: 0,
            every: Duration::from_millis(10),
            somaxconn: None,
            counters: None,
        });
        assert!(
            text.contains(
                r#"anteroom_listen_queue_max{kind="unix",local="*",process="",pid=""} 0"#
            ),
            "{text}"
        );
        assert!(!text.contains("overflows"), "{text}");
    }
}
