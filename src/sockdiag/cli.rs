//! `anteroom sockets`: the table, the JSON, and the watch loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use super::{procfs, Kind, ListenSocket, SockDiagError};

/// Samples kept per socket in `--watch`: a sparkline short enough to sit beside a long unix path.
const HISTORY: usize = 20;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

pub use crate::config::SocketsArgs;

impl SocketsArgs {
    pub(super) fn wants(&self, s: &ListenSocket) -> bool {
        let kind_ok = match s.kind {
            Kind::Tcp | Kind::Tcp6 => self.tcp || !self.unix,
            Kind::Unix => self.unix || !self.tcp,
        };
        if !kind_ok {
            return false;
        }
        if self.port.is_empty() && self.path.is_empty() {
            return true;
        }
        match s.kind {
            Kind::Tcp | Kind::Tcp6 => local_port(&s.local).is_some_and(|p| self.port.contains(&p)),
            Kind::Unix => self.path.iter().any(|p| s.local.contains(p.as_str())),
        }
    }
}

fn local_port(local: &str) -> Option<u16> {
    local.rsplit_once(':')?.1.parse().ok()
}

/// Everything one screen or one JSON object shows.
#[derive(Debug, Clone)]
struct Snapshot {
    somaxconn: Option<u32>,
    counters: Option<(u64, u64)>,
    sockets: Vec<ListenSocket>,
}

/// Owners remembered across `--watch` rounds: scanning all of `/proc` every second would cost more than
/// everything else, and a socket's owner does not change, so only new inodes are looked up.
#[derive(Default)]
pub(super) struct OwnerCache {
    known: HashMap<u64, Option<procfs::Owner>>,
}

impl OwnerCache {
    pub(super) fn attach(&mut self, sockets: &mut [ListenSocket]) {
        let new: HashSet<u64> = sockets
            .iter()
            .map(|s| s.inode)
            .filter(|i| !self.known.contains_key(i))
            .collect();
        if !new.is_empty() {
            let mut found = procfs::owners(procfs::PROC, &new);
            for inode in new {
                self.known.insert(inode, found.remove(&inode));
            }
        }
        // Forget sockets that are gone, so a reused inode number is looked up afresh.
        let live: HashSet<u64> = sockets.iter().map(|s| s.inode).collect();
        self.known.retain(|i, _| live.contains(i));
        for s in sockets {
            if let Some(Some(o)) = self.known.get(&s.inode) {
                s.pid = Some(o.pid);
                s.process = o.name.clone();
            }
        }
    }
}

fn snapshot(args: &SocketsArgs, owners: &mut OwnerCache) -> Result<Snapshot, SockDiagError> {
    let mut sockets: Vec<ListenSocket> = super::listening_sockets()?
        .into_iter()
        .filter(|s| args.wants(s))
        .collect();
    owners.attach(&mut sockets);
    sort(&mut sockets);
    Ok(Snapshot {
        somaxconn: super::somaxconn(),
        counters: super::listen_counters(),
        sockets,
    })
}

/// Fullest first, by exact ratio rather than rounded percent; then longest queue, then by name.
fn sort(sockets: &mut [ListenSocket]) {
    sockets.sort_by(|a, b| {
        let fa = u64::from(a.queued) * u64::from(b.backlog.max(1));
        let fb = u64::from(b.queued) * u64::from(a.backlog.max(1));
        fb.cmp(&fa)
            .then(b.queued.cmp(&a.queued))
            .then(a.kind.cmp(&b.kind))
            .then_with(|| a.local.cmp(&b.local))
            .then(a.inode.cmp(&b.inode))
    });
}

