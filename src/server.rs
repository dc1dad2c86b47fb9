//! Wiring and lifetime: bind the listeners, start the pool, serve until a signal, then stop in order.
//!
//! SIGHUP reloads: a new generation of workers starts and takes over as its workers become ready.
//! SIGTERM is a graceful stop: listeners close at once, requests already queued or at a worker are finished
//! (for up to --graceful-timeout), then workers get SIGTERM and, after a grace period, SIGKILL. SIGINT, or a second
//! SIGTERM, is a fast stop: waiting requests get 503 and workers are stopped at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminState;
use crate::admission::Admission;
use crate::config::Config;
use crate::front::conns::{Limits, Table, TableMetrics};
use crate::front::listen::{somaxconn, BindError, Listener};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::quarantine::Quarantine;
use crate::queue::Queue;

/// The exit code when --crash-exit's limit is reached (defined below the pool and the server, in `sys`).
pub use crate::sys::exit::CRASH_LOOP as EXIT_CRASH_LOOP;

/// How anteroom came to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM or SIGINT.
    Signal,
    /// --crash-exit: workers kept dying.
    CrashLoop,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot create the worker socket directory {}: {source}", path.display())]
    RuntimeDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the worker pool: {0}")]
    Pool(std::io::Error),
    #[error("cannot start an acceptor thread: {0}")]
    Accept(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("drop-privileges: {0}")]
    DropPrivileges(std::io::Error),
}

