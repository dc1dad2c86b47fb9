//! The in-process tier: `App` built in the test's own process, on listeners the test bound on port 0 (as
//! tokio-rs/mini-redis tests its server), with the demo worker. No signals and no waiting for a child process
//! to bind: each test takes about as long as its requests.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anteroom::app::{App, Listeners, Stopped};
use anteroom::config::{Cli, Config, ListenAddr};
use anteroom::front::listen::Listener;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use common::{request, Response, BIN};

/// The configuration of `anteroom OPTIONS -- anteroom demo-worker`: the worker command is named, since
/// the built-in default runs this process's own binary, which here is the test.
fn config(options: &[&str]) -> Config {
    let mut argv = vec!["anteroom", "--admin", "off"];
    argv.extend_from_slice(options);
    argv.extend_from_slice(&["--", BIN, "demo-worker"]);
    Config::from_args(Cli::try_parse_from(argv).unwrap().serve).unwrap()
}

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    control: anteroom::app::Control,
    done: tokio::task::JoinHandle<Stopped>,
}

/// Builds the app on a port-0 listener and runs it until the returned token is cancelled.
fn start(options: &[&str]) -> Running {
    let any: ListenAddr = "127.0.0.1:0".parse().unwrap();
    let listener = Listener::bind(&any, 128).unwrap();
    let ListenAddr::Tcp(addr) = listener.local_addr() else {
        unreachable!("a TCP listener")
    };
    let listeners = Listeners {
        http: vec![listener],
        ..Listeners::default()
    };
    let app = App::build(config(options), listeners).unwrap();
    let shutdown = CancellationToken::new();
    let control = app.control();
    let done = tokio::spawn(app.run(shutdown.clone()));
    Running {
        addr,
        shutdown,
        control,
        done,
    }
}