/// Prints, for `--watch` redraws until interrupted, for `--serve` serves metrics until interrupted. A closed pipe (`| head`) ends it quietly.
pub fn run(args: SocketsArgs) -> Result<(), SockDiagError> {
    let result = match (args.serve, args.watch) {
        (Some(addr), _) => super::exporter::serve(&args, addr, args.sample_every),
        (None, None) => once(&args),
        (None, Some(every)) => watch(&args, every),
    };
    match result {
        Err(SockDiagError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn once(args: &SocketsArgs) -> Result<(), SockDiagError> {
    let snap = snapshot(args, &mut OwnerCache::default())?;
    let text = if args.json {
        render_json(&snap)
    } else {
        render_table(&snap, None, None)
    };
    emit(&text)
}

fn watch(args: &SocketsArgs, every: Duration) -> Result<(), SockDiagError> {
    let tty = io::stdout().is_terminal();
    let mut owners = OwnerCache::default();
    let mut history: HashMap<u64, VecDeque<u32>> = HashMap::new();
    let mut first_counters = None;
    let mut first = true;
    loop {
        let snap = snapshot(args, &mut owners)?;
        if args.json {
            emit(&render_json(&snap))?;
        } else {
            let live: HashSet<u64> = snap.sockets.iter().map(|s| s.inode).collect();
            history.retain(|i, _| live.contains(i));
            for s in &snap.sockets {
                let h = history.entry(s.inode).or_default();
                if h.len() == HISTORY {
                    h.pop_front();
                }
                h.push_back(s.queued);
            }
            if first_counters.is_none() {
                first_counters = snap.counters;
            }
            let mut frame = String::new();
            if tty {
                // Home and clear: a plain redraw, so the terminal keeps working as a terminal.
                frame.push_str("\x1b[H\x1b[2J");
            } else if !first {
                frame.push('\n');
            }
            let _ = writeln!(
                frame,
                "every {}s, Ctrl-C to stop; history: the last {HISTORY} queue lengths, scaled to the peak shown",
                every.as_secs_f64()
            );
            frame.push_str(&render_table(&snap, Some(&history), first_counters));
            emit(&frame)?;
        }
        first = false;
        std::thread::sleep(every);
    }
}

fn emit(text: &str) -> Result<(), SockDiagError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(SockDiagError::Output)
}

#[derive(serde::Serialize)]
struct JsonReport<'a> {
    somaxconn: Option<u32>,
    listen_overflows: Option<u64>,
    listen_drops: Option<u64>,
    sockets: Vec<JsonSocket<'a>>,
}

#[derive(serde::Serialize)]
struct JsonSocket<'a> {
    kind: Kind,
    local: &'a str,
    queued: u32,
    backlog: u32,
    fill_percent: u32,
    clamped: bool,
    pid: Option<u32>,
    process: Option<&'a str>,
    inode: u64,
}

fn render_json(snap: &Snapshot) -> String {
    let report = JsonReport {
        somaxconn: snap.somaxconn,
        listen_overflows: snap.counters.map(|c| c.0),
        listen_drops: snap.counters.map(|c| c.1),
        sockets: snap
            .sockets
            .iter()
            .map(|s| JsonSocket {
                kind: s.kind,
                local: &s.local,
                queued: s.queued,
                backlog: s.backlog,
                fill_percent: s.fill_percent(),
                clamped: s.clamped(snap.somaxconn),
                pid: s.pid,
                process: s.process.as_deref(),
                inode: s.inode,
            })
            .collect(),
    };
    // Plain structs of numbers and strings: serializing cannot fail.
    let mut text = serde_json::to_string(&report).unwrap_or_default();
    text.push('\n');
    text
}

/// `▁▂▅█`: each sample's height relative to the highest in the history, all `▁` when nothing waited.
fn sparkline(samples: &VecDeque<u32>) -> String {
    let peak = samples.iter().copied().max().unwrap_or(0);
    samples
        .iter()
        .map(|&v| {
            if peak == 0 {
                return SPARKS[0];
            }
            // 0 is the lowest bar, the peak the highest; anything waiting at all shows above the floor.
            let step = (u64::from(v) * 7).div_ceil(u64::from(peak));
            SPARKS[usize::try_from(step).unwrap_or(7).min(7)]
        })
        .collect()
}

