//! HTTP to CGI/1.1 and back (RFC 3875): the variables a FastCGI worker sees, and the response head it sends.
//!
//! Two rules protect the application from its clients. A `Proxy` header never becomes `HTTP_PROXY`
//! (httpoxy: many libraries take that variable as their outgoing proxy). And a header whose name holds an
//! underscore is dropped, as nginx does by default, because `X-Forwarded_For` and `X-Forwarded-For` both map
//! to `HTTP_X_FORWARDED_FOR` and one could overwrite the other.

use http::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use percent_encoding::percent_decode;

/// Headers that describe one connection, not the message; they pass neither way.
pub use crate::request::is_hop_by_hop;
use crate::request::Job;

pub const SERVER_SOFTWARE: &str = concat!("anteroom/", env!("CARGO_PKG_VERSION"));

/// The CGI variables for `job`, then the fixed `params` (which override computed ones of the same name).
pub fn params(job: &Job, fixed: &[(String, String)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let head = &job.head;
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(24 + head.headers.len());
    let mut put = |k: &str, v: &[u8]| out.push((k.as_bytes().to_vec(), v.to_vec()));

    let path = head.uri.path();
    let query = head.uri.query().unwrap_or("");
    let (host, host_port) = host_and_port(&head.headers);
    let local = job.origin.local;
    let server_name = host
        .map(str::to_string)
        .or_else(|| local.map(|a| a.ip().to_string()))
        .unwrap_or_else(|| "localhost".into());
    // The scheme the client used, when a trusted proxy said (`request/origin.rs`); its port is the
    // client's, not that of anteroom's listener behind the proxy.
    let https = job.origin.https();
    let server_port = host_port
        .map(str::to_string)
        .or_else(|| https.then(|| "443".to_string()))
        .or_else(|| local.map(|a| a.port().to_string()))
        .unwrap_or_else(|| "80".into());
    // A unix-socket client has no address; it is on this machine, which is what 127.0.0.1 says.
    let (remote_addr, remote_port) = match job.origin.peer {
        Some(a) => (a.ip().to_string(), a.port().to_string()),
        None => ("127.0.0.1".into(), "0".into()),
    };

    put("GATEWAY_INTERFACE", b"CGI/1.1");
    put("SERVER_SOFTWARE", SERVER_SOFTWARE.as_bytes());
    put("SERVER_PROTOCOL", version_str(head.version).as_bytes());
    put("SERVER_NAME", server_name.as_bytes());
    put("SERVER_PORT", server_port.as_bytes());
    if let Some(a) = local {
        put("SERVER_ADDR", a.ip().to_string().as_bytes());
    }
    put("REMOTE_ADDR", remote_addr.as_bytes());
    put("REMOTE_PORT", remote_port.as_bytes());
    if https {
        put("REQUEST_SCHEME", b"https");
        put("HTTPS", b"on");
    } else {
        put("REQUEST_SCHEME", b"http");
    }
    put("REQUEST_METHOD", head.method.as_str().as_bytes());
    put(
        "REQUEST_URI",
        head.uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    put("DOCUMENT_URI", path.as_bytes());
    // The app is mounted at the root: all of the path is PATH_INFO, decoded as RFC 3875 asks.
    put("SCRIPT_NAME", b"");
    // An invalid escape (`%zz`, a `%` near the end) stays as it is, as in nginx and Apache.
    let path_info: std::borrow::Cow<[u8]> = percent_decode(path.as_bytes()).into();
    put("PATH_INFO", &path_info);
    put("QUERY_STRING", query.as_bytes());
    if let Some(ct) = head.headers.get(CONTENT_TYPE) {
        put("CONTENT_TYPE", ct.as_bytes());
    }
    if !job.body.is_empty() || head.headers.contains_key(CONTENT_LENGTH) {
        // The body was de-chunked and counted when it was read: this length is the true one.
        put("CONTENT_LENGTH", job.body.len().to_string().as_bytes());
    }
    put("REQUEST_ID", job.id.as_bytes());

    header_vars(job, &mut out);

    for (k, v) in fixed {
        out.retain(|(name, _)| name != k.as_bytes());
        out.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    out
}

/// Each request header as an `HTTP_*` variable (RFC 3875 4.1.18), less those that must not be one: the body's
/// own (`CONTENT_*` say them), `Proxy` (httpoxy), names with `_` (which would alias a `-` one) and hop-by-hop
/// ones (the body is de-chunked: `HTTP_TRANSFER_ENCODING` next to `CONTENT_LENGTH` would lie). The fronts
/// have removed the last two already ([`crate::request::RequestHead::check`]); this holds for any `Job`.
fn header_vars(job: &Job, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    let head = &job.head;
    let mut last: Option<&HeaderName> = None;
    for (name, value) in head.headers.iter() {
        if Some(name) == last {
            continue;
        }
        last = Some(name);
        let n = name.as_str();
        if n == "content-type"
            || n == "content-length"
            || n == "proxy"
            || n.contains('_')
            || is_hop_by_hop(name)
        {
            continue;
        }
        let mut key = String::with_capacity(5 + n.len());
        key.push_str("HTTP_");
        key.extend(n.chars().map(|c| match c {
            '-' => '_',
            c => c.to_ascii_uppercase(),
        }));
        // Repeated headers are one variable, joined as RFC 9110 allows (cookies with "; ", as browsers do).
        let sep: &[u8] = if n == "cookie" { b"; " } else { b", " };
        let mut joined = Vec::with_capacity(value.len());
        for (i, v) in head.headers.get_all(name).iter().enumerate() {
            if i > 0 {
                joined.extend_from_slice(sep);
            }
            joined.extend_from_slice(v.as_bytes());
        }
        if n == "x-request-id" {
            // The id anteroom logs under, which may differ from an insane one the client sent.
            joined = job.id.as_bytes().to_vec();
        }
        out.push((key.into_bytes(), joined));
    }
    if !head.headers.contains_key("x-request-id") {
        out.push((b"HTTP_X_REQUEST_ID".to_vec(), job.id.as_bytes().to_vec()));
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        _ => "HTTP/1.1",
    }
}

fn host_and_port(headers: &HeaderMap) -> (Option<&str>, Option<&str>) {
    let Some(host) = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return (None, None);
    };
    // "[::1]:8000", "example.org:8000", "example.org"
    if let Some(rest) = host.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let port = rest[end + 1..].strip_prefix(':');
            return (Some(&host[..end + 2]), port);
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (Some(h), Some(p)),
        _ => (Some(host), None),
    }
}

/// What was wrong with a worker's response head.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgiError {
    #[error("response header line {0:?} has no colon")]
    NoColon(String),
    #[error("response header name {0:?} is not a valid header name")]
    BadName(String),
    #[error("response header {0} has a value that is not valid in HTTP")]
    BadValue(String),
    #[error("Status: {0:?} is not a valid HTTP status")]
    BadStatus(String),
    #[error("response head is not ASCII/UTF-8 text")]
    NotText,
    /// RFC 9112 §6.3: the length of such a message is ambiguous (the shape of response smuggling), so it
    /// is relayed to no client.
    #[error("the response has both Content-Length and Transfer-Encoding: its length is ambiguous")]
    LengthAndEncoding,
}

