//! The open-files limit (RLIMIT_NOFILE), which sizes the connection table.

use std::io;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// RLIM_INFINITY, as a number: "no limit" compares above every real one.
const UNLIMITED: u64 = u64::MAX;

/// The soft and hard RLIMIT_NOFILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub soft: u64,
    pub hard: u64,
}

/// RLIMIT_NOFILE now.
pub fn nofile() -> Nofile {
    let lim = getrlimit(Resource::Nofile);
    Nofile {
        soft: lim.current.unwrap_or(UNLIMITED),
        hard: lim.maximum.unwrap_or(UNLIMITED),
    }
}

/// Sets RLIMIT_NOFILE.
pub fn set_nofile(lim: Nofile) -> io::Result<()> {
    let limited = |v: u64| (v != UNLIMITED).then_some(v);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limited(lim.soft),
            maximum: limited(lim.hard),
        },
    )?;
    Ok(())
}
