//! The rules a request head must meet before it becomes a [`Job`](super::Job), the same for every front.
//!
//! A worker trusts what it is given: the host it believes it serves, the headers it reads the body by, the
//! names it maps to CGI variables. So what is ambiguous is refused here, once, before any worker sees it,
//! and what only concerns the client's connection to anteroom is removed:
//!
//! - **Host** (RFC 9112 §3.2): an HTTP/1.1 request without one, with more than one, or with one that is not
//!   a `host[:port]` authority (spaces, slashes, user info, bytes outside the URI grammar) gets a 400. An
//!   HTTP/1.0 request may have none. Nothing is invented in its place at this stage.
//! - **Absolute-form targets** (`GET http://a.example/x`, RFC 9112 §3.2.2): the target's authority wins
//!   over the `Host` header, which is replaced by it, and the target becomes origin-form (`/x`), so that
//!   every worker protocol, the log and the quarantine see one request. User info in it (deprecated by RFC
//!   9110 §4.2.4, and a phishing device) and an authority-form target outside CONNECT get a 400.
//! - **CONNECT** asks for a tunnel; anteroom is an origin server in front of applications, not a proxy. It
//!   gets a 405 with `Allow` (what nginx answers too), and never reaches a worker, where it used to become a
//!   `CONNECT /` whose answer hyper then swallowed as a tunnel's.
//! - **Hop-by-hop headers** (RFC 9110 §7.6.1: `Connection`, `Keep-Alive`, `Transfer-Encoding`, `TE`,
//!   `Trailer`, `Upgrade`, `Proxy-Connection`, and any header named in `Connection`) describe the client's
//!   connection, which ends at anteroom: they are removed. Above all `Transfer-Encoding`, since the body is
//!   read whole and de-chunked here: a worker told `chunked` next to a `Content-Length` (Werkzeug) reads an
//!   empty body. A `Connection` that names `Host` or `Content-Length` does not remove them: anteroom reads
//!   both itself, and removing them would only make the request lie about itself.
//! - **Names with `_`** are dropped (nginx's `underscores_in_headers off`): `X-Forwarded_For` and
//!   `X-Forwarded-For` are one CGI variable, `HTTP_X_FORWARDED_FOR`, and many HTTP frameworks fold them the
//!   same way, so one could pass for the other. Dropped for every worker protocol alike, logged at debug.

use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{HeaderMap, Method, Version};

use super::RequestHead;

/// Whether a request must carry a `Host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRule {
    /// A client's HTTP/1.1 request must carry exactly one (RFC 9112 §3.2): the HTTP front.
    Required,
    /// The peer is the HTTP server that enforced that rule (nginx's `fastcgi_pass`), and may send requests
    /// of its own without `HTTP_HOST` (cgi-fcgi, health checks): a `Host` must be valid when present.
    IfPresent,
}

/// Why a request head is refused before it is queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadHead {
    #[error("an HTTP/1.1 request must have a Host header")]
    NoHost,
    #[error("the request has {0} Host headers; it must have one")]
    ManyHosts(usize),
    #[error("the Host header {0:?} is not a valid host[:port]")]
    BadHost(String),
    #[error("the request target's authority {0:?} is not a valid host[:port]")]
    BadTarget(String),
    #[error("CONNECT is not served: anteroom is not a proxy")]
    Connect,
}

impl BadHead {
    /// The methods a 405 names in its `Allow` header: those anteroom passes on (the application may still
    /// refuse some for a given resource).
    pub const ALLOW: &'static str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH";
}

pub use crate::http1::HOP_BY_HOP;

/// One of [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

impl RequestHead {
    /// The request target as logs show it: the path and query, or the authority of a CONNECT
    /// (`host:port`, which has no path), else `/`.
    pub fn target(&self) -> &str {
        self.uri
            .path_and_query()
            .map(|p| p.as_str())
            .or_else(|| self.uri.authority().map(|a| a.as_str()))
            .unwrap_or("/")
    }