async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let bytes = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || request(addr, bytes.as_bytes()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_request_and_stops() {
    let r = start(&["--workers", "1"]);
    // The first request waits in the queue until the worker is ready.
    let resp = get(r.addr, "/").await.unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.text().contains("built-in demo app"), "{}", resp.text());
    r.shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(20), r.done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Stopped::Signal);
    assert!(
        get(r.addr, "/").await.is_err(),
        "the listener is closed after the stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let r = start(&["--workers", "1", "--max-queue", "1"]);
    assert_eq!(get(r.addr, "/").await.unwrap().status, 200);
    // One request at the worker, one in the queue: the queue is full.
    let running = tokio::spawn(get(r.addr, "/sleep?ms=1500"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued = tokio::spawn(get(r.addr, "/sleep?ms=10"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = get(r.addr, "/").await.unwrap();
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    assert_eq!(running.await.unwrap().unwrap().status, 200);
    assert_eq!(queued.await.unwrap().unwrap().status, 200);
    r.shutdown.cancel();
    assert_eq!(r.done.await.unwrap(), Stopped::Signal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_running_and_queued_requests() {
    let r = start(&["--workers", "1"]);
    assert_eq!(get(r.addr, "/").await.unwrap().status, 200);
    let running = tokio::spawn(get(r.addr, "/sleep?ms=800"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued = tokio::spawn(get(r.addr, "/sleep?ms=100"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.shutdown.cancel();
    let started = std::time::Instant::now();
    assert_eq!(running.await.unwrap().unwrap().status, 200);
    assert_eq!(queued.await.unwrap().unwrap().status, 200);
    assert_eq!(r.done.await.unwrap(), Stopped::Signal);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_now_refuses_what_waits() {
    let r = start(&["--workers", "1"]);
    assert_eq!(get(r.addr, "/").await.unwrap().status, 200);
    let _running = tokio::spawn(get(r.addr, "/sleep?ms=5000"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued = tokio::spawn(get(r.addr, "/sleep?ms=10"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    r.control.stop_now();
    assert_eq!(r.done.await.unwrap(), Stopped::Signal);
    assert!(started.elapsed() < Duration::from_secs(4));
    // The waiting request was refused, or its connection closed, rather than served.
    assert!(queued
        .await
        .unwrap()
        .map_or(true, |resp| resp.status == 503));
}

/// A GET from the source address `from` (any 127.0.0.0/8 address is this host), sent at once; the
/// response's status and when it arrived.
fn get_from(
    addr: SocketAddr,
    from: &str,
    path: &str,
) -> std::thread::JoinHandle<(u16, std::time::Instant)> {
    let (from, path) = (from.to_string(), path.to_string());
    std::thread::spawn(move || {
        use std::io::Write;
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: SocketAddr = format!("{from}:0").parse().unwrap();
        s.bind(&local.into()).unwrap();
        s.connect(&addr.into()).unwrap();
        let mut s: std::net::TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let status = common::read_response(&mut s).map_or(0, |r| r.status);
        (status, std::time::Instant::now())
    })
}

/// One client cannot fill the queue (`--max-queue-per-client`), and clients take turns: a second client's
/// request is served before the first client's later ones, not after all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_take_turns_and_one_client_cannot_fill_the_queue() {
    let r = start(&["--workers", "1", "--max-queue-per-client", "2"]);
    assert_eq!(get(r.addr, "/").await.unwrap().status, 200);
    let pause = || std::thread::sleep(Duration::from_millis(100));
    let a1 = get_from(r.addr, "127.0.0.1", "/sleep?ms=1500"); // at the worker
    pause();
    let a2 = get_from(r.addr, "127.0.0.1", "/sleep?ms=300"); // queued
    pause();
    let a3 = get_from(r.addr, "127.0.0.1", "/sleep?ms=300"); // queued: the client's limit
    pause();
    let a4 = get_from(r.addr, "127.0.0.1", "/sleep?ms=300");
    let (status, _) = a4.join().unwrap();
    assert_eq!(
        status, 503,
        "a third waiting request of one client is refused"
    );
    let b = get_from(r.addr, "127.0.0.2", "/sleep?ms=10");
    let done = tokio::task::spawn_blocking(move || [a1, a2, a3, b].map(|h| h.join().unwrap()))
        .await
        .unwrap();
    let [a1, a2, a3, b] = done;
    assert!(
        [a1.0, a2.0, a3.0, b.0].iter().all(|s| *s == 200),
        "{a1:?} {a2:?} {a3:?} {b:?}"
    );
    assert!(
        a2.1 < b.1,
        "the first client's oldest waiting request goes first"
    );
    assert!(
        b.1 < a3.1,
        "then the second client's turn, before the first client's next"
    );
    r.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), r.done).await;
}

/// Controlled delay with one worker (10 requests/s at /sleep?ms=100), a 300 ms target and a 1.2 s interval
/// (growth judged every 100 ms): a closed-loop burst whose standing queue stays above the target is served
/// whole; an open-loop load at ten times the capacity, growing the queue by 9 every 100 ms, puts the queue in
/// overload (503 "overloaded" at once for what would wait longer) after 1.2 s or so; once it stops, the queue
/// drains and is normal again (a burst that overload would cut is served whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_entered_under_sustained_load_and_left_after_it_but_not_for_a_burst() {
    let r = start(&[
        "--workers",
        "1",
        "--queue-target",
        "0.3",
        "--queue-interval",
        "1.2",
    ]);
    assert_eq!(get(r.addr, "/").await.unwrap().status, 200);
    let addr = r.addr;
    let statuses = |n: usize, spacing: Duration| {
        tokio::task::spawn_blocking(move || {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let h = std::thread::spawn(move || {
                        let bytes =
                            b"GET /sleep?ms=100 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
                        request(addr, bytes).map_or((0, String::new()), |resp| {
                            (resp.status, resp.text().to_string())
                        })
                    });
                    std::thread::sleep(spacing);
                    h
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    };

    // Closed loop: 6 clients, each sending its next request when answered, for 30 requests (3 s): 5 wait
    // all along (500 ms ahead of each new one), but the queue does not grow.
    let closed = tokio::task::spawn_blocking(move || {
        let clients: Vec<_> = (0..6)
            .map(|_| {
                std::thread::spawn(move || {
                    let bytes =
                        b"GET /sleep?ms=100 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
                    (0..5)
                        .map(|_| request(addr, bytes).map_or(0, |resp| resp.status))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let closed = closed.await.unwrap();
    assert!(closed.iter().all(|s| *s == 200), "{closed:?}");

    // Open loop: 100 requests/s for 2 s against 10/s.
    let open = statuses(200, Duration::from_millis(10)).await.unwrap();
    let refused: Vec<_> = open.iter().filter(|(s, _)| *s == 503).collect();
    assert!(
        !refused.is_empty() && refused.iter().all(|(_, t)| t.contains("overloaded")),
        "{open:?}"
    );
    assert!(open.iter().all(|(s, _)| *s == 200 || *s == 503), "{open:?}");

    // Quiet until the queue has drained, then 7 at once (the last with 500 ms or more ahead of it, refused in
    // overload): normal, all served.
    std::thread::sleep(Duration::from_millis(1500));
    let after = statuses(7, Duration::ZERO).await.unwrap();
    assert!(after.iter().all(|(s, _)| *s == 200), "{after:?}");
    r.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), r.done).await;
}
