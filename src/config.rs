//! Configuration: command-line flags and an optional TOML file, merged and validated once at start.
//!
//! Every option can be given as a flag or as a key of the file named by `--config`; a flag wins over the
//! file. The file uses the flags' names (`max-queue = 100`), with `[param]` and `[env]` tables for the
//! repeatable `NAME=VALUE` options. Unknown keys and bad values are refused with a message that names the key,
//! so a typo never silently leaves a default in place.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// Where a listener lives: a TCP address or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, as in unix:/run/anteroom.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        // "localhost:8000" is what people type; resolve it here rather than fail on it.
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        if let Some(port) = s.strip_prefix("localhost:") {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("'{port}' is not a port number"))?;
            return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("'{port}' is not a port number"))?;
            return Ok(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], port))));
        }
        Err(format!(
            "'{s}' is neither HOST:PORT (an IP address and a port) nor unix:PATH"
        ))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines with key=value fields.
    Text,
    /// One JSON object per line.
    Json,
    /// logfmt: key=value pairs only, one line per event.
    Logfmt,
}

/// How anteroom talks to its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerProtocol {
    /// The listening socket is the worker's fd 0, as with spawn-fcgi (php-cgi, Perl FCGI, flup).
    Fastcgi,
    /// The listening socket is fd 3 with LISTEN_FDS=1 (systemd socket activation, e.g. gunicorn).
    Http,
}

impl fmt::Display for WorkerProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerProtocol::Fastcgi => "fastcgi",
            WorkerProtocol::Http => "http",
        })
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "anteroom",
    version,
    about = "An application server: every connection accepted at once, waiting requests held in a bounded, visible queue until a worker is idle.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP through a pool of workers (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// The built-in demo app, as a FastCGI worker on fd 0 (what anteroom runs when no COMMAND is given).
    #[command(hide = true)]
    DemoWorker,
    /// Sets LISTEN_PID to its own pid, then execs the worker command: LISTEN_PID can only be known after fork.
    #[command(hide = true)]
    ExecWorker {
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Show every listening socket's kernel accept queue (TCP and unix), for any server on this machine.
    Sockets(crate::sockdiag::SocketsArgs),
}

