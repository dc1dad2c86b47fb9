//! Why a worker ended, said once and kept: the death event and the list of recent deaths. (The crash-loop
//! log limiter and --crash-exit's count are the supervisor's: they span all slots.)

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::{Shared, YOUNG};
use crate::metrics::CauseLabels;
use crate::sync::lock;
pub use crate::sys::process::signal_name;

/// Recent deaths kept for the status page.
const RECENT_DEATHS: usize = 50;

/// Why a worker process ended, as attributed by its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It exited or was killed by something other than anteroom.
    Crashed,
    /// The kernel's OOM killer ended it (SIGKILL, and the OOM kill counter grew since it started).
    Oom,
    /// anteroom stopped it: it held a request longer than --request-timeout.
    Timeout,
    /// anteroom replaced it on purpose (max requests, max RSS, reload, shutdown).
    Retired,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Crashed => "crashed",
            Cause::Oom => "oom",
            Cause::Timeout => "timeout",
            Cause::Retired => "retired",
        }
    }
}

impl serde::Serialize for Cause {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The request a worker was holding when it died.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldRequest {
    pub id: String,
    pub method: String,
    pub target: String,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    #[serde(rename = "elapsed_ms", serialize_with = "ser_ms")]
    pub elapsed: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn ser_unix<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
    )
}

/// One worker death, explained.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Death {
    /// Seconds since the Unix epoch.
    #[serde(serialize_with = "ser_unix")]
    pub at: SystemTime,
    pub slot: usize,
    pub pid: u32,
    pub status: String,
    pub cause: Cause,
    #[serde(rename = "lived_ms", serialize_with = "ser_ms")]
    pub lived: Duration,
    pub served: u64,
    pub request: Option<HeldRequest>,
    pub last_output: Vec<String>,
    /// Why it never became ready, if it did not.
    pub start_failure: Option<String>,
    /// For a failed start: the backoff before the slot's next attempt.
    #[serde(rename = "restart_in_ms", serialize_with = "ser_ms")]
    pub restart_in: Duration,
    /// For a death holding a request: what it did to the request's standing with the quarantine.
    pub quarantine: Option<String>,
}

/// A worker's last output lines, shared with the tasks that log its output.
pub(super) type Tail = std::sync::Arc<Mutex<VecDeque<String>>>;

/// How a worker ended, as far as its death event goes: filled in by its slot as its life goes on.
pub(super) struct Fate {
    pub(super) cause: Cause,
    /// The request it held when it died.
    pub(super) held: Option<HeldRequest>,
    /// Why it never became ready.
    pub(super) start_failure: Option<String>,
    /// What its death did to the request's standing with the quarantine.
    pub(super) quarantine: Option<String>,
    /// Whether the OOM killer was asked about this death already (each kill explains one death).
    oom_checked: bool,
    /// anteroom ended it (SIGTERM, then SIGKILL after the grace period): not the OOM killer.
    pub(super) terminated: bool,
    /// The OOM kill counter when it started.
    oom_at_start: Option<u64>,
}

impl Fate {
    pub(super) fn new(oom_at_start: Option<u64>) -> Fate {
        Fate {
            cause: Cause::Crashed,
            held: None,
            start_failure: None,
            quarantine: None,
            oom_checked: false,
            terminated: false,
            oom_at_start,
        }
    }

    /// Crashed, or Oom when the process was SIGKILLed and an OOM kill since its start explains it.
    pub(super) fn attribute(&mut self, sh: &Shared, status: &std::io::Result<ExitStatus>) -> bool {
        use std::os::unix::process::ExitStatusExt;
        if self.oom_checked || self.terminated {
            return self.cause == Cause::Oom;
        }
        self.oom_checked = true;
        let killed = matches!(status, Ok(st) if st.signal() == Some(libc::SIGKILL));
        let oom = killed && sh.oom.explains(self.oom_at_start);
        if oom {
            self.cause = Cause::Oom;
        }
        oom
    }
}

/// The most recent deaths, oldest first, for the status page.
#[derive(Default)]
pub(super) struct Deaths(Mutex<VecDeque<Death>>);

impl Deaths {
    fn push(&self, d: &Death) {
        let mut deaths = lock(&self.0);
        if deaths.len() == RECENT_DEATHS {
            deaths.pop_front();
        }
        deaths.push_back(d.clone());
    }

    pub(super) fn recent(&self) -> Vec<Death> {
        lock(&self.0).iter().cloned().collect()
    }
}

/// Logs a death as one event, keeps it for the status page, and counts it towards --crash-exit.
pub(super) fn record_death(sh: &Shared, d: &Death) {
    sh.metrics
        .deaths
        .get_or_create(&CauseLabels {
            cause: d.cause.as_str(),
        })
        .inc();
    // A failed start: never ready, or gone within seconds without having held a request. A worker that
    // died holding one is explained as such, whenever it died.
    let young =
        d.start_failure.is_some() || (d.served == 0 && d.lived < YOUNG && d.request.is_none());
    let r = d.request.as_ref();
    let log = || {
        let (level_error, what) = match d.cause {
            Cause::Crashed if young => (true, "worker failed at start; restarting after a backoff"),
            Cause::Crashed => (true, "worker died"),
            Cause::Oom => (true, "worker killed by the kernel's OOM killer"),
            Cause::Timeout => (true, "worker stopped: request timeout"),
            Cause::Retired => (false, "worker retired"),
        };
        macro_rules! event {
            ($lvl:ident) => {
                tracing::$lvl!(
                    slot = d.slot,
                    pid = d.pid,
                    status = %d.status,
                    lived_ms = d.lived.as_millis() as u64,
                    served = d.served,
                    request_id = r.map(|r| r.id.as_str()),
                    request = r.map(|r| format!("{} {}", r.method, r.target)),
                    request_sent_bytes = r.map(|r| r.sent_bytes),
                    request_received_bytes = r.map(|r| r.received_bytes),
                    request_ms = r.map(|r| r.elapsed.as_millis() as u64),
                    last_output = ?d.last_output,
                    why = d.start_failure.as_deref(),
                    restart_in_ms = young.then(|| d.restart_in.as_millis() as u64),
                    quarantine = d.quarantine.as_deref(),
                    "{what}"
                )
            };
        }
        if level_error {
            event!(error)
        } else {
            event!(info)
        }
    };
    if young && matches!(d.cause, Cause::Crashed | Cause::Oom) {
        sh.crashes.loop_event(log);
    } else {
        log();
    }
    sh.deaths.push(d);
    if d.cause != Cause::Retired {
        sh.crashes.count(sh.cfg.crash_exit.as_ref());
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

#[cfg(test)]
mod tests {
    use super::*;

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