    /// Checks the head against the rules of this module and puts it in the one form workers get: `Host`
    /// from an absolute-form target, no hop-by-hop headers, no names with `_`. Unchanged when refused.
    pub fn check(&mut self, rule: HostRule) -> Result<(), BadHead> {
        if self.method == Method::CONNECT {
            return Err(BadHead::Connect);
        }
        self.check_host(rule)?;
        if let Some(authority) = self.uri.authority() {
            // Absolute-form (with a scheme) is any server's to accept; authority-form is CONNECT's alone.
            if self.uri.scheme().is_none() || !valid_authority(authority) {
                return Err(BadHead::BadTarget(authority.as_str().to_string()));
            }
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|_| BadHead::BadTarget(authority.as_str().to_string()))?;
            let origin_form = self
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            self.headers.insert(HOST, host);
            self.uri = Uri::from(origin_form);
        }
        remove_hop_by_hop(&mut self.headers);
        remove_underscored(&mut self.headers);
        Ok(())
    }

    fn check_host(&self, rule: HostRule) -> Result<(), BadHead> {
        let mut hosts = self.headers.get_all(HOST).iter();
        match (hosts.next(), hosts.count()) {
            (None, _) => {
                let http11 = !matches!(self.version, Version::HTTP_10 | Version::HTTP_09);
                if rule == HostRule::Required && http11 {
                    return Err(BadHead::NoHost);
                }
            }
            (Some(host), 0) => {
                let valid = Authority::try_from(host.as_bytes())
                    .ok()
                    .is_some_and(|a| valid_authority(&a));
                if !valid {
                    let shown = String::from_utf8_lossy(host.as_bytes());
                    return Err(BadHead::BadHost(shown.chars().take(200).collect()));
                }
            }
            (Some(_), more) => return Err(BadHead::ManyHosts(more + 1)),
        }
        Ok(())
    }
}

/// `host[:port]` and nothing else. `Authority` has checked the URI grammar (no spaces, slashes, controls,
/// bytes above 127, stray `%`, unbalanced brackets, a second colon); left to check are user info, which a
/// `Host` never carries, and a port that is a number (an empty one, `host:`, is refused too, as nginx does).
fn valid_authority(a: &Authority) -> bool {
    let s = a.as_str();
    if s.contains('@') || a.host().is_empty() {
        return false;
    }
    match s[a.host().len()..].strip_prefix(':') {
        // Digits only: `u16` parsing alone would take `+80`.
        Some(port) => port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok(),
        None => s.len() == a.host().len(),
    }
}

