//! The one place where a request ends: counted in the metrics, written to the access log, and its
//! response named with its request id, whichever front it came through.
//!
//! The account is opened as soon as a front sees a request, not when it is queued, so that a request that
//! never gets that far (too large, too slow, its client gone) is counted and logged the same way. It also
//! carries the request's span (`request_id`), so that every line logged on the request's behalf, by its
//! front, here or in the queue, names it the same way without each call passing the id.

use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, REFERER, USER_AGENT};
use tracing::Span;

use super::Admission;
use crate::metrics::{Metrics, Rejection};
use crate::request::{ClientClosed, Origin, Reply, RequestHead, Timing, WorkerFailed, REQUEST_ID};

/// One request's account, opened by its front as soon as the request is seen ([`Admission::open`]) and
/// closed exactly once by [`Outcome::finish`]; consuming it there means it cannot be closed twice.
#[must_use = "a request's outcome is recorded only by finish()"]
pub struct Outcome {
    id: String,
    started: Instant,
    line: Option<AccessLine>,
    span: Span,
    metrics: Arc<Metrics>,
    /// Set once the request is recorded; an outcome dropped before (its task dropped because the client
    /// left while the request waited in the queue or at a worker) records itself as 499.
    finished: bool,
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
            finished: false,
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

    /// Ends the request with `resp`: counts it (served, refused and why, failed, or the client gone),
    /// writes its access-log line, and names its request id on the response, which it hands back to be
    /// sent (or dropped, when nobody is left to take it).
    pub fn finish(mut self, resp: Reply) -> Reply {
        self.end(resp)
    }

    fn end(&mut self, mut resp: Reply) -> Reply {
        self.finished = true;
        let ending = Ending::of(&resp);
        if let Ending::Refused(why) = ending {
            self.metrics.reject(why);
        }
        self.metrics.answered(
            ending.label(),
            resp.status().as_u16(),
            self.started.elapsed(),
        );
        if let Some(line) = self.line.take() {
            line.log(&self.id, &resp);
        }
        if let Ok(v) = HeaderValue::from_str(&self.id) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        resp
    }
}

impl Drop for Outcome {
    /// A request whose task was dropped before it ended: its client left while it waited in the queue or at
    /// a worker (hyper drops the handler of a closed connection; FastCGI drops the task of an aborted
    /// request). It is still counted and logged once, as 499, as nginx logs a client that left.
    fn drop(&mut self) {
        if !self.finished {
            let _enter = self.span.clone().entered();
            let gone = crate::request::client_closed(&self.id);
            drop(self.end(gone));
        }
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

    fn log(self, id: &str, resp: &Reply) {
        let line = self.render(id, resp, std::time::SystemTime::now());
        // Outside the request's span: the line carries its id already, and its format is the combined log
        // format whatever spans the log format would add.
        tracing::info!(target: "access", parent: None, "{line}");
    }

    fn render(&self, id: &str, resp: &Reply, now: std::time::SystemTime) -> String {
        let bytes = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let (queue_ms, worker_ms) = match resp.extensions().get::<Timing>() {
            Some(t) => (
                format!("{:.1}", t.queue_wait.as_secs_f64() * 1e3),
                format!("{:.1}", t.worker.as_secs_f64() * 1e3),
            ),
            None => ("-".into(), "-".into()),
        };
        format!(
            "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\" id={id} queue_ms={queue_ms} worker_ms={worker_ms}",
            self.remote,
            crate::request::clf_time(now),
            self.request_line,
            resp.status().as_u16(),
            bytes,
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

    #[test]
    fn finish_counts_once_and_names_the_request() {
        let metrics = Arc::new(Metrics::new());
        let outcome = |id: &str| Outcome {
            id: id.to_string(),
            started: Instant::now(),
            line: None,
            span: Span::none(),
            metrics: metrics.clone(),
            finished: false,
        };
        let served = outcome("r-1").finish(Reply::new(full("hi")));
        assert_eq!(served.headers()[REQUEST_ID], "r-1");
        let refused = outcome("r-2").finish(crate::admission::refusal::too_large("r-2", 1));
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics.registry()).unwrap();
        let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(count(r#"outcome="served",status="200"} 1"#), 1, "{text}");
        assert_eq!(count(r#"outcome="refused",status="413"} 1"#), 1, "{text}");
        // Dropped unfinished (its client left while it waited): counted once, as 499.
        drop(outcome("r-3"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics.registry()).unwrap();
        let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(
            count(r#"outcome="client_closed",status="499"} 1"#),
            1,
            "{text}"
        );
        assert_eq!(count(r#"outcome="served",status="200"} 1"#), 1, "{text}");
        assert_eq!(count(r#"reason="body_too_large"} 1"#), 1, "{text}");
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
        let mut resp = Reply::new(full("hello"));
        resp.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("5"));
        resp.extensions_mut().insert(Timing {
            queue_wait: Duration::from_micros(1500),
            worker: Duration::from_millis(20),
        });
        let line = AccessLine::new(&head, &origin).render(
            "r1",
            &resp,
            UNIX_EPOCH + Duration::from_secs(971_186_136),
        );
        assert_eq!(
            line,
            "10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /a?b=c HTTP/1.1\" 200 5 \"-\" \"curl \\\"8\\\"\" id=r1 queue_ms=1.5 worker_ms=20.0"
        );
        let unix = AccessLine::new(&head, &Origin::default()).render(
            "r2",
            &client_closed("r2"),
            UNIX_EPOCH,
        );
        assert!(
            unix.starts_with("unix - - [01/Jan/1970:00:00:00 +0000] "),
            "{unix}"
        );
        assert!(
            unix.contains("\" 499 - ") && unix.ends_with("queue_ms=- worker_ms=-"),
            "{unix}"
        );
    }
}