/// Runs anteroom until it is told to stop. Must be called inside a tokio runtime.
pub async fn run(cfg: Config) -> Result<Stopped, StartError> {
    let cfg = Arc::new(cfg);
    crate::spill::start(&cfg);
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;

    let umask = crate::front::listen::PrivateUmask::hold(&cfg.listen_access);
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        listeners.push(Listener::bind(addr, cfg.backlog)?);
    }
    let mut fcgi_listeners = Vec::new();
    for addr in &cfg.listen_fastcgi {
        fcgi_listeners.push(Listener::bind(addr, cfg.backlog)?);
    }
    drop(umask);
    crate::front::listen::set_access(listeners.iter().chain(&fcgi_listeners), &cfg.listen_access)?;
    if let Some(max) = somaxconn() {
        if cfg.backlog > max {
            tracing::warn!(
                "listen backlog {} was clamped by the kernel to net.core.somaxconn = {max}; \
                 to raise it: sysctl -w net.core.somaxconn={}",
                cfg.backlog,
                cfg.backlog
            );
        }
    }

    let nofile = raise_nofile();
    let limits = match Limits::plan(&cfg, nofile) {
        Ok(l) => l,
        Err(e) => {
            // Checked against the hard limit at parse time: the soft one could not be raised to it.
            let l = Limits::plan(
                &Config {
                    max_connections: None,
                    ..(*cfg).clone()
                },
                nofile,
            )
            .expect("the default always fits");
            tracing::warn!("max-connections: {e}; using {}", l.max);
            l
        }
    };
    prepare_fd_table(
        (limits.max + limits.reserve).max(cfg.max_queue * 2 + 1024),
        nofile,
    );
    tracing::info!(
        max_connections = limits.max,
        nofile,
        reserved = limits.reserve,
        "client connections bounded"
    );
    let dir = RuntimeDir::create()?;
    crate::pool::spawn::prepare(&cfg, &dir.0).map_err(|source| StartError::RuntimeDir {
        path: dir.0.clone(),
        source,
    })?;
    let queue = Queue::new(cfg.max_queue, cfg.queue_timeout, cfg.workers);
    let quarantine = Arc::new(Quarantine::new(cfg.quarantine));
    let metrics = Arc::new(Metrics::new());
    metrics.queue_limit.set(cfg.max_queue as i64);
    metrics.connections_limit.set(limits.max as i64);
    // One table for every public listener: --max-connections bounds them together.
    let table = Table::new(
        "client",
        limits,
        TableMetrics {
            open: metrics.connections.clone(),
            closed_idle: metrics.connections_idle_closed.clone(),
            refused: metrics.connections_refused.clone(),
        },
    );
    let mut pool = Pool::start(
        cfg.clone(),
        queue.clone(),
        quarantine.clone(),
        metrics.clone(),
        dir.0.clone(),
    )
    .map_err(StartError::Pool)?;
    let fatal = pool.fatal();

    let front = Arc::new(Admission::new(
        cfg.clone(),
        queue.clone(),
        quarantine,
        metrics.clone(),
    ));
    let stop_accepting = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let admin = match &cfg.admin {
        Some(addr) => match Listener::bind(addr, 128) {
            Ok(l) => Some(l),
            Err(e) if cfg.admin_is_default => {
                // Another anteroom on this machine has the default port; serving matters more.
                tracing::warn!("no admin listener: {e} (choose one with --admin)");
                None
            }
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    if let Some(l) = admin {
        tracing::info!(admin = %l.local_addr(), "serving metrics, status and health");
        let state = Arc::new(AdminState {
            cfg: cfg.clone(),
            queue: queue.clone(),
            pool: pool.view(),
            metrics: metrics.clone(),
            conns: table.clone(),
            // The bound addresses (a port 0 has become a real one), to find them in the kernel's tables.
            listeners: listeners
                .iter()
                .chain(&fcgi_listeners)
                .map(Listener::local_addr)
                .collect(),
            started: std::time::Instant::now(),
        });
        // Up until the very end, so that health and metrics answer during a graceful stop.
        tokio::spawn(crate::admin::serve(l, state, stop_admin.clone()));
    }
    // Every listener is bound: nothing from here on needs root.
    crate::pool::spawn::drop_privileges(&cfg).map_err(StartError::DropPrivileges)?;
    let conns = TaskTracker::new();
    let mut acceptors = Vec::new();
    for l in listeners {
        tracing::info!(listen = %l.local_addr(), "serving HTTP");
        acceptors.push(
            crate::front::http::start(l, front.clone(), table.clone(), conns.clone())
                .map_err(StartError::Accept)?,
        );
    }
    for l in fcgi_listeners {
        tracing::info!(listen = %l.local_addr(), "serving FastCGI");
        acceptors.push(
            crate::front::fastcgi::start(l, front.clone(), table.clone(), conns.clone())
                .map_err(StartError::Accept)?,
        );
    }
    tracing::info!(
        workers = cfg.workers,
        protocol = %cfg.worker_protocol,
        command = %if cfg.command.is_empty() { "(built-in demo app)".to_string() } else { cfg.command.join(" ") },
        max_queue = cfg.max_queue,
        "anteroom started"
    );

    let (fast, stopped) = loop {
        tokio::select! {
            _ = sigterm.recv() => break (false, Stopped::Signal),
            _ = sigint.recv() => break (true, Stopped::Signal),
            () = fatal.cancelled() => break (true, Stopped::CrashLoop),
            _ = sighup.recv() => pool.reload(),
        }
    };
    stop_accepting.cancel();
    queue.close();
    // Closes the listeners (removing unix socket files); each acceptor notices within 100 ms.
    let _ = tokio::task::spawn_blocking(move || acceptors.into_iter().for_each(|a| a.stop())).await;
    if fast {
        tracing::info!("stopping now");
        queue.drain();
    } else {
        tracing::info!(
            queued = queue.len(),
            busy = pool.busy(),
            "SIGTERM: finishing queued and running requests (SIGINT or SIGTERM again to stop now)"
        );
        let drained = async {
            while !queue.is_empty() || pool.busy() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            () = drained => {}
            () = tokio::time::sleep(cfg.graceful_timeout) => tracing::warn!("graceful stop timed out"),
            _ = sigterm.recv() => tracing::info!("second signal: stopping now"),
            _ = sigint.recv() => tracing::info!("second signal: stopping now"),
        }
        queue.drain();
    }
    // Let the last responses reach their clients before the workers' sockets go.
    conns.close();
    let _ = tokio::time::timeout(Duration::from_millis(200), conns.wait()).await;
    pool.stop().await;
    stop_admin.cancel();
    drop(dir);
    tracing::info!("stopped");
    Ok(stopped)
}

/// A private (0700) directory for the workers' sockets, removed when anteroom stops.
///
/// It lives under `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`, private to the service and removed
/// by systemd when it stops), else `$XDG_RUNTIME_DIR`, else the temp directory. It is named
/// `anteroom.PID.RANDOM`; one left behind by a run that was SIGKILLed is removed at the next start.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create() -> Result<RuntimeDir, StartError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = runtime_base();
        remove_stale(&base);
        let path = base.join(format!(
            "anteroom.{}.{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| StartError::RuntimeDir {
                path: path.clone(),
                source,
            })?;
        Ok(RuntimeDir(path))
    }
}