/// Where the CGI response head ends in `buf` (the index of the first body byte), if it has ended.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    // CGI allows bare LF line ends; find the first empty line either way.
    let mut i = 0;
    while let Some(nl) = buf[i..].iter().position(|&b| b == b'\n') {
        let line_end = i + nl;
        let line = &buf[i..line_end];
        if line.is_empty() || line == b"\r" {
            return Some(line_end + 1);
        }
        i = line_end + 1;
    }
    None
}

/// Parses a CGI response head (without the blank line) into a status and HTTP headers.
pub fn parse_head(head: &[u8]) -> Result<(StatusCode, HeaderMap), CgiError> {
    let text = std::str::from_utf8(head).map_err(|_| CgiError::NotText)?;
    let mut status = None;
    let mut headers = HeaderMap::new();
    // Transfer-Encoding is dropped (anteroom frames the body itself), but not if it contradicts a length.
    let mut encoded = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| CgiError::NoColon(line.chars().take(80).collect()))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            let s = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|s| s.as_u16() >= 200 || s.as_u16() < 100)
                .ok_or_else(|| CgiError::BadStatus(value.to_string()))?;
            status = Some(s);
            continue;
        }
        let hname = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CgiError::BadName(name.chars().take(80).collect()))?;
        if is_hop_by_hop(&hname) {
            encoded |= hname == http::header::TRANSFER_ENCODING;
            continue;
        }
        let hvalue =
            HeaderValue::from_str(value).map_err(|_| CgiError::BadValue(name.to_string()))?;
        headers.append(hname, hvalue);
    }
    if encoded && headers.contains_key(CONTENT_LENGTH) {
        return Err(CgiError::LengthAndEncoding);
    }
    let status = match status {
        Some(s) => s,
        // RFC 3875 6.2.3: a client redirect, when the script gave no status of its own.
        None if headers.contains_key(http::header::LOCATION) => StatusCode::FOUND,
        None => StatusCode::OK,
    };
    Ok((status, headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::job;

    fn get<'a>(p: &'a [(Vec<u8>, Vec<u8>)], k: &str) -> Option<&'a str> {
        p.iter()
            .rev()
            .find(|(n, _)| n == k.as_bytes())
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn request_variables() {
        let mut j = job("/a%20b/c?x=1&y=%20");
        j.head
            .headers
            .insert("host", "example.org:8080".parse().unwrap());
        j.head.headers.append("accept", "a".parse().unwrap());
        j.head.headers.append("accept", "b".parse().unwrap());
        j.head
            .headers
            .insert("content-type", "text/plain".parse().unwrap());
        j.body = bytes::Bytes::from_static(b"hello").into();
        let p = params(&j, &[("SCRIPT_FILENAME".into(), "/srv/i.php".into())]);
        assert_eq!(get(&p, "REQUEST_METHOD"), Some("GET"));
        assert_eq!(get(&p, "PATH_INFO"), Some("/a b/c"));
        assert_eq!(get(&p, "SCRIPT_NAME"), Some(""));
        assert_eq!(get(&p, "QUERY_STRING"), Some("x=1&y=%20"));
        assert_eq!(get(&p, "REQUEST_URI"), Some("/a%20b/c?x=1&y=%20"));
        assert_eq!(get(&p, "SERVER_NAME"), Some("example.org"));
        assert_eq!(get(&p, "SERVER_PORT"), Some("8080"));
        assert_eq!(get(&p, "HTTP_ACCEPT"), Some("a, b"));
        assert_eq!(get(&p, "CONTENT_TYPE"), Some("text/plain"));
        assert_eq!(get(&p, "CONTENT_LENGTH"), Some("5"));
        assert_eq!(get(&p, "HTTP_CONTENT_TYPE"), None);
        assert_eq!(get(&p, "SCRIPT_FILENAME"), Some("/srv/i.php"));
        assert_eq!(get(&p, "HTTP_X_REQUEST_ID"), Some("t"));
    }

    #[test]
    fn scheme_a_trusted_proxy_gave() {
        use crate::request::origin::Proxied;
        let mut j = job("/");
        j.head
            .headers
            .insert("host", "example.org".parse().unwrap());
        j.origin.local = Some("127.0.0.1:8000".parse().unwrap());
        j.origin.peer = Some("203.0.113.7:0".parse().unwrap());
        let p = params(&j, &[]);
        assert_eq!(get(&p, "HTTPS"), None);
        assert_eq!(get(&p, "REQUEST_SCHEME"), Some("http"));
        assert_eq!(get(&p, "SERVER_PORT"), Some("8000"));
        assert_eq!(get(&p, "REMOTE_ADDR"), Some("203.0.113.7"));
        j.origin.proxied = Some(Box::new(Proxied {
            hop: Some("127.0.0.1:5000".parse().unwrap()),
            https: Some(true),
        }));
        let p = params(&j, &[]);
        assert_eq!(get(&p, "HTTPS"), Some("on"));
        assert_eq!(get(&p, "REQUEST_SCHEME"), Some("https"));
        assert_eq!(get(&p, "SERVER_PORT"), Some("443"));
        // A port in Host is the client's own.
        j.head
            .headers
            .insert("host", "example.org:8443".parse().unwrap());
        assert_eq!(get(&params(&j, &[]), "SERVER_PORT"), Some("8443"));
    }

    #[test]
    fn httpoxy_and_underscore_collisions() {
        let mut j = job("/");
        j.head
            .headers
            .insert("proxy", "http://evil".parse().unwrap());
        j.head
            .headers
            .insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        j.head
            .headers
            .insert("x-forwarded_for", "6.6.6.6".parse().unwrap());
        let p = params(&j, &[]);
        assert_eq!(get(&p, "HTTP_PROXY"), None);
        assert_eq!(get(&p, "HTTP_X_FORWARDED_FOR"), Some("1.2.3.4"));
        let n = p
            .iter()
            .filter(|(n, _)| n == b"HTTP_X_FORWARDED_FOR")
            .count();
        assert_eq!(n, 1);
    }

    #[test]
    fn hop_by_hop_headers_are_no_variables() {
        let mut j = job("/");
        for (k, v) in [
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "1"),
        ] {
            j.head.headers.insert(k, v.parse().unwrap());
        }
        j.body = bytes::Bytes::from_static(b"abc").into();
        let p = params(&j, &[]);
        for k in [
            "HTTP_TRANSFER_ENCODING",
            "HTTP_CONNECTION",
            "HTTP_TE",
            "HTTP_UPGRADE",
        ] {
            assert_eq!(get(&p, k), None, "{k}");
        }
        assert_eq!(get(&p, "HTTP_X_KEPT"), Some("1"));
        assert_eq!(get(&p, "CONTENT_LENGTH"), Some("3"));
    }

    #[test]
    fn fixed_params_override() {
        let j = job("/x");
        let p = params(&j, &[("SCRIPT_NAME".into(), "/index.php".into())]);
        assert_eq!(get(&p, "SCRIPT_NAME"), Some("/index.php"));
        assert_eq!(p.iter().filter(|(n, _)| n == b"SCRIPT_NAME").count(), 1);
    }

    #[test]
    fn response_heads() {
        let raw =
            b"Status: 404 Not Found\r\nContent-Type: text/html\r\nX-A: 1\r\nX-A: 2\r\n\r\nbody";
        let end = head_end(raw).unwrap();
        assert_eq!(&raw[end..], b"body");
        let (s, h) = parse_head(&raw[..end]).unwrap();
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(h.get_all("x-a").iter().count(), 2);

        let raw = b"Location: http://x/\n\n";
        let end = head_end(raw).unwrap();
        assert_eq!(end, raw.len());
        assert_eq!(parse_head(&raw[..end]).unwrap().0, StatusCode::FOUND);

        assert!(head_end(b"Content-Type: text/html\r\n").is_none());
        assert!(matches!(
            parse_head(b"garbage without colon\r\n"),
            Err(CgiError::NoColon(_))
        ));
        assert!(matches!(
            parse_head(b"Status: abc\r\n"),
            Err(CgiError::BadStatus(_))
        ));
        assert!(matches!(
            parse_head(b"Bad Name: x\r\n"),
            Err(CgiError::BadName(_))
        ));
        let (_, h) = parse_head(b"Transfer-Encoding: chunked\r\nX: y\r\n").unwrap();
        assert!(!h.contains_key("transfer-encoding"));
        for both in [
            &b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"[..],
            b"transfer-encoding: gzip\nContent-Length: 5\n",
        ] {
            assert_eq!(parse_head(both), Err(CgiError::LengthAndEncoding));
        }
    }

    #[test]
    fn decoding() {
        let d = |s: &[u8]| percent_decode(s).collect::<Vec<u8>>();
        assert_eq!(d(b"/a%2Fb%zz%4"), b"/a/b%zz%4");
        assert_eq!(d(b"%41"), b"A");
        assert_eq!(d(b"%e2%82%ac%"), "€%".as_bytes());
    }
}