/// The table, then one summary line. `history` adds the sparkline column (`--watch`), and `since` the
/// counters when watching began, to show what has been lost while watching.
fn render_table(
    snap: &Snapshot,
    history: Option<&HashMap<u64, VecDeque<u32>>>,
    since: Option<(u64, u64)>,
) -> String {
    let mut header = vec!["KIND", "LOCAL", "QUEUED", "BACKLOG", "FILL"];
    if history.is_some() {
        header.push("HISTORY");
    }
    header.extend(["PID", "PROCESS"]);
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in &snap.sockets {
        let mark = if s.clamped(snap.somaxconn) { "*" } else { " " };
        let mut row = vec![
            s.kind.to_string(),
            if s.local.is_empty() {
                "*".into()
            } else {
                s.local.clone()
            },
            s.queued.to_string(),
            format!("{}{mark}", s.backlog),
            format!("{}%", s.fill_percent()),
        ];
        if let Some(h) = history {
            row.push(match h.get(&s.inode) {
                Some(samples) => format!(
                    "{:>width$} {}",
                    sparkline(samples),
                    samples.iter().max().copied().unwrap_or(0),
                    width = HISTORY
                ),
                None => String::new(),
            });
        }
        row.push(s.pid.map(|p| p.to_string()).unwrap_or_default());
        row.push(s.process.clone().unwrap_or_default());
        rows.push(row);
    }
    // The clamp mark hangs right of the backlog's digits, so the header leaves room for it.
    let header_cells: Vec<String> = header
        .iter()
        .map(|h| {
            if *h == "BACKLOG" {
                "BACKLOG ".into()
            } else {
                h.to_string()
            }
        })
        .collect();
    let mut widths: Vec<usize> = header_cells.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let right = |h: &str| matches!(h, "QUEUED" | "BACKLOG" | "FILL" | "PID");
    let mut out = String::new();
    for row in std::iter::once(&header_cells).chain(&rows) {
        let mut line = String::new();
        for ((cell, w), h) in row.iter().zip(&widths).zip(&header) {
            if !line.is_empty() {
                line.push_str("  ");
            }
            if right(h) {
                let _ = write!(line, "{cell:>w$}");
            } else {
                let _ = write!(line, "{cell:<w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no listening socket matches)\n");
    }
    out.push_str(&summary(snap, since));
    out
}

fn summary(snap: &Snapshot, since: Option<(u64, u64)>) -> String {
    let mut s = match snap.somaxconn {
        Some(n) => format!("somaxconn {n} (* = backlog equal to it, probably clamped)"),
        None => "somaxconn unknown (cannot read /proc/sys/net/core/somaxconn)".to_string(),
    };
    match snap.counters {
        Some((overflows, drops)) => {
            let _ = write!(
                s,
                "; TCP since boot: ListenOverflows {overflows}, ListenDrops {drops}"
            );
            if let Some((o0, d0)) = since {
                let _ = write!(
                    s,
                    " (+{}, +{} while watching)",
                    overflows.saturating_sub(o0),
                    drops.saturating_sub(d0)
                );
            }
        }
        None => {
            s.push_str("; ListenOverflows and ListenDrops unknown (cannot read /proc/net/netstat)")
        }
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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

    fn sample() -> Snapshot {
        let mut a = sock(Kind::Tcp, "127.0.0.1:8000", 5, 7, 11);
        a.pid = Some(123);
        a.process = Some("gunicorn".into());
        let mut sockets = vec![
            sock(Kind::Tcp6, "[::]:80", 0, 4096, 12),
            sock(Kind::Unix, "/run/php/php-fpm.sock", 100, 511, 13),
            a,
        ];
        sort(&mut sockets);
        Snapshot {
            somaxconn: Some(4096),
            counters: Some((17, 23)),
            sockets,
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: SocketsArgs,
    }

    fn parse(argv: &[&str]) -> Result<SocketsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("sockets").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags() {
        let a = parse(&["--watch"]).unwrap();
        assert_eq!(a.watch, Some(Duration::from_secs(1)));
        let a = parse(&["--watch", "0.5", "--port", "80", "--port", "443", "--json"]).unwrap();
        assert_eq!(a.watch, Some(Duration::from_millis(500)));
        assert_eq!(a.port, vec![80, 443]);
        assert!(a.json);
        assert_eq!(parse(&[]).unwrap().watch, None);
        assert!(parse(&["--watch", "0"]).is_err());
        assert!(parse(&["--watch", "soon"]).is_err());
        assert!(parse(&["--port", "70000"]).is_err());
        let a = parse(&["--serve", "127.0.0.1:9477", "--sample-every", "0.005"]).unwrap();
        assert_eq!(a.serve, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(a.sample_every, Duration::from_millis(5));
        assert_eq!(
            parse(&["--serve", "[::1]:9477"]).unwrap().sample_every,
            Duration::from_millis(10)
        );
        // An exporter neither prints JSON nor redraws; the sampling interval means nothing without it.
        assert!(parse(&["--serve", "127.0.0.1:9477", "--json"]).is_err());
        assert!(parse(&["--serve", "127.0.0.1:9477", "--watch"]).is_err());
        assert!(parse(&["--sample-every", "0.1"]).is_err());
        assert!(parse(&["--serve", "localhost"]).is_err());
        assert!(parse(&["--serve", "127.0.0.1:9477", "--sample-every", "0"]).is_err());
    }

    #[test]
    fn filters_add_up_and_kinds_narrow() {
        let tcp = sock(Kind::Tcp, "127.0.0.1:80", 0, 1, 1);
        let tcp6 = sock(Kind::Tcp6, "[::1]:443", 0, 1, 2);
        let unix = sock(Kind::Unix, "/run/php/fpm.sock", 0, 1, 3);
        let abs = sock(Kind::Unix, "@/tmp/.X11-unix/X0", 0, 1, 4);
        let all = [&tcp, &tcp6, &unix, &abs];
        let shown = |argv: &[&str]| -> Vec<u64> {
            let a = parse(argv).unwrap();
            all.iter().filter(|s| a.wants(s)).map(|s| s.inode).collect()
        };
        assert_eq!(shown(&[]), vec![1, 2, 3, 4]);
        assert_eq!(shown(&["--tcp"]), vec![1, 2]);
        assert_eq!(shown(&["--unix"]), vec![3, 4]);
        assert_eq!(shown(&["--tcp", "--unix"]), vec![1, 2, 3, 4]);
        assert_eq!(shown(&["--port", "443"]), vec![2]);
        assert_eq!(shown(&["--path", "php"]), vec![3]);
        assert_eq!(shown(&["--path", "@/tmp"]), vec![4]);
        assert_eq!(shown(&["--port", "80", "--path", "php"]), vec![1, 3]);
        assert_eq!(shown(&["--port", "80", "--path", "php", "--unix"]), vec![3]);
        assert_eq!(shown(&["--port", "8080"]), Vec::<u64>::new());
    }

    #[test]
    fn table_is_sorted_by_fill_and_marks_the_clamped() {
        let t = render_table(&sample(), None, None);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert_eq!(
            lines[0],
            "KIND  LOCAL                  QUEUED  BACKLOG   FILL  PID  PROCESS"
        );
        assert_eq!(
            lines[1],
            "tcp   127.0.0.1:8000              5        7    71%  123  gunicorn"
        );
        assert_eq!(
            lines[2],
            "unix  /run/php/php-fpm.sock     100      511    19%"
        );
        assert_eq!(
            lines[3],
            "tcp6  [::]:80                     0     4096*    0%"
        );
        assert_eq!(
            lines[4],
            "somaxconn 4096 (* = backlog equal to it, probably clamped); TCP since boot: ListenOverflows 17, ListenDrops 23"
        );
    }

    #[test]
    fn empty_and_unknown_are_said_in_words() {
        let snap = Snapshot {
            somaxconn: None,
            counters: None,
            sockets: vec![],
        };
        let t = render_table(&snap, None, None);
        assert!(t.contains("(no listening socket matches)"), "{t}");
        assert!(t.contains("somaxconn unknown"), "{t}");
        assert!(t.contains("ListenOverflows and ListenDrops unknown"), "{t}");
    }

    #[test]
    fn watch_table_has_history_and_counts_since_start() {
        let snap = sample();
        let mut history = HashMap::new();
        history.insert(11, VecDeque::from(vec![0, 1, 5, 3]));
        let t = render_table(&snap, Some(&history), Some((10, 23)));
        assert!(t.contains("HISTORY"), "{t}");
        assert!(t.contains(&format!("{}▁▃█▆ 5", " ".repeat(16))), "{t}");
        assert!(t.contains("(+7, +0 while watching)"), "{t}");
    }

    #[test]
    fn sparkline_scales_to_its_peak() {
        assert_eq!(sparkline(&VecDeque::from(vec![0, 0, 0])), "▁▁▁");
        assert_eq!(sparkline(&VecDeque::from(vec![0, 1, 7, 14])), "▁▂▅█");
        assert_eq!(sparkline(&VecDeque::from(vec![1, 1000])), "▂█");
        assert_eq!(sparkline(&VecDeque::from(vec![u32::MAX, 0])), "█▁");
        assert_eq!(sparkline(&VecDeque::new()), "");
    }

    #[test]
    fn json_has_every_field() {
        let text = render_json(&sample());
        assert!(text.ends_with('\n') && text.lines().count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["somaxconn"], 4096);
        assert_eq!(v["listen_overflows"], 17);
        assert_eq!(v["listen_drops"], 23);
        let s = &v["sockets"][0];
        assert_eq!(s["kind"], "tcp");
        assert_eq!(s["local"], "127.0.0.1:8000");
        assert_eq!(s["queued"], 5);
        assert_eq!(s["backlog"], 7);
        assert_eq!(s["fill_percent"], 71);
        assert_eq!(s["clamped"], false);
        assert_eq!(s["pid"], 123);
        assert_eq!(s["process"], "gunicorn");
        assert_eq!(s["inode"], 11);
        assert_eq!(v["sockets"][2]["clamped"], true);
        assert_eq!(v["sockets"][2]["pid"], serde_json::Value::Null);
    }

    #[test]
    fn local_ports() {
        assert_eq!(local_port("127.0.0.1:80"), Some(80));
        assert_eq!(local_port("[::]:443"), Some(443));
        assert_eq!(local_port("[fe80::1%2]:8080"), Some(8080));
        assert_eq!(local_port("/run/x.sock"), None);
    }
}
