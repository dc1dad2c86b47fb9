//! The worker pool: one supervised slot per worker process.
//!
//! Each slot is a task that owns one worker: it makes the worker's private listening socket, has the
//! spawner start the process, then loops taking a request from the queue, serving it, and watching for the
//! process to exit. Because a worker has a socket of its own and serves one request at a time, anteroom
//! always knows which worker holds which request. A worker that exits is replaced; one that dies young is
//! replaced after a growing delay, so a worker that cannot start does not spin the CPU.

pub mod spawn;

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::queue::Queue;
use crate::request::error_response;
use crate::worker::{Link, Progress, WorkerError};
use spawn::{SpawnSpec, Spawner};

/// How many of a worker's last output lines are kept for its crash report.
const TAIL_LINES: usize = 20;
/// A worker that exits sooner than this after starting counts as a failed start.
const YOUNG: Duration = Duration::from_secs(5);
/// How long a worker has to stop after SIGTERM before it gets SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

pub struct Pool {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

struct Shared {
    cfg: Arc<Config>,
    queue: Arc<Queue>,
    spawner: Spawner,
    dir: PathBuf,
    argv: Vec<String>,
    stop: CancellationToken,
    busy: AtomicUsize,
}

impl Pool {
    /// Starts one slot per configured worker. `dir` must be a private directory for the worker sockets.
    pub fn start(cfg: Arc<Config>, queue: Arc<Queue>, dir: PathBuf) -> std::io::Result<Pool> {
        let spawner = Spawner::start(tokio::runtime::Handle::current())?;
        let argv = if cfg.command.is_empty() {
            let exe = std::env::current_exe()?;
            vec![exe.to_string_lossy().into_owned(), "demo-worker".into()]
        } else {
            cfg.command.clone()
        };
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            queue,
            spawner,
            dir,
            argv,
            stop: CancellationToken::new(),
            busy: AtomicUsize::new(0),
        });
        let mut tasks = JoinSet::new();
        for slot in 0..cfg.workers {
            tasks.spawn(run_slot(shared.clone(), slot));
        }
        Ok(Pool { shared, tasks })
    }

    /// Workers holding a request right now.
    pub fn busy(&self) -> usize {
        self.shared.busy.load(Ordering::Relaxed)
    }

    /// Stops every worker (SIGTERM, then SIGKILL after a grace period) and waits for them.
    pub async fn stop(mut self) {
        self.shared.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn run_slot(sh: Arc<Shared>, slot: usize) {
    let mut backoff = Backoff::new();
    let mut generation = 0u64;
    while !sh.stop.is_cancelled() {
        generation += 1;
        let path = sh.dir.join(format!("w{slot}.{generation}.sock"));
        let started = Instant::now();
        let outcome = run_worker(&sh, slot, &path).await;
        let _ = std::fs::remove_file(&path);
        if sh.stop.is_cancelled() {
            break;
        }
        let young = outcome.served == 0 && started.elapsed() < YOUNG;
        let delay = if young {
            backoff.next()
        } else {
            backoff.reset();
            Duration::ZERO
        };
        if !delay.is_zero() {
            tracing::warn!(slot, delay_ms = delay.as_millis() as u64, "worker failed young; waiting before the next start");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = sh.stop.cancelled() => break,
            }
        }
    }
}

struct Outcome {
    served: u64,
}

