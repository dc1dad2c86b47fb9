//! The one place where a request ends: counted in the metrics, written to the access log, and its
//! response named with its request id, whichever front it came through.
//!
//! The account is opened as soon as a front sees a request, not when it is queued, so that a request that
//! never gets that far (too large, too slow, its client gone) is counted and logged the same way. It also
//! carries the request's span (`request_id`), so that every line logged on the request's behalf, by its
//! front, here or in the queue, names it the same way without each call passing the id.
//!
//! It is closed once the response has been written, or writing it failed, not when it is about to go: the
//! log and the counts say what the client got (as nginx's `$status`, `$body_bytes_sent` and
//! `$request_completion`), which a response cut short after its head (the worker died, the client stopped
//! reading or left) is not. Each front fills one [`Delivery`] as it writes, the same record for both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue, REFERER, USER_AGENT};
use tracing::Span;

use super::Admission;
use crate::metrics::{Incomplete, Metrics, Rejection};
use crate::request::{ClientClosed, Origin, Reply, RequestHead, Timing, WorkerFailed, REQUEST_ID};

/// One request's account, opened by its front as soon as the request is seen ([`Admission::open`]),
/// given its response by [`Outcome::respond`] and closed exactly once, by [`Outcome::delivered`] once the
/// response is written (or failed), or by [`Outcome::finish`] when nobody is left to take it; both consume
/// it, so it cannot be closed twice.
#[must_use = "a request's outcome is recorded only by delivered() or finish()"]
pub struct Outcome {
    id: String,
    started: Instant,
    line: Option<AccessLine>,
    span: Span,
    metrics: Arc<Metrics>,
    state: State,
    /// What the front has written of the response so far.
    delivery: Delivery,
}

/// Where a request's account stands. Dropped unrecorded, it records itself by this: `Open`, as 499 (its
/// task dropped because the client left while the request waited in the queue or at a worker);
/// `Responding`, with the status and bytes sent, as a response the client did not get whole.
enum State {
    Open,
    Responding(Answered),
    Recorded,
}

/// What the outcome keeps of a response while the front writes it.
#[derive(Debug, Clone, Copy)]
struct Answered {
    status: u16,
    ending: Ending,
    /// From the start of the request to its response head being ready (`request_duration_seconds`).
    took: Duration,
    timing: Option<Timing>,
}

/// What the client got of a response: filled in by the front that writes it (the HTTP front's writer,
/// the FastCGI front's `send_response`) and read when the request is recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Body bytes the client took (nginx's `$body_bytes_sent`): neither the head nor the chunked framing.
    /// On the FastCGI front, the STDOUT bytes handed to the connection's writer.
    pub body_bytes: u64,
    /// Why the response stopped short of its end; None: written whole.
    pub cut: Option<Incomplete>,
}

impl Delivery {
    /// Notes why the response stopped, unless a reason was noted first (the first one is the cause).
    pub fn cut(&mut self, why: Incomplete) {
        self.cut.get_or_insert(why);
    }
}

/// How a request ended, for the metrics' `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A worker answered.
    Served,
    /// anteroom refused it on purpose.
    Refused(Rejection),
    /// A worker failed it (502/504 of anteroom's).
    Failed,
    /// The client left before its request was complete (499).
    ClientClosed,
}

impl Ending {
    fn of(resp: &Reply) -> Ending {
        let ext = resp.extensions();
        if ext.get::<ClientClosed>().is_some() {
            Ending::ClientClosed
        } else if let Some(r) = ext.get::<Rejection>() {
            Ending::Refused(*r)
        } else if ext.get::<WorkerFailed>().is_some() {
            Ending::Failed
        } else {
            Ending::Served
        }
    }

    fn label(self) -> &'static str {
        match self {
            Ending::Served => "served",
            Ending::Refused(_) => "refused",
            Ending::Failed => "failed",
            Ending::ClientClosed => "client_closed",
        }
    }
}