/// Flags of `anteroom serve`. Every one is optional here so that the file can fill what a flag does not give.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the options below (flags win over it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve HTTP on: HOST:PORT or unix:PATH; repeatable [default: 127.0.0.1:8000].
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<ListenAddr>,
    /// Address to serve FastCGI on (for nginx's fastcgi_pass): HOST:PORT or unix:PATH; repeatable.
    #[arg(long, value_name = "ADDR")]
    pub listen_fastcgi: Vec<ListenAddr>,
    /// Number of worker processes, or MIN:MAX for a pool that grows while requests wait and shrinks when
    /// workers idle [default: 4].
    #[arg(long, value_name = "N|MIN:MAX")]
    pub workers: Option<WorkerCount>,
    /// With --workers MIN:MAX, a worker idle this long is stopped (down to MIN), in seconds [default: 10].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<f64>,
    /// How workers are spoken to [default: fastcgi].
    #[arg(long, value_name = "PROTOCOL")]
    pub worker_protocol: Option<WorkerProtocol>,
    /// Most requests that may wait for a worker; beyond it, 503 at once [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Longest a request may wait for a worker before it gets a 503, in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub queue_timeout: Option<f64>,
    /// Listen backlog asked of the kernel (clamped by net.core.somaxconn) [default: 1024].
    #[arg(long, value_name = "N")]
    pub backlog: Option<u32>,
    /// Largest request body accepted, in bytes (k, m, g suffixes allowed); larger gets 413 [default: 16m].
    #[arg(long, value_name = "BYTES")]
    pub max_body_size: Option<ByteSize>,
    /// Largest request head (request line and headers) accepted; larger gets 431 [default: 16k].
    #[arg(long, value_name = "BYTES")]
    pub max_header_size: Option<ByteSize>,
    /// Longest a client may take to send a request head, in seconds; slower gets 408 [default: 30].
    #[arg(long, value_name = "SECS")]
    pub header_timeout: Option<f64>,
    /// Most client connections open at once, across all listeners; at the limit the oldest idle ones are
    /// closed [default: RLIMIT_NOFILE minus a reserve for workers, temp files and the admin listener, at most 65536].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Longest a client may pause between two reads of its request body, in seconds; then 408 [default: 60].
    #[arg(long, value_name = "SECS")]
    pub body_timeout: Option<f64>,
    /// Longest a client may go without taking any of its response, in seconds; then the connection is
    /// closed [default: 60].
    #[arg(long, value_name = "SECS")]
    pub send_timeout: Option<f64>,
    /// A request body larger than this is written to a temp file in --temp-dir as it arrives
    /// [default: 64k].
    #[arg(long, value_name = "BYTES")]
    pub body_buffer_size: Option<ByteSize>,
    /// Most of one response held in memory for a client that reads more slowly than the worker writes;
    /// the rest goes to a temp file [default: 256k].
    #[arg(long, value_name = "BYTES")]
    pub response_buffer_size: Option<ByteSize>,
    /// Most request and response body bytes held in memory at once, all clients together; beyond it,
    /// bodies go to temp files [default: 256m].
    #[arg(long, value_name = "BYTES")]
    pub max_queue_bytes: Option<ByteSize>,
    /// Directory for the unlinked temp files of large bodies [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    pub temp_dir: Option<PathBuf>,
    /// A fixed FastCGI param for every request, like nginx's fastcgi_param; repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    pub param: Vec<NameValue>,
    /// An environment variable for the workers; repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    pub env: Vec<NameValue>,
    /// Address of the admin listener (metrics, status, health); `off` for none [default: 127.0.0.1:8001].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<AdminAddr>,
    /// A path (such as /health) requested from each new worker; it gets traffic only after a 2xx answer.
    /// Without it, a worker is ready once it has accepted a connection.
    #[arg(long, value_name = "PATH")]
    pub ready_probe: Option<String>,
    /// Longest a new worker may take to become ready, in seconds; then it is killed and counts as a failed start [default: 30].
    #[arg(long, value_name = "SECS")]
    pub spawn_timeout: Option<f64>,
    /// Longest a worker may hold one request, in seconds; then it is stopped and the client gets 504; 0 = no limit [default: 60].
    #[arg(long, value_name = "SECS")]
    pub request_timeout: Option<f64>,
    /// Time between SIGTERM and SIGKILL when a worker is stopped, in seconds [default: 5].
    #[arg(long, value_name = "SECS")]
    pub kill_grace: Option<f64>,
    /// Replace a worker after it has served this many requests; 0 = never [default: 0].
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Add a random 0..=N to each worker's --max-requests, so that workers do not all recycle at once [default: 0].
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<u64>,
    /// Replace a worker whose resident memory exceeds this many MiB, checked between requests.
    #[arg(long, value_name = "MIB")]
    pub max_rss: Option<u64>,
    /// Quarantine a request fingerprint (method and path) after it killed this many workers within the window, in at most twice as many of its requests (OOM kills and widespread deaths do not count); 0 = off [default: 3].
    #[arg(long, value_name = "N")]
    pub quarantine_after: Option<u32>,
    /// The window in which those deaths are counted, in seconds [default: 60].
    #[arg(long, value_name = "SECS")]
    pub quarantine_window: Option<f64>,
    /// How long a quarantined fingerprint is refused with 503, in seconds [default: 300].
    #[arg(long, value_name = "SECS")]
    pub quarantine_for: Option<f64>,
    /// Exit with code 3 after N unexpected worker deaths within SECS, for systemd's Restart= [default: off].
    #[arg(long, value_name = "N/SECS")]
    pub crash_exit: Option<CrashExit>,
    /// On SIGTERM, how long to finish queued and running requests before stopping workers, in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub graceful_timeout: Option<f64>,
    /// Log every request in the combined format (plus request id, queue wait and worker time), target "access".
    #[arg(long)]
    pub access_log: bool,
    /// Show the query strings of running and crashed requests on /status and the status page (they often
    /// carry tokens and passwords) [default: off, paths only].
    #[arg(long)]
    pub status_show_query: bool,
    /// Log format: text, json or logfmt [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The worker command and its arguments; without it, the built-in demo app.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `--admin`: an address, or `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Off,
    At(ListenAddr),
}

impl FromStr for AdminAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" || s == "none" {
            Ok(AdminAddr::Off)
        } else {
            s.parse().map(AdminAddr::At)
        }
    }
}

