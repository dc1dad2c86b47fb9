//! Poison-request quarantine: one bad URL must not take the whole pool down.
//!
//! Requests are fingerprinted by method and path (no query). When requests of one fingerprint have killed
//! `after` workers within `window`, that fingerprint is refused with 503 for `cooldown`, and the refusal is
//! logged once, while every other URL keeps the full pool. The pool records deaths; the front asks before
//! it queues a request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::request::Job;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Deaths that trigger quarantine; 0 turns it off.
    pub after: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

#[derive(Default)]
struct Entry {
    deaths: Vec<Instant>,
    until: Option<Instant>,
}

pub struct Quarantine {
    policy: Policy,
    entries: Mutex<HashMap<String, Entry>>,
}

/// `GET /path`: what identifies "the same request" for quarantine.
pub fn fingerprint(job: &Job) -> String {
    format!("{} {}", job.head.method, job.head.uri.path())
}

impl Quarantine {
    pub fn new(policy: Policy) -> Quarantine {
        Quarantine {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a worker death caused by a request with this fingerprint; true if that put it in quarantine.
    pub fn record_death(&self, fp: &str) -> bool {
        if self.policy.after == 0 {
            return false;
        }
        let now = Instant::now();
        let mut map = self.lock();
        // Forget what has aged out, so the map cannot grow with every URL that ever crashed once.
        map.retain(|_, e| {
            e.deaths
                .retain(|t| now.duration_since(*t) < self.policy.window);
            !e.deaths.is_empty() || e.until.is_some_and(|u| u > now)
        });
        let e = map.entry(fp.to_string()).or_default();
        e.deaths.push(now);
        if e.deaths.len() as u32 >= self.policy.after && e.until.is_none_or(|u| u <= now) {
            e.until = Some(now + self.policy.cooldown);
            e.deaths.clear();
            return true;
        }
        false
    }

    /// Seconds left in quarantine for this fingerprint, if it is in quarantine.
    pub fn blocked(&self, fp: &str) -> Option<u64> {
        if self.policy.after == 0 {
            return None;
        }
        let map = self.lock();
        let until = map.get(fp)?.until?;
        let left = until.checked_duration_since(Instant::now())?;
        Some(left.as_secs().max(1))
    }

    /// As [`Quarantine::blocked`] for a request, with the fingerprint; builds nothing on the hot path
    /// while no request has killed a worker.
    pub fn blocked_job(&self, job: &Job) -> Option<(String, u64)> {
        if self.policy.after == 0 || self.lock().is_empty() {
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

    #[test]
    fn three_deaths_quarantine_one_fingerprint_only() {
        let q = Quarantine::new(Policy {
            after: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(120),
        });
        assert!(!q.record_death("GET /bad"));
        assert!(!q.record_death("GET /bad"));
        assert!(q.blocked("GET /bad").is_none());
        assert!(q.record_death("GET /bad"));
        let left = q.blocked("GET /bad").unwrap();
        assert!((100..=120).contains(&left));
        assert!(q.blocked("GET /good").is_none());
    }

    #[test]
    fn off_when_zero() {
        let q = Quarantine::new(Policy {
            after: 0,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(120),
        });
        for _ in 0..10 {
            assert!(!q.record_death("GET /bad"));
        }
        assert!(q.blocked("GET /bad").is_none());
    }
}