async fn run_worker(sh: &Shared, slot: usize, path: &Path) -> Outcome {
    let mut outcome = Outcome { served: 0 };
    let listener = match worker_socket(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(slot, path = %path.display(), "cannot make the worker's socket: {e}");
            return outcome;
        }
    };
    let spec = SpawnSpec {
        argv: sh.argv.clone(),
        env: sh.cfg.env.clone(),
        protocol: sh.cfg.worker_protocol,
        listener,
    };
    let mut child = match sh.spawner.spawn(spec).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(slot, command = %sh.argv[0], "cannot start the worker: {e}");
            return outcome;
        }
    };
    let pid = child.id().unwrap_or(0);
    let started = Instant::now();
    tracing::info!(slot, pid, "worker started");
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out, slot, pid, "stdout", tail.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err, slot, pid, "stderr", tail.clone()));
    }

    let exit = child.wait();
    tokio::pin!(exit);
    let mut link = Link::new(path, sh.cfg.worker_protocol);
    let status: std::io::Result<ExitStatus> = loop {
        let mut job = tokio::select! {
            biased;
            st = &mut exit => break st,
            () = sh.stop.cancelled() => break terminate(pid, &mut exit).await,
            job = sh.queue.pop() => job,
        };
        sh.busy.fetch_add(1, Ordering::Relaxed);
        let begun = Instant::now();
        let mut progress = Progress::default();
        let mut exited = None;
        let result = {
            let serve = link.serve(&mut job, &sh.cfg, &mut progress);
            tokio::pin!(serve);
            tokio::select! {
                r = &mut serve => r,
                st = &mut exit => {
                    exited = Some(st);
                    // What the worker wrote before exiting is still in the socket: read it out.
                    match tokio::time::timeout(Duration::from_secs(1), &mut serve).await {
                        Ok(r) => r,
                        Err(_) => Err(WorkerError::Exited),
                    }
                }
            }
        };
        sh.busy.fetch_sub(1, Ordering::Relaxed);
        outcome.served += 1;
        sh.queue.record_service_time(begun.elapsed());
        if let Err(e) = result {
            link.reset();
            tracing::error!(
                slot, pid, id = %job.id, request = %job.summary(),
                sent = progress.sent_bytes, received = progress.received_bytes,
                "{e}"
            );
            if !progress.head_sent {
                let why = format!("The worker failed: {e}.");
                job.respond(error_response(StatusCode::BAD_GATEWAY, &job.id, &why));
            }
        }
        if let Some(st) = exited {
            break st;
        }
    };
    let lived = started.elapsed();
    match status {
        Ok(st) if sh.stop.is_cancelled() => {
            tracing::info!(slot, pid, status = %describe(st), served = outcome.served, "worker stopped")
        }
        Ok(st) => tracing::warn!(
            slot, pid, status = %describe(st), lived_ms = lived.as_millis() as u64, served = outcome.served,
            last_output = ?tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            "worker exited"
        ),
        Err(e) => tracing::error!(slot, pid, "cannot wait for the worker: {e}"),
    }
    outcome
}

/// SIGTERM, then SIGKILL if the worker has not exited within the grace period.
async fn terminate(
    pid: u32,
    exit: &mut std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<ExitStatus>>>,
) -> std::io::Result<ExitStatus> {
    signal(pid, libc::SIGTERM);
    match tokio::time::timeout(KILL_GRACE, exit.as_mut()).await {
        Ok(st) => st,
        Err(_) => {
            signal(pid, libc::SIGKILL);
            exit.as_mut().await
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped child.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// "exit code 3", "signal 9 (SIGKILL)", "signal 11 (SIGSEGV), core dumped".
pub fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = st.code() {
        return format!("exit code {code}");
    }
    match st.signal() {
        Some(sig) => {
            let name = signal_name(sig);
            if st.core_dumped() {
                format!("signal {sig} ({name}), core dumped")
            } else {
                format!("signal {sig} ({name})")
            }
        }
        None => "unknown".into(),
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => "?",
    }
}

/// The worker's private listening socket, blocking as apps expect of an inherited listener.
fn worker_socket(path: &Path) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let s = crate::front::listen::unix_socket(path, 64)?;
    s.set_nonblocking(false)?;
    Ok(s.into())
}

/// Logs a worker's output line by line and keeps the last lines for its crash report.
async fn log_lines(
    stream: impl AsyncRead + Unpin,
    slot: usize,
    pid: u32,
    name: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::with_capacity(8192, stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        // Lines are capped so that a worker printing without newlines cannot grow our memory.
        match (&mut reader).take(8192).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        tracing::info!(target: "worker", slot, pid, stream = name, "{line}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.to_string());
        }
    }
}

/// Exponential backoff with jitter: 0.1 s doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // +-20%, so that slots failing together do not restart in lockstep.
        d.mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            b.next();
        }
        assert!(b.next() <= Duration::from_secs(36));
        b.reset();
        assert!(b.next() <= Duration::from_millis(120));
    }

    #[test]
    fn exit_descriptions() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(describe(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
        assert_eq!(
            describe(ExitStatus::from_raw(11 | 0x80)),
            "signal 11 (SIGSEGV), core dumped"
        );
    }
}
