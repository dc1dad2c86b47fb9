//! Poison-request quarantine: one bad URL must not take the whole pool down, and kills from outside must
//! not take a healthy URL down either.
//!
//! Requests are fingerprinted by method and path (no query). The pool reports every worker death that
//! happened while the worker held a request ([`Quarantine::record_death`]), and every request it hands
//! to a worker whose fingerprint has such a death in the window ([`Quarantine::record_request`]; nothing is
//! counted, and nothing built, while no request has killed a worker).
//!
//! **The rule.** A fingerprint is quarantined (refused with 503 for `cooldown`, logged once) when, within
//! `window`:
//! - it has killed at least `after` workers (`--quarantine-after`, default 3), and
//! - those deaths are at least half of its requests counted since the first of them (that request
//!   included; each retry is a request of its own).
//!
//! So a URL whose every request kills its worker is quarantined at its third death (3 deaths in 3
//! requests), and one that kills every other request at its third too (3 in 5), while a busy URL that
//! outside kills happen to land on (3 deaths in 10,000 requests) never is. Two kinds of death do not
//! count at all:
//! - **The kernel's OOM killer**: the worker was SIGKILLed and the OOM kill counter (anteroom's cgroup v2
//!   `memory.events`, else `/proc/vmstat`) grew since it started; the death event says so.
//! - **Widespread deaths**: when workers holding requests of [`SPREAD_FINGERPRINTS`] or more distinct
//!   fingerprints died within [`SPREAD_WINDOW`], the cause is the environment (an operator, a deploy, the
//!   host), not a request.
//!
//! A request that kills two workers is still answered 502 and not retried a third time (the pool's rule),
//! whether or not its deaths count here. `--quarantine-after 0` turns quarantine off.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::request::Job;

/// Deaths of this many distinct fingerprints within [`SPREAD_WINDOW`] point to the environment.
pub const SPREAD_FINGERPRINTS: usize = 3;
pub const SPREAD_WINDOW: Duration = Duration::from_secs(10);
/// At most this many recent deaths are remembered for the spread test.
const SPREAD_KEEP: usize = 64;

/// `--quarantine-after`, `--quarantine-window` and `--quarantine-for` (declared with the configuration).
pub use crate::config::QuarantinePolicy as Policy;

/// Why a death does not count towards quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excuse {
    /// The kernel's OOM killer ended the worker.
    OomKiller,
    /// Workers holding this many distinct fingerprints died within [`SPREAD_WINDOW`].
    Widespread(usize),
}

/// What a death did to its fingerprint's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Quarantine is off.
    Off,
    NotCounted(Excuse),
    /// Counted: deaths and requests of this fingerprint in the window so far.
    Counted {
        deaths: u32,
        requests: u64,
    },
    /// This death put the fingerprint in quarantine.
    Quarantined {
        deaths: u32,
        requests: u64,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Off => f.write_str("quarantine is off"),
            Verdict::NotCounted(Excuse::OomKiller) => {
                f.write_str("not counted: killed by the kernel's OOM killer")
            }
            Verdict::NotCounted(Excuse::Widespread(n)) => write!(
                f,
                "not counted: workers holding {n} different URLs died within {}s (the environment, not a request)",
                SPREAD_WINDOW.as_secs()
            ),
            Verdict::Counted { deaths, requests } => {
                write!(f, "counted: {deaths} deaths in {requests} requests")
            }
            Verdict::Quarantined { deaths, requests } => {
                write!(f, "quarantined: {deaths} deaths in {requests} requests")
            }
        }
    }
}

#[derive(Default)]
struct Entry {
    /// Counted deaths in the window: when, and `requests` at that moment.
    deaths: VecDeque<(Instant, u64)>,
    /// Requests of this fingerprint handed to workers since this entry was made.
    requests: u64,
    until: Option<Instant>,
}