impl Admission {
    /// Opens the account of request `id`, which its front began to receive at `started`. `head` is what the
    /// access log shows of it; None when the request never became readable (it is then counted, not
    /// logged).
    pub fn open(
        &self,
        started: Instant,
        id: String,
        head: Option<(&RequestHead, &Origin)>,
    ) -> Outcome {
        Outcome {
            span: tracing::info_span!("request", request_id = %id),
            id,
            started,
            line: head
                .filter(|_| self.cfg.access_log)
                .map(|(head, origin)| AccessLine::new(head, origin)),
            metrics: self.metrics.clone(),
            state: State::Open,
            delivery: Delivery::default(),
        }
    }
}

impl Outcome {
    /// The request id: the client's `X-Request-Id` when it sent a sane one, else a new one.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The request's span: the front runs the request in it, so that what is logged names `request_id`.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The request's answer is `resp`, about to be written: notes what it is (served, refused and why,
    /// failed, the client gone; its status and timings) and names its request id on it, then hands it
    /// back to be written. Nothing is counted or logged until [`Outcome::delivered`].
    pub fn respond(&mut self, mut resp: Reply) -> Reply {
        self.state = State::Responding(Answered {
            status: resp.status().as_u16(),
            ending: Ending::of(&resp),
            took: self.started.elapsed(),
            timing: resp.extensions().get::<Timing>().copied(),
        });
        if let Ok(v) = HeaderValue::from_str(&self.id) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        resp
    }

    /// Where the front that writes the response keeps count of what went.
    pub fn delivery(&mut self) -> &mut Delivery {
        &mut self.delivery
    }

    /// Ends the request once its response has been written, or writing it failed: counts it and writes its
    /// access-log line with what the [`Delivery`] says the client got.
    pub fn delivered(mut self) {
        self.record();
    }

    /// Ends the request with `resp` when nobody will take it (its client left: 499; its connection is
    /// closing): counted and logged as it is, without body bytes. The reply, named with the request id,
    /// is handed back only to be dropped.
    pub fn finish(mut self, resp: Reply) -> Reply {
        let resp = self.respond(resp);
        self.record();
        resp
    }

    fn record(&mut self) {
        let answered = match std::mem::replace(&mut self.state, State::Recorded) {
            State::Responding(a) => a,
            State::Recorded => return,
            State::Open => {
                // Dropped before any answer: its client left while it waited (hyper drops the handler of a
                // closed connection; FastCGI drops the task of an aborted request). Counted once, as 499,
                // as nginx logs a client that left.
                let _enter = self.span.clone().entered();
                let gone = crate::request::client_closed(&self.id);
                drop(self.respond(gone));
                return self.record();
            }
        };
        let Answered {
            status,
            ending,
            took,
            timing,
        } = answered;
        if let Ending::Refused(why) = ending {
            self.metrics.reject(why);
        }
        self.metrics.answered(ending.label(), status, took);
        if let Some(why) = self.delivery.cut {
            self.metrics.incomplete(why);
        }
        if let Some(line) = self.line.take() {
            line.log(&self.id, status, timing, self.delivery);
        }
    }
}

impl Drop for Outcome {
    /// A request whose task was dropped before it was recorded: as 499 before it had an answer; with its
    /// status and the bytes sent, as `client_gone`, when dropped while its answer was being written (the
    /// FastCGI peer aborted it or hung up; anteroom stopped at once).
    fn drop(&mut self) {
        if let State::Responding(_) = self.state {
            self.delivery.cut(Incomplete::ClientGone);
        }
        self.record();
    }
}

/// The combined log format, plus the request id, queue wait and worker time.
struct AccessLine {
    remote: String,
    request_line: String,
    referer: String,
    user_agent: String,
}