/// Where the worker socket directory goes. systemd gives `RUNTIME_DIRECTORY` as a colon-separated list
/// when a unit names several; the first is ours.
fn runtime_base() -> PathBuf {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .map(|v| {
                let v = PathBuf::from(v);
                match v.to_str().and_then(|s| s.split(':').next()) {
                    Some(first) => PathBuf::from(first),
                    None => v,
                }
            })
            .filter(|p| p.is_absolute() && p.is_dir())
    };
    from_env("RUNTIME_DIRECTORY")
        .or_else(|| from_env("XDG_RUNTIME_DIR"))
        .unwrap_or_else(std::env::temp_dir)
}

/// Removes the `anteroom.PID.*` directories in `base` whose anteroom is gone: its pid is not alive, and no
/// worker socket in it answers (another pid namespace sharing the directory could hold a live one).
fn remove_stale(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let uid = crate::sys::process::effective_uid();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = stale_pid(&name.to_string_lossy()) else {
            continue;
        };
        let path = e.path();
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.is_dir() && m.uid() == uid
        });
        if !ours || pid == std::process::id() || crate::sys::process::alive(pid) || answers(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), pid, "removed the worker socket directory of a dead anteroom")
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), "cannot remove a stale directory: {e}")
            }
        }
    }
}

/// The pid in a name `anteroom.PID.HEX`, if it is one.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("anteroom.")?;
    let (pid, suffix) = rest.split_once('.')?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Whether any unix socket in `dir` accepts a connection.
fn answers(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_type().is_ok_and(|t| t.is_socket())
                && std::os::unix::net::UnixStream::connect(e.path()).is_ok()
        })
    })
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raises the soft limit on open files to the hard one (at most 2^20) and returns the soft limit now.
fn raise_nofile() -> u64 {
    use crate::sys::rlimit::{nofile, set_nofile, Nofile};
    let lim = nofile();
    if lim.soft < lim.hard {
        let want = Nofile {
            soft: lim.hard.min(1 << 20),
            hard: lim.hard,
        };
        if want.soft > lim.soft && set_nofile(want).is_ok() {
            return want.soft;
        }
    }
    lim.soft
}

/// Grows the fd table ahead of the load, to hold `want` descriptors (at most 65,536).
///
/// Every open connection holds a descriptor. Linux grows a multi-threaded process's fd table by waiting
/// for an RCU grace period (milliseconds); if that happens in the acceptor thread in the middle of a burst,
/// the kernel's accept queue overflows meanwhile and nginx answers 502. So the table is sized at start,
/// for the connection limit and the reserve, by opening a descriptor at that number and closing it again:
/// the table never shrinks.
fn prepare_fd_table(want: usize, nofile: u64) {
    let target = (want as u64).min(65_536).min(nofile.saturating_sub(1));
    if target > 3 {
        // Best effort: a table that stays small only costs time later.
        let _ = crate::sys::fd::grow_fd_table(target as i32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names() {
        assert_eq!(stale_pid("anteroom.1234.0badf00d"), Some(1234));
        assert_eq!(stale_pid("anteroom.1234."), None);
        assert_eq!(stale_pid("anteroom.x.0badf00d"), None);
        assert_eq!(stale_pid("anteroom.1234.zz"), None);
        assert_eq!(stale_pid("other.1234.00"), None);
    }

    #[test]
    fn only_dead_and_silent_directories_are_removed() {
        let base = tempfile::tempdir().unwrap();
        // A pid that has just exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = base.path().join(format!("anteroom.{dead}.0000abcd"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("w0.g1.1.sock"), "").unwrap();
        let live = base
            .path()
            .join(format!("anteroom.{}.0000abcd", std::process::id()));
        let ppid = crate::sys::process::parent_pid();
        let parent = base.path().join(format!("anteroom.{ppid}.00000001"));
        std::fs::create_dir(&live).unwrap();
        std::fs::create_dir(&parent).unwrap();
        // Dead pid, but a socket in it still answers: another namespace's anteroom, perhaps.
        let answering = base.path().join("anteroom.999999999.0000beef");
        std::fs::create_dir(&answering).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(answering.join("w0.sock")).unwrap();
        let unrelated = base.path().join("anteroom-notes");
        std::fs::create_dir(&unrelated).unwrap();
        remove_stale(base.path());
        assert!(!stale.exists());
        assert!(live.exists() && parent.exists() && answering.exists() && unrelated.exists());
    }
}