/// Removes the hop-by-hop headers and those the client's `Connection` names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| *n != HOST && *n != CONTENT_LENGTH)
        .collect();
    for name in named {
        headers.remove(name);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

/// Drops the headers whose name holds an underscore (see the module's doc).
fn remove_underscored(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        tracing::debug!(header = %name, "request header dropped: its name holds an underscore");
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, target: &str, version: Version, headers: &[(&str, &str)]) -> RequestHead {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        RequestHead {
            method: Method::from_bytes(method.as_bytes()).unwrap(),
            uri: target.parse().unwrap(),
            version,
            headers: h,
        }
    }

    const V11: Version = Version::HTTP_11;

    /// Hosts (each a `Host` header), version, rule, and how the check ends.
    type HostCase = (&'static [&'static str], Version, HostRule, &'static str);

    const HOST_CASES: &[HostCase] = &[
        (&["a.example"], V11, HostRule::Required, "ok"),
        (&["a.example:8080"], V11, HostRule::Required, "ok"),
        (&["[::1]:8080"], V11, HostRule::Required, "ok"),
        (&["[::1]"], V11, HostRule::Required, "ok"),
        (&["127.0.0.1"], V11, HostRule::Required, "ok"),
        (&["under_score.example"], V11, HostRule::Required, "ok"),
        (&[], V11, HostRule::Required, "no host"),
        (&[], Version::HTTP_10, HostRule::Required, "ok"),
        (&[], V11, HostRule::IfPresent, "ok"),
        (&["a", "b"], V11, HostRule::Required, "many"),
        (&["a", "b"], V11, HostRule::IfPresent, "many"),
        (&["a b"], V11, HostRule::Required, "bad host"),
        (&["a/b"], V11, HostRule::Required, "bad host"),
        (&["a\\b"], V11, HostRule::Required, "bad host"),
        (&["u@a"], V11, HostRule::Required, "bad host"),
        (&["a:x"], V11, HostRule::Required, "bad host"),
        (&["a:"], V11, HostRule::Required, "bad host"),
        (&["a:+80"], V11, HostRule::Required, "bad host"),
        (&["a:1:2"], V11, HostRule::Required, "bad host"),
        (&["a:99999"], V11, HostRule::Required, "bad host"),
        (&[""], V11, HostRule::Required, "bad host"),
        (&["a%20b"], V11, HostRule::IfPresent, "bad host"),
        (&["[::1"], V11, HostRule::Required, "bad host"),
    ];

    fn ending(r: &Result<(), BadHead>) -> &'static str {
        match r {
            Ok(()) => "ok",
            Err(BadHead::NoHost) => "no host",
            Err(BadHead::ManyHosts(_)) => "many",
            Err(BadHead::BadHost(_)) => "bad host",
            Err(BadHead::BadTarget(_)) => "bad target",
            Err(BadHead::Connect) => "connect",
        }
    }

    #[test]
    fn host_rules() {
        for (hosts, version, rule, want) in HOST_CASES {
            let headers: Vec<(&str, &str)> = hosts.iter().map(|h| ("host", *h)).collect();
            let mut h = head("GET", "/", *version, &headers);
            let got = h.check(*rule);
            assert_eq!(
                ending(&got),
                *want,
                "{hosts:?} {version:?} {rule:?}: {got:?}"
            );
        }
        let mut h = head("GET", "/", V11, &[("host", "a b")]);
        assert_eq!(
            h.check(HostRule::Required),
            Err(BadHead::BadHost("a b".into()))
        );
    }

    #[test]
    fn absolute_form_takes_the_targets_authority() {
        let mut h = head(
            "GET",
            "http://a.example:81/x?q=1",
            V11,
            &[("host", "b.example")],
        );
        h.check(HostRule::Required).unwrap();
        assert_eq!(h.headers[HOST], "a.example:81");
        assert_eq!(h.headers.get_all(HOST).iter().count(), 1);
        assert_eq!(h.uri, "/x?q=1");
        assert!(h.uri.authority().is_none());

        let mut h = head(
            "GET",
            "http://u:p@a.example/x",
            V11,
            &[("host", "a.example")],
        );
        assert!(matches!(
            h.check(HostRule::Required),
            Err(BadHead::BadTarget(_))
        ));
        let mut h = head("GET", "a.example:80", V11, &[("host", "a.example")]);
        assert!(matches!(
            h.check(HostRule::Required),
            Err(BadHead::BadTarget(_))
        ));
        let mut h = head("CONNECT", "a.example:443", V11, &[("host", "a.example")]);
        assert_eq!(h.check(HostRule::Required), Err(BadHead::Connect));
    }

    #[test]
    fn hop_by_hop_and_underscores_are_removed() {
        let mut h = head(
            "POST",
            "/",
            V11,
            &[
                ("host", "a"),
                ("connection", "keep-alive, X-Secret, host, content-length"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("te", "trailers"),
                ("trailer", "x-t"),
                ("upgrade", "websocket"),
                ("proxy-connection", "keep-alive"),
                ("x-secret", "1"),
                ("content-length", "3"),
                ("x-forwarded_for", "6.6.6.6"),
                ("x-forwarded-for", "1.2.3.4"),
                ("accept", "*/*"),
            ],
        );
        h.check(HostRule::Required).unwrap();
        let mut left: Vec<&str> = h.headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["accept", "content-length", "host", "x-forwarded-for"]
        );
        assert_eq!(h.headers["x-forwarded-for"], "1.2.3.4");
    }
}