impl AccessLine {
    fn new(head: &RequestHead, origin: &Origin) -> AccessLine {
        let h = |n: HeaderName| {
            head.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .replace('"', "\\\"")
        };
        AccessLine {
            remote: origin
                .peer
                .map_or_else(|| "unix".to_string(), |p| p.ip().to_string()),
            request_line: format!(
                "{} {} {:?}",
                head.method,
                head.target().replace('"', "%22"),
                head.version
            ),
            referer: h(REFERER),
            user_agent: h(USER_AGENT),
        }
    }

    fn log(self, id: &str, status: u16, timing: Option<Timing>, sent: Delivery) {
        let line = self.render(id, status, timing, sent, std::time::SystemTime::now());
        // Outside the request's span: the line carries its id already, and its format is the combined log
        // format whatever spans the log format would add.
        tracing::info!(target: "access", parent: None, "{line}");
    }

    /// The combined format's status and size are what the client got: the status sent, the body bytes it
    /// took; `end=` follows only for a response that did not complete.
    fn render(
        &self,
        id: &str,
        status: u16,
        timing: Option<Timing>,
        sent: Delivery,
        now: std::time::SystemTime,
    ) -> String {
        let (queue_ms, worker_ms) = match timing {
            Some(t) => (
                format!("{:.1}", t.queue_wait.as_secs_f64() * 1e3),
                format!("{:.1}", t.worker.as_secs_f64() * 1e3),
            ),
            None => ("-".into(), "-".into()),
        };
        let end = sent
            .cut
            .map_or(String::new(), |why| format!(" end={}", why.as_str()));
        format!(
            "{} - - [{}] \"{}\" {status} {} \"{}\" \"{}\" id={id} queue_ms={queue_ms} worker_ms={worker_ms}{end}",
            self.remote,
            crate::request::clf_time(now),
            self.request_line,
            sent.body_bytes,
            self.referer,
            self.user_agent,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};

    use super::*;
    use crate::request::{client_closed, error_response, full};

    #[test]
    fn endings() {
        let ok = Reply::new(full("hi"));
        assert_eq!(Ending::of(&ok), Ending::Served);
        assert_eq!(Ending::of(&client_closed("a")).label(), "client_closed");
        let r = crate::admission::refusal::too_large("a", 10);
        assert_eq!(Ending::of(&r), Ending::Refused(Rejection::BodyTooLarge));
        let mut failed = error_response(StatusCode::BAD_GATEWAY, "a", "x");
        failed.extensions_mut().insert(WorkerFailed);
        assert_eq!(Ending::of(&failed).label(), "failed");
    }

    fn outcome(metrics: &Arc<Metrics>, id: &str) -> Outcome {
        Outcome {
            id: id.to_string(),
            started: Instant::now(),
            line: None,
            span: Span::none(),
            metrics: metrics.clone(),
            state: State::Open,
            delivery: Delivery::default(),
        }
    }

    fn scrape(metrics: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics.registry()).unwrap();
        text
    }

    fn count(text: &str, needle: &str) -> usize {
        text.lines().filter(|l| l.contains(needle)).count()
    }

