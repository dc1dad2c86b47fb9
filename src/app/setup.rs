//! What `App::build` prepares before serving: the worker socket directory, the open-files limit and the
//! fd table, the connection limits.

use std::path::PathBuf;

use crate::config::limits::Limits;
use crate::config::Config;

use super::StartError;

/// A private (0700) directory for the workers' sockets, removed when anteroom stops.
///
/// It lives under `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`, private to the service and removed
/// by systemd when it stops), else `$XDG_RUNTIME_DIR`, else the temp directory. It is named
/// `anteroom.PID.RANDOM`; one left behind by a run that was SIGKILLed is removed at the next start.
pub(super) struct RuntimeDir(pub(super) PathBuf);

impl RuntimeDir {
    pub(super) fn create() -> Result<RuntimeDir, StartError> {
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
        // Ours, or, when we are root, also one a root anteroom handed to `--user` (its owner is then that
        // user, and nobody else would ever remove it).
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.is_dir() && (m.uid() == uid || uid == 0)
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

/// Warns when the kernel clamps the listen backlog asked for.
pub(super) fn check_backlog(cfg: &Config) {
    if let Some(max) = crate::front::listen::somaxconn() {
        if cfg.backlog > max {
            tracing::warn!(
                "listen backlog {} was clamped by the kernel to net.core.somaxconn = {max}; \
                 to raise it: sysctl -w net.core.somaxconn={}",
                cfg.backlog,
                cfg.backlog
            );
        }
    }
}

/// Raises the open-files limit, plans the connection limits within it and grows the fd table for them.
pub(super) fn plan_connections(cfg: &Config) -> Limits {
    let nofile = raise_nofile();
    let limits = Limits::plan(cfg, nofile).unwrap_or_else(|e| {
        // Checked against the hard limit at parse time: the soft one could not be raised to it. The default
        // is planned within whatever limit there is, so it always fits.
        let mut fallback = cfg.clone();
        fallback.max_connections = None;
        let l = Limits::plan(&fallback, nofile).unwrap_or_else(|_| Limits::fixed(1024));
        tracing::warn!("max-connections: {e}; using {}", l.max);
        l
    });
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
    limits
}

/// Raises the soft limit on open files to the hard one (at most 2^20) and returns the soft limit now.
pub(super) fn raise_nofile() -> u64 {
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
pub(super) fn prepare_fd_table(want: usize, nofile: u64) {
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
