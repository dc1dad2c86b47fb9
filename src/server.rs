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
use crate::config::Config;
use crate::front::http::Front;
use crate::front::listen::{somaxconn, BindError, Listener};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::quarantine::Quarantine;
use crate::queue::Queue;

/// The exit code when --crash-exit's limit is reached: distinct, so that systemd or an operator can tell
/// a crash loop of the app from a failure of anteroom itself (1) or a bad command line (2).
pub const EXIT_CRASH_LOOP: u8 = 3;

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
}

/// Runs anteroom until it is told to stop. Must be called inside a tokio runtime.
pub async fn run(cfg: Config) -> Result<Stopped, StartError> {
    let cfg = Arc::new(cfg);
    crate::spill::start(&cfg);
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;

    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        listeners.push(Listener::bind(addr, cfg.backlog)?);
    }
    let mut fcgi_listeners = Vec::new();
    for addr in &cfg.listen_fastcgi {
        fcgi_listeners.push(Listener::bind(addr, cfg.backlog)?);
    }
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

    prepare_fd_table(cfg.max_queue);
    let dir = RuntimeDir::create()?;
    let queue = Queue::new(cfg.max_queue, cfg.queue_timeout, cfg.workers);
    let quarantine = Arc::new(Quarantine::new(cfg.quarantine));
    let metrics = Arc::new(Metrics::new());
    metrics.queue_limit.set(cfg.max_queue as i64);
    let mut pool = Pool::start(
        cfg.clone(),
        queue.clone(),
        quarantine.clone(),
        metrics.clone(),
        dir.0.clone(),
    )
    .map_err(StartError::Pool)?;
    let fatal = pool.fatal();

    let front = Arc::new(Front {
        cfg: cfg.clone(),
        queue: queue.clone(),
        quarantine,
        metrics: metrics.clone(),
    });
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
    let conns = TaskTracker::new();
    let mut acceptors = Vec::new();
    for l in listeners {
        tracing::info!(listen = %l.local_addr(), "serving HTTP");
        acceptors.push(
            crate::front::http::start(l, front.clone(), conns.clone())
                .map_err(StartError::Accept)?,
        );
    }
    for l in fcgi_listeners {
        tracing::info!(listen = %l.local_addr(), "serving FastCGI");
        acceptors.push(
            crate::front::fastcgi::start(l, front.clone(), conns.clone())
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
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create() -> Result<RuntimeDir, StartError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
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

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raises the soft limit on open files to the hard one, and grows the fd table ahead of the load.
///
/// Every waiting request holds a client connection, so the fd count follows the queue. Linux grows a
/// multi-threaded process's fd table by waiting for an RCU grace period (milliseconds); if that happens in
/// the acceptor thread in the middle of a burst, the kernel's accept queue overflows meanwhile and nginx
/// answers 502. So the table is sized at start, for the queue limit and some margin, by opening a
/// descriptor at that number and closing it again: the table never shrinks.
fn prepare_fd_table(max_queue: usize) {
    // SAFETY: getrlimit/setrlimit with a struct we own; fcntl(F_DUPFD) of stderr and close of the new fd
    // we just got, which nothing else knows about.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max.min(1 << 20),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = want.rlim_cur;
            }
        }
        let target = (max_queue as u64 * 2 + 1024)
            .min(65_536)
            .min(lim.rlim_cur.saturating_sub(1));
        if target > 3 {
            let fd = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, target as libc::c_int);
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }
}
