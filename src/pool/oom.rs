//! Was a SIGKILLed worker killed by the kernel's OOM killer?
//!
//! The kernel counts its OOM kills before it sends the SIGKILL ("task reaper must see this", in
//! `__oom_kill_process`), so when a worker's exit says SIGKILL, a counter that grew since the worker
//! started explains it. The counter read is anteroom's own cgroup v2 `memory.events` (`oom_kill`, which
//! counts kills of processes in the cgroup and below, whichever limit ran out) when there is one, else the
//! whole machine's `oom_kill` in `/proc/vmstat`. Each kill explains one death at most, so two workers
//! SIGKILLed after one OOM kill are one OOM death and one other death.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug)]
enum Source {
    /// `memory.events` of anteroom's cgroup (v2).
    Cgroup(PathBuf),
    Vmstat,
    /// Neither is readable: no death is put down to the OOM killer.
    None,
}

#[derive(Debug)]
pub(super) struct OomWatch {
    source: Source,
    /// The counter value up to which kills have been put down to deaths already.
    consumed: Mutex<u64>,
}

impl OomWatch {
    pub(super) fn new() -> OomWatch {
        let source = own_memory_events()
            .filter(|p| read_counter(p, "oom_kill").is_some())
            .map(Source::Cgroup)
            .or_else(|| read_counter(Path::new("/proc/vmstat"), "oom_kill").map(|_| Source::Vmstat))
            .unwrap_or(Source::None);
        tracing::debug!(?source, "OOM kills are read from here");
        OomWatch {
            source,
            consumed: Mutex::new(0),
        }
    }

    /// The OOM kill counter now; taken when a worker starts.
    pub(super) fn count(&self) -> Option<u64> {
        match &self.source {
            Source::Cgroup(p) => read_counter(p, "oom_kill"),
            Source::Vmstat => read_counter(Path::new("/proc/vmstat"), "oom_kill"),
            Source::None => None,
        }
    }

    /// Whether an OOM kill since the worker started (the counter was `at_start` then) explains its
    /// SIGKILL; that kill is then spent.
    pub(super) fn explains(&self, at_start: Option<u64>) -> bool {
        let (Some(start), Some(now)) = (at_start, self.count()) else {
            return false;
        };
        let mut consumed = crate::sync::lock(&self.consumed);
        let (yes, next) = attribute(now, start, *consumed);
        *consumed = next;
        yes
    }
}

/// With the counter at `now`, `start` when the worker started and `consumed` kills already spent: is there
/// an unspent kill since the start, and what is spent after this one.
fn attribute(now: u64, start: u64, consumed: u64) -> (bool, u64) {
    let base = start.max(consumed);
    if now > base {
        (true, base + 1)
    } else {
        (false, consumed)
    }
}

/// `NAME VALUE` lines (memory.events, vmstat): the value of `name`.
fn read_counter(path: &Path, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_counter(&text, name)
}

fn parse_counter(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The `memory.events` file of the cgroup v2 anteroom runs in, if the unified hierarchy is mounted.
fn own_memory_events() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4))
            .flatten()
    })?;
    Some(
        Path::new(mount)
            .join(path.trim_start_matches('/'))
            .join("memory.events"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kill_explains_one_death_after_the_start() {
        // Two kills since both workers started: both deaths are explained, a third is not.
        let (a, c) = attribute(7, 5, 0);
        assert!(a);
        let (b, c) = attribute(7, 5, c);
        assert!(b);
        let (x, c) = attribute(7, 5, c);
        assert!(!x);
        assert_eq!(c, 7);
        // A kill before the worker started explains nothing.
        assert!(!attribute(7, 7, 0).0);
    }

    #[test]
    fn counters_are_parsed() {
        let vmstat = "pgfault 12\noom_kill 3\nnr_free_pages 5\n";
        assert_eq!(parse_counter(vmstat, "oom_kill"), Some(3));
        let events = "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_counter(events, "oom_kill"), Some(2));
        assert_eq!(parse_counter(events, "oom"), Some(2));
        assert_eq!(parse_counter("", "oom_kill"), None);
    }
}
