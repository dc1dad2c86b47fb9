//! How many client connections anteroom may hold, planned from the configuration and `RLIMIT_NOFILE`.
//!
//! Every client connection holds a file descriptor, and so do the things anteroom cannot do without (a new
//! worker's socket and pipes, the admin listener's clients). The plan keeps descriptors back for those and
//! gives clients the rest, or refuses a `--max-connections` the descriptors cannot back. Temp files share the
//! clients' part: each takes a descriptor as it is opened (`front/conns` closes an idle connection for it, or
//! its request gets 503), so a burst of small requests is never charged for files it will not open. It lives
//! with the configuration because it is checked with it, at start and by `--print-config`, before any
//! connection exists; `front/conns` enforces it.

use super::Config;

/// Descriptors anteroom needs whatever the load: stdio, the runtime's epoll and wakers, the signal pipe,
/// netlink and /proc reads (admin page, worker readiness), the spawner's transient pipes (exec error,
/// stdout and stderr while forking).
const BASE_RESERVE: usize = 64;
/// Per worker slot: its socket, the kept-alive connection to it, its stdout and stderr pipes, its pidfd and
/// a readiness probe's connection (6), twice over for a reload, when an old and a new worker overlap.
const PER_WORKER: usize = 12;
/// Admin clients served at once; the admin listener closes its oldest idle one beyond this.
pub const ADMIN_CONNS: usize = 32;
/// Connections the acceptor thread may take beyond `--max-connections` before the runtime has closed idle
/// ones to make room for them (they are handed off faster than they close). Past it, the acceptor thread
/// refuses on its own.
pub const ACCEPT_SLACK: usize = 64;
/// Temp files a request in progress may hold: its spilled body and its spilled response. Also how many idle
/// connections a starting request closes, at most, while temp files have the budget overspent.
pub const TEMP_FILES_PER_REQUEST: usize = 2;
/// The default is also capped here: each open connection costs memory too (its task, kernel buffers).
pub const DEFAULT_MAX: usize = 65_536;

/// What `--max-connections` works out to, and the descriptor budget behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections open at once, across all public listeners.
    pub max: usize,
    /// Descriptors for client connections and the temp files of their requests.
    pub fd_budget: usize,
    /// The acceptor thread refuses at once from this many open connections on (`max` + slack).
    pub hard_cap: usize,
    /// RLIMIT_NOFILE the plan was made for.
    pub nofile: u64,
    /// Descriptors kept back from clients.
    pub reserve: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(
        "{asked} is more than the open-files limit allows: RLIMIT_NOFILE is {nofile} and {reserve} \
         descriptors are kept for workers, the admin listener and anteroom itself, so at most {most} \
         (raise the limit with `ulimit -n` or systemd's LimitNOFILE=, or ask for fewer)"
    )]
    AboveFdLimit {
        asked: usize,
        nofile: u64,
        reserve: usize,
        most: usize,
    },
    #[error("must be at least 1")]
    Zero,
}

impl Limits {
    /// Descriptors kept back from client connections for `cfg`.
    pub fn reserve(cfg: &Config) -> usize {
        let listeners = cfg.listen.len() + cfg.listen_fastcgi.len();
        let admin = if cfg.admin.is_some() {
            1 + ADMIN_CONNS
        } else {
            0
        };
        BASE_RESERVE + listeners + admin + PER_WORKER * cfg.workers_max + ACCEPT_SLACK
    }

    /// The limits for `cfg` with `nofile` descriptors: `--max-connections` if given (refused if the
    /// descriptors cannot back it), else `nofile - reserve`, at most [`DEFAULT_MAX`].
    pub fn plan(cfg: &Config, nofile: u64) -> Result<Limits, LimitError> {
        let reserve = Self::reserve(cfg);
        let nofile_us = usize::try_from(nofile).unwrap_or(usize::MAX);
        // A limit too low for the reserve still serves, with a quarter of it for clients.
        let fd_budget = nofile_us.saturating_sub(reserve).max(nofile_us / 4).max(1);
        let max = match cfg.max_connections {
            Some(0) => return Err(LimitError::Zero),
            Some(asked) if asked > fd_budget => {
                return Err(LimitError::AboveFdLimit {
                    asked,
                    nofile,
                    reserve,
                    most: fd_budget,
                })
            }
            Some(asked) => asked,
            None => fd_budget.min(DEFAULT_MAX),
        };
        Ok(Limits {
            max,
            fd_budget,
            hard_cap: max + ACCEPT_SLACK,
            nofile,
            reserve,
        })
    }

    /// Limits for a small fixed table (the admin listener's, which admits each connection as it accepts
    /// it: no slack for a hand-off), with no descriptor weighting.
    pub fn fixed(max: usize) -> Limits {
        Limits {
            max,
            fd_budget: usize::MAX / 4,
            hard_cap: max + max / 4 + 1,
            nofile: 0,
            reserve: 0,
        }
    }
}

/// The soft RLIMIT_NOFILE anteroom will run with: the hard limit (it raises the soft one at start, see
/// `app::setup::raise_nofile`), at most 2^20.
pub fn nofile_target() -> u64 {
    let lim = crate::sys::rlimit::nofile();
    lim.hard.min(1 << 20).max(lim.soft.min(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_keeps_a_reserve_and_refuses_too_much() {
        let cfg = Config::from_args(Default::default()).unwrap();
        let l = Limits::plan(&cfg, 1024).unwrap();
        assert_eq!(l.reserve, Limits::reserve(&cfg));
        assert_eq!(l.max, 1024 - l.reserve);
        let l = Limits::plan(&cfg, 1 << 20).unwrap();
        assert_eq!(l.max, DEFAULT_MAX);
        let mut asked = cfg.clone();
        asked.max_connections = Some(5000);
        let e = Limits::plan(&asked, 1024).unwrap_err().to_string();
        assert!(e.contains("RLIMIT_NOFILE is 1024"), "{e}");
        asked.max_connections = Some(500);
        assert_eq!(Limits::plan(&asked, 1024).unwrap().max, 500);
    }
}