impl Entry {
    /// Requests since the first death in the window, that death's own included.
    fn requests_in_window(&self) -> u64 {
        self.deaths
            .front()
            .map_or(0, |(_, at)| self.requests - at + 1)
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Recent counted-or-not deaths holding a request, for the spread test.
    recent: VecDeque<(Instant, String)>,
}

pub struct Quarantine {
    policy: Policy,
    state: Mutex<State>,
    /// Some fingerprint has a death in the window or is quarantined: only then is anything counted.
    watching: AtomicBool,
}

/// `GET /path`: what identifies "the same request" for quarantine.
pub fn fingerprint(job: &Job) -> String {
    format!("{} {}", job.head.method, job.head.uri.path())
}

impl Quarantine {
    pub fn new(policy: Policy) -> Quarantine {
        Quarantine {
            policy,
            state: Mutex::new(State::default()),
            watching: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Forgets what has aged out, so the map cannot grow with every URL that ever crashed once.
    fn prune(&self, st: &mut State, now: Instant) {
        let window = self.policy.window;
        st.entries.retain(|_, e| {
            while e
                .deaths
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) >= window)
            {
                e.deaths.pop_front();
            }
            !e.deaths.is_empty() || e.until.is_some_and(|u| u > now)
        });
        self.watching
            .store(!st.entries.is_empty(), Ordering::Relaxed);
    }

    /// Counts a request handed to a worker, if its fingerprint has killed a worker in the window.
    pub fn record_request(&self, job: &Job) {
        if self.policy.after == 0 || !self.watching.load(Ordering::Relaxed) {
            return;
        }
        let fp = fingerprint(job);
        let now = Instant::now();
        let mut st = self.lock();
        self.prune(&mut st, now);
        if let Some(e) = st.entries.get_mut(&fp) {
            if !e.deaths.is_empty() {
                e.requests += 1;
            }
        }
    }

    /// Counts a worker death while it held a request with this fingerprint (`oom`: the kernel's OOM killer
    /// explains it) and says what came of it.
    pub fn record_death(&self, fp: &str, oom: bool) -> Verdict {
        self.record_death_at(fp, oom, Instant::now())
    }

    fn record_death_at(&self, fp: &str, oom: bool, now: Instant) -> Verdict {
        if self.policy.after == 0 {
            return Verdict::Off;
        }
        if oom {
            return Verdict::NotCounted(Excuse::OomKiller);
        }
        let mut st = self.lock();
        self.prune(&mut st, now);
        while st
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= SPREAD_WINDOW)
            || st.recent.len() >= SPREAD_KEEP
        {
            st.recent.pop_front();
        }
        st.recent.push_back((now, fp.to_string()));
        let mut distinct: Vec<&str> = st.recent.iter().map(|(_, f)| f.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() >= SPREAD_FINGERPRINTS {
            return Verdict::NotCounted(Excuse::Widespread(distinct.len()));
        }
        let e = st.entries.entry(fp.to_string()).or_default();
        let at = e.requests;
        e.deaths.push_back((now, at));
        let deaths = e.deaths.len() as u32;
        let requests = e.requests_in_window();
        let verdict = if deaths >= self.policy.after
            && u64::from(deaths) * 2 >= requests
            && e.until.is_none_or(|u| u <= now)
        {
            e.until = Some(now + self.policy.cooldown);
            e.deaths.clear();
            e.requests = 0;
            Verdict::Quarantined { deaths, requests }
        } else {
            Verdict::Counted { deaths, requests }
        };
        self.watching.store(true, Ordering::Relaxed);
        verdict
    }

    /// Seconds left in quarantine for this fingerprint, if it is in quarantine.
    pub fn blocked(&self, fp: &str) -> Option<u64> {
        if self.policy.after == 0 {
            return None;
        }
        let st = self.lock();
        let until = st.entries.get(fp)?.until?;
        let left = until.checked_duration_since(Instant::now())?;
        Some(left.as_secs().max(1))
    }

