//! The built-in demo app: the anteroom binary itself, run as a FastCGI worker on fd 0.
//!
//! It is what `cargo run --release` serves when no worker command is given, so that a newcomer sees a
//! working page at once. It is deliberately plain, blocking code, like the FastCGI apps anteroom serves:
//! accept a connection on the inherited socket, read records, answer, repeat.
//!
//! Pages: `/` says what anteroom is and how to serve a real app; `/sleep?ms=N` answers after N ms (at most
//! 10 s), to watch the queue at work; `/env` lists the CGI variables the worker received. For tests and
//! load: `/bytes?n=N` answers N bytes (at most 256 MiB) of [`pattern`]; `/sum` answers the length and
//! FNV-1a hash of the request body it received (`bytes=N fnv1a=HEX`).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::fastcgi::{self as fcgi, BeginRequest, EndRequest};

/// Serves FastCGI on fd 0 until the socket fails.
pub fn run() -> io::Result<()> {
    let listener = crate::sys::fd::take_fastcgi_listener()
        .ok_or_else(|| io::Error::other("fd 0 is already taken"))?;
    loop {
        let (stream, _) = listener.accept()?;
        if let Err(e) = serve_conn(stream) {
            eprintln!("demo worker: connection ended: {e}");
        }
    }
}

fn serve_conn(mut stream: UnixStream) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(8192);
    let mut current: Option<(u16, bool)> = None;
    let mut params = Vec::new();
    let mut stdin = Vec::new();
    let mut params_done = false;
    while let Some(rec) = fcgi::read_record(&mut stream, &mut buf)? {
        match rec.kind {
            fcgi::BEGIN_REQUEST => {
                let begin = BeginRequest::parse(&rec.content)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                current = Some((rec.request_id, begin.keep_conn()));
                params.clear();
                stdin.clear();
                params_done = false;
            }
            fcgi::PARAMS if rec.content.is_empty() => params_done = true,
            fcgi::PARAMS => params.extend_from_slice(&rec.content),
            fcgi::STDIN if !rec.content.is_empty() => stdin.extend_from_slice(&rec.content),
            fcgi::STDIN => {
                let Some((id, keep)) = current.take() else {
                    continue;
                };
                if !params_done {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "STDIN ended before PARAMS",
                    ));
                }
                let vars: BTreeMap<String, String> = fcgi::decode_pairs(&params)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(&k).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    })
                    .collect();
                let body = respond(&vars, &stdin);
                let mut out = BytesMut::with_capacity(body.len() + 64);
                fcgi::encode_stream(fcgi::STDOUT, id, &body, &mut out);
                fcgi::encode_stream_end(fcgi::STDOUT, id, &mut out);
                EndRequest {
                    app_status: 0,
                    protocol_status: fcgi::REQUEST_COMPLETE,
                }
                .encode(id, &mut out);
                stream.write_all(&out)?;
                if !keep {
                    return Ok(());
                }
            }
            fcgi::GET_VALUES => {
                let mut pairs = Vec::new();
                for (name, value) in [
                    ("FCGI_MAX_CONNS", "1"),
                    ("FCGI_MAX_REQS", "1"),
                    ("FCGI_MPXS_CONNS", "0"),
                ] {
                    let _ = fcgi::encode_pair(name.as_bytes(), value.as_bytes(), &mut pairs);
                }
                let mut out = BytesMut::new();
                fcgi::encode_record(fcgi::GET_VALUES_RESULT, 0, &pairs, &mut out);
                stream.write_all(&out)?;
            }
            fcgi::ABORT_REQUEST => {
                if let Some((id, _)) = current.take() {
                    let mut out = BytesMut::new();
                    EndRequest {
                        app_status: 1,
                        protocol_status: fcgi::REQUEST_COMPLETE,
                    }
                    .encode(id, &mut out);
                    stream.write_all(&out)?;
                }
            }
            other if rec.request_id == 0 => {
                let mut out = BytesMut::new();
                fcgi::encode_unknown_type(other, &mut out);
                stream.write_all(&out)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The byte at offset `i` of a `/bytes` answer: a sequence whose period (251, a prime) does not line up
/// with any buffer size, so a lost, repeated or reordered chunk shows.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// 64-bit FNV-1a: the hash `/sum` answers, simple enough to compute in any test.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn respond(vars: &BTreeMap<String, String>, body: &[u8]) -> Bytes {
    let path = vars.get("PATH_INFO").map_or("/", String::as_str);
    let query = vars.get("QUERY_STRING").map_or("", String::as_str);
    let page = match path {
        "/bytes" => {
            let n: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("n="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
                .min(256 << 20);
            let mut out = b"Content-Type: application/octet-stream\r\n\r\n".to_vec();
            out.extend((0..n).map(pattern));
            return Bytes::from(out);
        }
        "/sum" => format!(
            "Content-Type: text/plain\r\n\r\nbytes={} fnv1a={:016x}\n",
            body.len(),
            fnv1a(body)
        ),
        "/sleep" => {
            let ms: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100)
                .min(10_000);
            std::thread::sleep(Duration::from_millis(ms));
            format!(
                "Content-Type: text/plain\r\n\r\nslept {ms} ms in worker {}\n",
                std::process::id()
            )
        }
        "/env" => {
            let mut s = String::from("Content-Type: text/plain\r\n\r\n");
            for (k, v) in vars {
                s.push_str(&format!("{k}={v}\n"));
            }
            s.push_str(&format!("\n{} bytes of body\n", body.len()));
            s
        }
        "/" => format!(
            "Content-Type: text/html; charset=utf-8\r\n\r\n{}",
            INDEX.replace("{pid}", &std::process::id().to_string())
        ),
        _ => "Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnot found\n".into(),
    };
    Bytes::from(page)
}

const INDEX: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>anteroom</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:46em;margin:3em auto;padding:0 1em;color:#222}
code,pre{background:#f4f4f4;padding:.1em .3em;border-radius:3px}pre{padding:.8em;overflow:auto}</style></head>
<body>
<h1>anteroom is running</h1>
<p>This page comes from anteroom's built-in demo app, running as FastCGI worker process {pid}.
anteroom accepts every connection at once, reads each request whole, and keeps it in a bounded queue of its
own until a worker is idle. When it must refuse, it answers <code>503</code> with <code>Retry-After</code>,
never a reset or a 502.</p>
<p>Try <a href="/sleep?ms=500">/sleep?ms=500</a> (a slow request) or <a href="/env">/env</a> (what a worker
receives).</p>
<h2>Serve a real app</h2>
<pre>
# PHP
anteroom --param SCRIPT_FILENAME=/srv/app/index.php -- php-cgi
# Perl (PSGI)
anteroom -- plackup -s FCGI --manager= app.psgi
# Python (WSGI, flup)
anteroom -- python3 examples/python/app_flup.py
# Any HTTP app that takes a socket on fd 3 (LISTEN_FDS), e.g. gunicorn
anteroom --worker-protocol http -- gunicorn -w 1 app:app
</pre>
<p>Watch the queue and the workers on the status page of the admin listener,
<a href="http://127.0.0.1:8001/">http://127.0.0.1:8001/</a> by default (also <code>/metrics</code> and
<code>/health/ready</code>), and every listening socket's kernel queue with <code>anteroom sockets</code>.
See <code>anteroom --help</code> for every option.</p>
</body></html>
"#;