/// `N` or `MIN:MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerCount {
    pub min: usize,
    pub max: usize,
}

impl FromStr for WorkerCount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{s}' is not N or MIN:MAX (such as 4 or 2:16)"))
        };
        match s.split_once(':') {
            Some((a, b)) => Ok(WorkerCount {
                min: num(a)?,
                max: num(b)?,
            }),
            None => {
                let n = num(s)?;
                Ok(WorkerCount { min: n, max: n })
            }
        }
    }
}

impl<'de> Deserialize<'de> for WorkerCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(WorkerCount { min: n, max: n }),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `NAME=VALUE`, for `--param` and `--env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameValue(pub String, pub String);

impl FromStr for NameValue {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, value)) if valid_name(name) => {
                Ok(NameValue(name.to_string(), value.to_string()))
            }
            Some((name, _)) => Err(format!(
                "'{name}' is not a valid name (letters, digits and _, not starting with a digit)"
            )),
            None => Err(format!("'{s}' is not NAME=VALUE")),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A size in bytes, with an optional k/m/g (binary) suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, mult) = match t.char_indices().last() {
            Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
            Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
            Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
            _ => (t, 1),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(ByteSize)
            .ok_or_else(|| format!("'{s}' is not a size in bytes (such as 1048576, 512k or 16m)"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `N/SECS`: so many unexpected worker deaths within so many seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrashExit {
    pub deaths: u32,
    pub within: Duration,
}

impl FromStr for CrashExit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not N/SECS (such as 10/90: ten deaths within 90 seconds)");
        let (n, secs) = s.split_once('/').ok_or_else(bad)?;
        let deaths: u32 = n.trim().parse().map_err(|_| bad())?;
        let secs: f64 = secs.trim().parse().map_err(|_| bad())?;
        if deaths == 0 || !(secs > 0.0 && secs < 1e9) {
            return Err(bad());
        }
        Ok(CrashExit {
            deaths,
            within: Duration::from_secs_f64(secs),
        })
    }
}

impl<'de> Deserialize<'de> for CrashExit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The TOML file: the same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<Vec<String>>,
    listen_fastcgi: Option<Vec<String>>,
    workers: Option<WorkerCount>,
    idle_timeout: Option<f64>,
    worker_protocol: Option<WorkerProtocol>,
    max_queue: Option<usize>,
    queue_timeout: Option<f64>,
    backlog: Option<u32>,
    max_body_size: Option<ByteSize>,
    max_header_size: Option<ByteSize>,
    header_timeout: Option<f64>,
    max_connections: Option<usize>,
    body_timeout: Option<f64>,
    send_timeout: Option<f64>,
    body_buffer_size: Option<ByteSize>,
    response_buffer_size: Option<ByteSize>,
    max_queue_bytes: Option<ByteSize>,
    temp_dir: Option<PathBuf>,
    param: Option<BTreeMap<String, String>>,
    env: Option<BTreeMap<String, String>>,
    admin: Option<String>,
    ready_probe: Option<String>,
    spawn_timeout: Option<f64>,
    request_timeout: Option<f64>,
    kill_grace: Option<f64>,
    max_requests: Option<u64>,
    max_requests_jitter: Option<u64>,
    max_rss: Option<u64>,
    quarantine_after: Option<u32>,
    quarantine_window: Option<f64>,
    quarantine_for: Option<f64>,
    crash_exit: Option<CrashExit>,
    graceful_timeout: Option<f64>,
    access_log: Option<bool>,
    status_show_query: Option<bool>,
    log_format: Option<LogFormat>,
    command: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("config file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// What `anteroom serve` runs with, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    pub listen_fastcgi: Vec<ListenAddr>,
    /// Workers at start and at the least.
    pub workers: usize,
    /// Workers at the most (equal to `workers` for a fixed pool).
    pub workers_max: usize,
    pub idle_timeout: Duration,
    pub worker_protocol: WorkerProtocol,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub backlog: u32,
    pub max_body_size: u64,
    pub max_header_size: usize,
    pub header_timeout: Duration,
    /// None: from RLIMIT_NOFILE (see `front::conns::Limits::plan`).
    pub max_connections: Option<usize>,
    pub body_timeout: Duration,
    pub send_timeout: Duration,
    /// Request bodies larger than this go to a temp file.
    pub body_buffer_size: u64,
    /// Most of one response held in memory; the rest goes to a temp file.
    pub response_buffer_size: u64,
    /// Most body bytes in memory, all requests and responses together.
    pub max_queue_bytes: u64,
    pub temp_dir: PathBuf,
    /// Fixed params, in the order given; they override the computed CGI variables of the same name.
    pub params: Vec<(String, String)>,
    pub env: Vec<(String, String)>,
    /// None: no admin listener.
    pub admin: Option<ListenAddr>,
    /// The admin address was not chosen: if it is taken, anteroom runs without it.
    pub admin_is_default: bool,
    pub ready_probe: Option<String>,
    pub spawn_timeout: Duration,
    /// None: no limit.
    pub request_timeout: Option<Duration>,
    pub kill_grace: Duration,
    /// 0: never.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// In bytes.
    pub max_rss: Option<u64>,
    pub quarantine: crate::quarantine::Policy,
    pub crash_exit: Option<CrashExit>,
    pub graceful_timeout: Duration,
    pub access_log: bool,
    /// /status shows query strings (off: paths only).
    pub status_show_query: bool,
    pub log_format: LogFormat,
    /// Empty means the built-in demo app.
    pub command: Vec<String>,
}

impl Config {
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:8000";
    pub const DEFAULT_ADMIN: &'static str = "127.0.0.1:8001";

    /// Merges flags over the file (if any) over the defaults, and checks the result.
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let file_path = args.config.clone().unwrap_or_default();
        let file_err = |reason: String| ConfigError::File {
            path: file_path.clone(),
            reason,
        };

        let listen_fastcgi = if !args.listen_fastcgi.is_empty() {
            args.listen_fastcgi
        } else {
            file.listen_fastcgi
                .unwrap_or_default()
                .iter()
                .map(|s| s.parse::<ListenAddr>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(format!("listen-fastcgi: {e}")))?
        };
        let listen = if !args.listen.is_empty() {
            args.listen
        } else if let Some(list) = file.listen {
            list.iter()
                .map(|s| s.parse::<ListenAddr>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(format!("listen: {e}")))?
        } else if !listen_fastcgi.is_empty() {
            // Asked for FastCGI only: no HTTP listener unless one is named.
            Vec::new()
        } else {
            vec![Self::DEFAULT_LISTEN
                .parse()
                .expect("default address parses")]
        };
        let admin = match (args.admin, file.admin) {
            (Some(a), _) => Some(a),
            (None, Some(s)) => Some(s.parse().map_err(|e| file_err(format!("admin: {e}")))?),
            (None, None) => None,
        };
        let admin_is_default = admin.is_none();
        let admin = match admin {
            None => Some(Self::DEFAULT_ADMIN.parse().expect("default address parses")),
            Some(AdminAddr::Off) => None,
            Some(AdminAddr::At(a)) => Some(a),
        };

        let mut params: Vec<(String, String)> = Vec::new();
        let mut env: Vec<(String, String)> = Vec::new();
        for (key, table, flags, out) in [
            ("param", file.param, args.param, &mut params),
            ("env", file.env, args.env, &mut env),
        ] {
            for (name, value) in table.unwrap_or_default() {
                if !valid_name(&name) {
                    return Err(file_err(format!("{key}: '{name}' is not a valid name")));
                }
                out.push((name, value));
            }
            for NameValue(name, value) in flags {
                out.retain(|(n, _)| *n != name);
                out.push((name, value));
            }
        }

        let secs = |key: &'static str, v: f64| -> Result<Duration, ConfigError> {
            if v.is_finite() && v > 0.0 && v < 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(invalid(
                    key,
                    format!("{v} is not a positive number of seconds"),
                ))
            }
        };

        let secs_or_off = |key: &'static str, v: f64| -> Result<Option<Duration>, ConfigError> {
            if v == 0.0 {
                Ok(None)
            } else {
                secs(key, v).map(Some)
            }
        };

        let cfg = Config {
            listen,
            listen_fastcgi,
            workers: args.workers.or(file.workers).map_or(4, |w| w.min),
            workers_max: args.workers.or(file.workers).map_or(4, |w| w.max),
            idle_timeout: secs(
                "idle-timeout",
                args.idle_timeout.or(file.idle_timeout).unwrap_or(10.0),
            )?,
            worker_protocol: args
                .worker_protocol
                .or(file.worker_protocol)
                .unwrap_or(WorkerProtocol::Fastcgi),
            max_queue: args.max_queue.or(file.max_queue).unwrap_or(4096),
            queue_timeout: secs(
                "queue-timeout",
                args.queue_timeout.or(file.queue_timeout).unwrap_or(30.0),
            )?,
            backlog: args.backlog.or(file.backlog).unwrap_or(1024),
            max_body_size: args
                .max_body_size
                .or(file.max_body_size)
                .map_or(16 << 20, |b| b.0),
            max_header_size: args
                .max_header_size
                .or(file.max_header_size)
                .map_or(16 << 10, |b| b.0) as usize,
            header_timeout: secs(
                "header-timeout",
                args.header_timeout.or(file.header_timeout).unwrap_or(30.0),
            )?,
            max_connections: args.max_connections.or(file.max_connections),
            body_timeout: secs(
                "body-timeout",
                args.body_timeout.or(file.body_timeout).unwrap_or(60.0),
            )?,
            send_timeout: secs(
                "send-timeout",
                args.send_timeout.or(file.send_timeout).unwrap_or(60.0),
            )?,
            body_buffer_size: args
                .body_buffer_size
                .or(file.body_buffer_size)
                .map_or(64 << 10, |b| b.0),
            response_buffer_size: args
                .response_buffer_size
                .or(file.response_buffer_size)
                .map_or(256 << 10, |b| b.0),
            max_queue_bytes: args
                .max_queue_bytes
                .or(file.max_queue_bytes)
                .map_or(256 << 20, |b| b.0),
            temp_dir: args
                .temp_dir
                .or(file.temp_dir)
                .unwrap_or_else(std::env::temp_dir),
            params,
            env,
            admin,
            admin_is_default,
            ready_probe: match args.ready_probe.or(file.ready_probe) {
                Some(p) if !p.starts_with('/') || p.parse::<http::Uri>().is_err() => {
                    return Err(invalid(
                        "ready-probe",
                        format!("{p:?} is not a path such as /health"),
                    ))
                }
                p => p,
            },
            spawn_timeout: secs(
                "spawn-timeout",
                args.spawn_timeout.or(file.spawn_timeout).unwrap_or(30.0),
            )?,
            request_timeout: secs_or_off(
                "request-timeout",
                args.request_timeout
                    .or(file.request_timeout)
                    .unwrap_or(60.0),
            )?,
            kill_grace: secs(
                "kill-grace",
                args.kill_grace.or(file.kill_grace).unwrap_or(5.0),
            )?,
            max_requests: args.max_requests.or(file.max_requests).unwrap_or(0),
            max_requests_jitter: args
                .max_requests_jitter
                .or(file.max_requests_jitter)
                .unwrap_or(0),
            max_rss: match args.max_rss.or(file.max_rss) {
                Some(0) => return Err(invalid("max-rss", "must be at least 1 MiB")),
                m => m.map(|m| m.saturating_mul(1 << 20)),
            },
            quarantine: crate::quarantine::Policy {
                after: args.quarantine_after.or(file.quarantine_after).unwrap_or(3),
                window: secs(
                    "quarantine-window",
                    args.quarantine_window
                        .or(file.quarantine_window)
                        .unwrap_or(60.0),
                )?,
                cooldown: secs(
                    "quarantine-for",
                    args.quarantine_for.or(file.quarantine_for).unwrap_or(300.0),
                )?,
            },
            crash_exit: args.crash_exit.or(file.crash_exit),
            graceful_timeout: secs(
                "graceful-timeout",
                args.graceful_timeout
                    .or(file.graceful_timeout)
                    .unwrap_or(30.0),
            )?,
            access_log: args.access_log || file.access_log.unwrap_or(false),
            status_show_query: args.status_show_query || file.status_show_query.unwrap_or(false),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            command: if !args.command.is_empty() {
                args.command
            } else {
                file.command.unwrap_or_default()
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.workers_max < self.workers {
            return Err(invalid(
                "workers",
                format!(
                    "MIN:MAX with MAX {} below MIN {}",
                    self.workers_max, self.workers
                ),
            ));
        }
        if self.workers == 0 || self.workers_max > 4096 {
            return Err(invalid(
                "workers",
                format!("{} is not between 1 and 4096", self.workers),
            ));
        }
        if self.max_queue == 0 {
            return Err(invalid("max-queue", "must be at least 1"));
        }
        if self.backlog == 0 || self.backlog > i32::MAX as u32 {
            return Err(invalid(
                "backlog",
                format!("{} is out of range", self.backlog),
            ));
        }
        if self.max_header_size < 8192 {
            // hyper cannot parse with a smaller buffer, and no real client's head fits below it anyway.
            return Err(invalid("max-header-size", "must be at least 8k"));
        }
        if !self.temp_dir.is_dir() {
            return Err(invalid(
                "temp-dir",
                format!("{} is not a directory", self.temp_dir.display()),
            ));
        }
        if self.listen.is_empty() && self.listen_fastcgi.is_empty() {
            return Err(invalid("listen", "at least one address is needed"));
        }
        let all: Vec<&ListenAddr> = self.listen.iter().chain(&self.listen_fastcgi).collect();
        for (i, a) in all.iter().enumerate() {
            if all[..i].contains(a) {
                return Err(invalid("listen", format!("{a} is given twice")));
            }
            if Some(*a) == self.admin.as_ref() {
                return Err(invalid("admin", format!("{a} is also a public listener")));
            }
        }
        if self.max_connections.is_some() {
            // The same plan the server makes at start, with the limit it will raise itself to.
            crate::front::conns::Limits::plan(self, crate::front::conns::nofile_target())
                .map_err(|e| invalid("max-connections", e.to_string()))?;
        }
        if let Some(c) = self.command.first() {
            if c.is_empty() {
                return Err(invalid("command", "the worker command is an empty string"));
            }
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string().trim_end().replace('\n', " "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(std::iter::once("anteroom").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let serve = match cli.command {
            Some(Command::Serve(s)) => *s,
            None => cli.serve,
            Some(other) => panic!("unexpected {other:?}"),
        };
        Config::from_args(serve).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:8000".parse().unwrap()]);
        assert_eq!(c.workers, 4);
        assert_eq!(c.worker_protocol, WorkerProtocol::Fastcgi);
        assert_eq!(c.max_queue, 4096);
        assert_eq!(c.queue_timeout, Duration::from_secs(30));
        assert_eq!(c.backlog, 1024);
        assert!(c.command.is_empty());
    }

    #[test]
    fn flags_and_command() {
        let c = parse(&[
            "serve",
            "--listen",
            "unix:/tmp/a.sock",
            "--listen",
            "[::1]:9000",
            "--workers",
            "5",
            "--worker-protocol",
            "http",
            "--param",
            "SCRIPT_FILENAME=/srv/index.php",
            "--max-body-size",
            "2m",
            "--",
            "php-cgi",
            "-d",
            "x=1",
        ])
        .unwrap();
        assert_eq!(c.listen[0], ListenAddr::Unix("/tmp/a.sock".into()));
        assert_eq!(c.workers, 5);
        assert_eq!(c.worker_protocol, WorkerProtocol::Http);
        assert_eq!(
            c.params,
            vec![("SCRIPT_FILENAME".into(), "/srv/index.php".into())]
        );
        assert_eq!(c.max_body_size, 2 << 20);
        assert_eq!(c.command, ["php-cgi", "-d", "x=1"]);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--workers", "many"]).unwrap_err();
        assert!(e.contains("--workers"), "{e}");
        let e = parse(&["--workers", "0"]).unwrap_err();
        assert!(e.starts_with("workers:"), "{e}");
        let e = parse(&["--listen", "nowhere"]).unwrap_err();
        assert!(e.contains("--listen"), "{e}");
        let e = parse(&["--param", "1X=y"]).unwrap_err();
        assert!(e.contains("--param"), "{e}");
        let e = parse(&["--queue-timeout=-1"]).unwrap_err();
        assert!(e.starts_with("queue-timeout:"), "{e}");
    }

    #[test]
    fn file_is_merged_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "workers = 7\nmax-queue = 10\ncommand = [\"php-cgi\"]\n[param]\nSCRIPT_FILENAME = \"/a.php\"\nX = \"1\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p, "--workers", "2", "--param", "X=2"]).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.max_queue, 10);
        assert_eq!(c.command, ["php-cgi"]);
        assert_eq!(
            c.params,
            vec![
                ("SCRIPT_FILENAME".into(), "/a.php".into()),
                ("X".into(), "2".into())
            ]
        );
    }

    #[test]
    fn unknown_file_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "workerz = 7\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("workerz"), "{e}");
        std::fs::write(&path, "workers = \"x\"\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("workers"), "{e}");
    }

    #[test]
    fn supervision_options() {
        let c = parse(&[
            "--request-timeout",
            "0",
            "--crash-exit",
            "10/90",
            "--max-rss",
            "2",
        ])
        .unwrap();
        assert_eq!(c.request_timeout, None);
        assert_eq!(c.crash_exit.unwrap().deaths, 10);
        assert_eq!(c.crash_exit.unwrap().within, Duration::from_secs(90));
        assert_eq!(c.max_rss, Some(2 << 20));
        assert_eq!(
            parse(&[]).unwrap().request_timeout,
            Some(Duration::from_secs(60))
        );
        let e = parse(&["--crash-exit", "10"]).unwrap_err();
        assert!(e.contains("--crash-exit"), "{e}");
    }

    #[test]
    fn dynamic_pool() {
        let c = parse(&["--workers", "2:8"]).unwrap();
        assert_eq!((c.workers, c.workers_max), (2, 8));
        let c = parse(&["--workers", "3"]).unwrap();
        assert_eq!((c.workers, c.workers_max), (3, 3));
        assert!(parse(&["--workers", "8:2"])
            .unwrap_err()
            .starts_with("workers:"));
    }

    #[test]
    fn connection_options() {
        let c = parse(&["--max-connections", "100", "--status-show-query"]).unwrap();
        assert_eq!(c.max_connections, Some(100));
        assert!(c.status_show_query);
        let c = parse(&[]).unwrap();
        assert_eq!(c.max_connections, None);
        assert!(!c.status_show_query);
        let e = parse(&["--max-connections", "0"]).unwrap_err();
        assert!(e.starts_with("max-connections:"), "{e}");
        // More than any open-files limit can back (2^20 is the most anteroom raises itself to).
        let e = parse(&["--max-connections", "2000000"]).unwrap_err();
        assert!(
            e.starts_with("max-connections:") && e.contains("RLIMIT_NOFILE"),
            "{e}"
        );
    }

    #[test]
    fn body_and_memory_options() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.body_buffer_size, 64 << 10);
        assert_eq!(c.response_buffer_size, 256 << 10);
        assert_eq!(c.max_queue_bytes, 256 << 20);
        assert_eq!(c.body_timeout, Duration::from_secs(60));
        assert_eq!(c.send_timeout, Duration::from_secs(60));
        assert_eq!(c.temp_dir, std::env::temp_dir());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            format!(
                "body-buffer-size = \"1m\"\nmax-queue-bytes = 1024\nsend-timeout = 2\ntemp-dir = {:?}\n",
                dir.path().display().to_string()
            ),
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&[
            "--config",
            p,
            "--response-buffer-size",
            "8k",
            "--body-timeout",
            "5",
        ])
        .unwrap();
        assert_eq!(c.body_buffer_size, 1 << 20);
        assert_eq!(c.max_queue_bytes, 1024);
        assert_eq!(c.response_buffer_size, 8 << 10);
        assert_eq!(c.send_timeout, Duration::from_secs(2));
        assert_eq!(c.body_timeout, Duration::from_secs(5));
        assert_eq!(c.temp_dir, dir.path());
        let e = parse(&["--temp-dir", "/nonexistent/anteroom"]).unwrap_err();
        assert!(e.starts_with("temp-dir:"), "{e}");
        let e = parse(&["--send-timeout", "0"]).unwrap_err();
        assert!(e.starts_with("send-timeout:"), "{e}");
        let e = parse(&["--body-timeout", "x"]).unwrap_err();
        assert!(e.contains("--body-timeout"), "{e}");
        let e = parse(&["--max-queue-bytes", "lots"]).unwrap_err();
        assert!(e.contains("--max-queue-bytes"), "{e}");
        std::fs::write(&path, "body-buffer-size = \"big\"\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err();
        assert!(e.contains("body-buffer-size"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!("512k".parse::<ByteSize>().unwrap().0, 512 * 1024);
        assert_eq!("10".parse::<ByteSize>().unwrap().0, 10);
        assert!("x".parse::<ByteSize>().is_err());
        assert!("99999999999g".parse::<ByteSize>().is_err());
    }
}