    #[test]
    fn finish_counts_once_and_names_the_request() {
        let metrics = Arc::new(Metrics::new());
        let served = outcome(&metrics, "r-1").finish(Reply::new(full("hi")));
        assert_eq!(served.headers()[REQUEST_ID], "r-1");
        let refused =
            outcome(&metrics, "r-2").finish(crate::admission::refusal::too_large("r-2", 1));
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let text = scrape(&metrics);
        assert_eq!(
            count(&text, r#"outcome="served",status="200"} 1"#),
            1,
            "{text}"
        );
        assert_eq!(
            count(&text, r#"outcome="refused",status="413"} 1"#),
            1,
            "{text}"
        );
        // Dropped unfinished (its client left while it waited): counted once, as 499.
        drop(outcome(&metrics, "r-3"));
        let text = scrape(&metrics);
        let closed = r#"outcome="client_closed",status="499"} 1"#;
        assert_eq!(count(&text, closed), 1, "{text}");
        assert_eq!(
            count(&text, r#"outcome="served",status="200"} 1"#),
            1,
            "{text}"
        );
        assert_eq!(count(&text, r#"reason="body_too_large"} 1"#), 1, "{text}");
        assert_eq!(
            count(&text, "anteroom_responses_incomplete_total{"),
            0,
            "{text}"
        );
    }

    #[test]
    fn counted_when_delivered_with_what_went() {
        let metrics = Arc::new(Metrics::new());
        let mut o = outcome(&metrics, "r-1");
        let sent = o.respond(Reply::new(full("hi")));
        assert_eq!(sent.headers()[REQUEST_ID], "r-1");
        // Not counted while it is being written.
        assert_eq!(count(&scrape(&metrics), r#"status="200"} 1"#), 0);
        o.delivery().body_bytes = 2;
        o.delivered();
        // Cut short: counted by the status sent, and as incomplete, once.
        let mut o = outcome(&metrics, "r-2");
        drop(o.respond(Reply::new(full("hi"))));
        o.delivery().cut(Incomplete::SendTimeout);
        o.delivery().cut(Incomplete::ClientGone);
        o.delivered();
        // Dropped while its answer was being written (a FastCGI abort): its status, and client_gone.
        let mut o = outcome(&metrics, "r-3");
        drop(o.respond(Reply::new(full("hi"))));
        drop(o);
        let text = scrape(&metrics);
        assert_eq!(
            count(&text, r#"outcome="served",status="200"} 3"#),
            1,
            "{text}"
        );
        assert_eq!(count(&text, r#"reason="send_timeout"} 1"#), 1, "{text}");
        assert_eq!(count(&text, r#"reason="client_gone"} 1"#), 1, "{text}");
        assert_eq!(count(&text, "status=\"499\""), 0, "{text}");
    }

    #[test]
    fn access_line_format() {
        let mut headers = HeaderMap::new();
        headers.insert(USER_AGENT, HeaderValue::from_static("curl \"8\""));
        let head = RequestHead {
            method: Method::GET,
            uri: "/a?b=c".parse().unwrap(),
            version: Version::HTTP_11,
            headers,
        };
        let origin = Origin {
            peer: Some("10.0.0.1:5000".parse().unwrap()),
            local: None,
            proxied: None,
        };
        let timing = Timing {
            queue_wait: Duration::from_micros(1500),
            worker: Duration::from_millis(20),
        };
        let whole = Delivery {
            body_bytes: 5,
            cut: None,
        };
        let line = AccessLine::new(&head, &origin).render(
            "r1",
            200,
            Some(timing),
            whole,
            UNIX_EPOCH + Duration::from_secs(971_186_136),
        );
        assert_eq!(
            line,
            "10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /a?b=c HTTP/1.1\" 200 5 \"-\" \"curl \\\"8\\\"\" id=r1 queue_ms=1.5 worker_ms=20.0"
        );
        let cut = Delivery {
            body_bytes: 300_000,
            cut: Some(Incomplete::AbortedUpstream),
        };
        let line = AccessLine::new(&head, &origin).render("r1", 200, Some(timing), cut, UNIX_EPOCH);
        assert!(
            line.contains("\" 200 300000 \"")
                && line.ends_with("worker_ms=20.0 end=aborted_upstream"),
            "{line}"
        );
        let unix = AccessLine::new(&head, &Origin::default()).render(
            "r2",
            499,
            None,
            Delivery::default(),
            UNIX_EPOCH,
        );
        assert!(
            unix.starts_with("unix - - [01/Jan/1970:00:00:00 +0000] "),
            "{unix}"
        );
        assert!(
            unix.contains("\" 499 0 ") && unix.ends_with("queue_ms=- worker_ms=-"),
            "{unix}"
        );
    }
}