    /// As [`Quarantine::blocked`] for a request, with the fingerprint; builds nothing on the hot path
    /// while no request has killed a worker.
    pub fn blocked_job(&self, job: &Job) -> Option<(String, u64)> {
        if self.policy.after == 0 || !self.watching.load(Ordering::Relaxed) {
            return None;
        }
        let fp = fingerprint(job);
        self.blocked(&fp).map(|left| (fp, left))
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::job;

    fn q(after: u32) -> Quarantine {
        Quarantine::new(Policy {
            after,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(120),
        })
    }

    #[test]
    fn three_deaths_in_three_requests_quarantine_one_fingerprint_only() {
        let q = q(3);
        let bad = job("/bad");
        // The first death: its own request was not counted (nothing was watched yet).
        assert!(matches!(
            q.record_death("GET /bad", false),
            Verdict::Counted {
                deaths: 1,
                requests: 1
            }
        ));
        q.record_request(&bad); // the retry
        assert!(matches!(
            q.record_death("GET /bad", false),
            Verdict::Counted {
                deaths: 2,
                requests: 2
            }
        ));
        assert!(q.blocked("GET /bad").is_none());
        q.record_request(&bad);
        assert_eq!(
            q.record_death("GET /bad", false),
            Verdict::Quarantined {
                deaths: 3,
                requests: 3
            }
        );
        let left = q.blocked("GET /bad").unwrap();
        assert!((100..=120).contains(&left));
        assert!(q.blocked("GET /good").is_none());
        assert!(q.blocked_job(&job("/good")).is_none());
        assert_eq!(
            q.blocked_job(&bad).map(|x| x.0).as_deref(),
            Some("GET /bad")
        );
    }

    #[test]
    fn every_other_request_dying_is_poison_too() {
        let q = q(3);
        let bad = job("/bad");
        q.record_death("GET /bad", false);
        for _ in 0..2 {
            q.record_request(&bad); // answered
            q.record_request(&bad); // died
            q.record_death("GET /bad", false);
        }
        assert!(q.blocked("GET /bad").is_some(), "3 deaths in 5 requests");
    }

    #[test]
    fn outside_kills_on_a_busy_url_are_not_poison() {
        let q = q(3);
        let busy = job("/slow");
        for _ in 0..20 {
            q.record_death("GET /slow", false);
            for _ in 0..50 {
                q.record_request(&busy);
            }
        }
        assert!(q.blocked("GET /slow").is_none());
        // Other URLs are not counted while only /slow has died.
        assert!(q.lock().entries.len() == 1);
    }

    #[test]
    fn oom_kills_never_count() {
        let q = q(3);
        for _ in 0..10 {
            assert_eq!(
                q.record_death("GET /big", true),
                Verdict::NotCounted(Excuse::OomKiller)
            );
        }
        assert!(q.blocked("GET /big").is_none());
        assert!(!q.watching.load(Ordering::Relaxed));
    }

    #[test]
    fn many_urls_dying_at_once_is_the_environment() {
        let q = q(3);
        let now = Instant::now();
        assert!(matches!(
            q.record_death_at("GET /a", false, now),
            Verdict::Counted { .. }
        ));
        assert!(matches!(
            q.record_death_at("GET /b", false, now),
            Verdict::Counted { .. }
        ));
        for fp in ["GET /c", "GET /a", "GET /a", "GET /a"] {
            assert_eq!(
                q.record_death_at(fp, false, now),
                Verdict::NotCounted(Excuse::Widespread(3))
            );
        }
        assert!(q.blocked("GET /a").is_none());
        // Once the others are out of the spread window, /a counts again.
        let later = now + SPREAD_WINDOW + Duration::from_secs(1);
        assert!(matches!(
            q.record_death_at("GET /a", false, later),
            Verdict::Counted { deaths: 2, .. }
        ));
    }

    #[test]
    fn deaths_age_out_of_the_window() {
        let q = q(3);
        let t0 = Instant::now();
        q.record_death_at("GET /x", false, t0);
        q.record_death_at("GET /x", false, t0);
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(
            q.record_death_at("GET /x", false, later),
            Verdict::Counted { deaths: 1, .. }
        ));
    }

    #[test]
    fn off_when_zero() {
        let q = q(0);
        for _ in 0..10 {
            assert_eq!(q.record_death("GET /bad", false), Verdict::Off);
        }
        assert!(q.blocked("GET /bad").is_none());
    }
}
