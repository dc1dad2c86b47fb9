//! Configuration: flags, `ANTEROOM_*` environment variables and an optional TOML file, merged and validated
//! once at start.
//!
//! Each option is declared once, as a field of [`Settings`]: its doc comment is its help, its field name gives
//! the flag (`--max-queue`), the file key (`max-queue = 100`) and the variable (`ANTEROOM_MAX_QUEUE`), and its
//! `default_value` is the one default, which `--help` shows and which is parsed like any value a person
//! types. A flag wins over a variable, which wins over the file, which wins over the default. The file has
//! `[param]` and `[env]` tables for the repeatable `NAME=VALUE` options. Unknown keys and bad values are
//! refused with a message that names the key (or the variable), so a typo never silently leaves a default in
//! place. [`Config`] is what the rest of anteroom reads: the same options, checked together and in the types
//! the code uses (`Duration`, bytes).
//!
//! As in pingora's `ServerConf`, the file is read by serde with a struct-level default; unlike it, that
//! default is not a hand-written `impl Default` beside the flags but clap's own defaults
//! ([`ServeArgs::default`]), because `--help` must show each default and clap reads it from `default_value`:
//! one literal serves both. Each value is parsed from text by the same `FromStr` wherever it comes from (a
//! flag, a variable or the default), and from TOML by a `Deserialize` of the same unit type (`units`). The
//! file overrides only the keys it has (see [`Settings::take_from_file`]).

pub mod limits;
mod print;
mod sockets;
mod units;

use std::collections::BTreeSet;
use std::error::Error as _;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::queue::delay::DelaySettings;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};

pub use crate::sys::privilege::{Account, WorkerLimit};
pub use print::print_config;
pub use sockets::SocketsArgs;
pub use units::{
    AdminAddr, ByteSize, ClearEnv, CrashExit, FileMode, ForwardedHeader, ListenAddr, LogFormat,
    NameValue, Seconds, TrustedProxy, WorkerCount, WorkerProtocol, WorkerRlimit,
};

#[derive(Debug, Parser)]
#[command(
    name = "anteroom",
    version = VERSION,
    about = "An application server: every connection accepted at once, waiting requests held in a bounded, visible queue until a worker is idle.",
    // Otherwise `--help` shows the doc comment of the flattened `Settings`, which is written for this code.
    long_about = None,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `0.1.0 (git 3f9c26fe2257)`, or `0.1.0` when the build had no git revision to tell (see `build.rs`).
pub const VERSION: &str = env!("ANTEROOM_VERSION");

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
    Sockets(SocketsArgs),
}

impl Cli {
    /// `Cli::parse()`, except that a bad value read from an `ANTEROOM_*` variable is reported under the
    /// variable's name: clap's own message names only the flag, which the user never typed.
    pub fn parse_env_aware() -> Cli {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let mut cmd = Cli::command();
        if argv
            .get(1)
            .and_then(|a| a.to_str())
            .is_some_and(|a| cmd.find_subcommand(a).is_some())
        {
            // A subcommand does not use the top-level copy of the serve flags, so their variables must not be
            // read there: a worker inherits them, and `anteroom serve --workers 2` overrides a bad
            // ANTEROOM_WORKERS only in the subcommand's copy.
            cmd = cmd.mut_args(|a| a.env(None::<&'static str>));
        }
        cmd.try_get_matches_from(&argv)
            .and_then(|mut m| Cli::from_arg_matches_mut(&mut m))
            .unwrap_or_else(|e| blame_variable(e, &argv).exit())
    }
}

/// If `e` is about a value that came from an `ANTEROOM_*` variable (the flag is not on the command line and
/// the variable is set), the same error under the variable's name; otherwise `e`.
fn blame_variable(e: clap::Error, argv: &[OsString]) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return e;
    }
    let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let mut cmd = Cli::command();
    let named = flag.split(' ').next().and_then(|f| f.strip_prefix("--"));
    let arg = cmd
        .get_arguments()
        .find(|a| named.is_some_and(|n| a.get_long() == Some(n)));
    let (Some(long), Some(var)) = (
        arg.and_then(|a| a.get_long()),
        arg.and_then(|a| a.get_env()),
    ) else {
        return e;
    };
    let on_command_line = argv.iter().filter_map(|a| a.to_str()).any(|a| {
        a.strip_prefix("--")
            .and_then(|a| a.strip_prefix(long))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    });
    let Some(value) = std::env::var_os(var) else {
        return e;
    };
    if on_command_line {
        return e;
    }
    let reason = match (e.source(), e.get(ContextKind::ValidValue)) {
        (Some(source), _) => source.to_string(),
        (None, Some(valid)) => format!("possible values: {valid}"),
        (None, None) => "not a valid value".into(),
    };
    let message = format!(
        "{}: invalid value {value:?}: {reason}\n",
        var.to_string_lossy()
    );
    clap::Error::raw(e.kind(), message).format(&mut cmd)
}

/// Flags of `anteroom serve`, and which of them were given: what the file may not override.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    pub settings: Settings,
    /// Ids of the options given by a flag or an `ANTEROOM_*` variable.
    given: BTreeSet<String>,
    /// Ids of those given by a variable (for `--print-config`).
    from_env: BTreeSet<String>,
    /// `--print-config`: print the merged configuration and where each value came from, then exit.
    pub print_config: bool,
}

impl Default for ServeArgs {
    /// Every option at its default, as `anteroom` with no flag and no `ANTEROOM_*` variable.
    fn default() -> Self {
        let cmd = Settings::augment_args(clap::Command::new("anteroom"))
            .mut_args(|a| a.env(None::<&'static str>));
        let m = cmd
            .try_get_matches_from(["anteroom"])
            .expect("every default parses");
        ServeArgs::from_arg_matches(&m).expect("every default parses")
    }
}

impl FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut m.clone())
    }

    fn from_arg_matches_mut(m: &mut ArgMatches) -> Result<Self, clap::Error> {
        let print_config = print::take_flag(m);
        // Read where each value came from before `Settings` takes the values out of `m`.
        let from = |sources: &[ValueSource]| -> BTreeSet<String> {
            m.ids()
                .filter(|id| {
                    m.value_source(id.as_str())
                        .is_some_and(|s| sources.contains(&s))
                })
                .map(|id| id.as_str().to_owned())
                .collect()
        };
        let given = from(&[ValueSource::CommandLine, ValueSource::EnvVariable]);
        let from_env = from(&[ValueSource::EnvVariable]);
        Ok(ServeArgs {
            settings: Settings::from_arg_matches_mut(m)?,
            given,
            from_env,
            print_config,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Settings::augment_args(cmd).arg(print::flag())
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Settings::augment_args_for_update(cmd).arg(print::flag())
    }
}

/// Passes a struct through unchanged and adds [`Settings::take_from_file`], which must name every field:
/// generating it from the declaration is what keeps an option to one declaration.
macro_rules! one_declaration_per_option {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_attr:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $(
                $(#[$field_attr])*
                pub $field: $ty,
            )*
        }

        impl $name {
            /// Takes each option the file sets (`in_file`, by key) unless a flag or variable gave it (`given`,
            /// by id), and adds it to `given`: afterwards `given` holds every option that was chosen at all.
            fn take_from_file(
                &mut self,
                file: $name,
                in_file: &BTreeSet<String>,
                given: &mut BTreeSet<String>,
            ) {
                $(
                    let id = stringify!($field);
                    if !given.contains(id) && in_file.contains(&id.replace('_', "-")) {
                        self.$field = file.$field;
                        given.insert(id.to_owned());
                    }
                )*
            }
        }
    };
}

one_declaration_per_option! {
/// Every option of `anteroom serve`, declared once: the doc is the help, the field name gives the flag, the
/// file key and (explicitly, as `env`) the `ANTEROOM_*` variable, `default_value` is the default.
///
/// A repeatable option's variable holds one value per line (`ANTEROOM_PARAM=$'A=1\nB=2'`): a newline is the one
/// separator that no address, path or sensible parameter holds. The worker command has no variable (it is
/// a list of arguments; put it after `--` or in the file).
#[derive(Debug, Clone, Args, Deserialize, Serialize)]
#[serde(
    default = "Settings::defaults",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
pub struct Settings {
    /// TOML file with any of the options below (flags and variables win over it).
    #[arg(long, value_name = "FILE", env = "ANTEROOM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to serve HTTP on: HOST:PORT or unix:PATH; repeatable. None when only --listen-fastcgi is
    /// given.
    #[arg(long, value_name = "ADDR", env = "ANTEROOM_LISTEN", value_delimiter = '\n', default_value = Config::DEFAULT_LISTEN)]
    pub listen: Vec<ListenAddr>,
    /// Address to serve FastCGI on (for nginx's fastcgi_pass): HOST:PORT or unix:PATH; repeatable.
    #[arg(long, value_name = "ADDR", env = "ANTEROOM_LISTEN_FASTCGI", value_delimiter = '\n')]
    pub listen_fastcgi: Vec<ListenAddr>,
    /// A peer whose word on the client is believed (an IP address, a network as ADDR/PREFIX, or `unix` for
    /// connections on unix listeners); repeatable. On the HTTP front, a request from one gets its client
    /// (REMOTE_ADDR, the queue's per-client lines, the access log) from --forwarded-header, the rightmost
    /// address that is not itself trusted, and its scheme from X-Forwarded-Proto or proto=. Others' headers
    /// change nothing. None by default: believing a header from anyone would let any client choose its address.
    #[arg(long, value_name = "CIDR", env = "ANTEROOM_TRUSTED_PROXY", value_delimiter = '\n')]
    pub trusted_proxy: Vec<TrustedProxy>,
    /// Which header a --trusted-proxy names the client in: x-forwarded-for (with X-Forwarded-Proto) or
    /// forwarded (RFC 7239). One only: a proxy that sets one passes the other on from its client untouched.
    #[arg(long, value_name = "HEADER", env = "ANTEROOM_FORWARDED_HEADER", default_value = "x-forwarded-for")]
    pub forwarded_header: ForwardedHeader,
    /// Every HTTP listener expects a PROXY protocol header (v1 or v2, as HAProxy's send-proxy and
    /// send-proxy-v2 send) before each connection's first request, within --header-timeout; a connection
    /// without a valid one is closed. Its client address is believed from a --trusted-proxy peer only.
    #[arg(long, env = "ANTEROOM_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
    /// Number of worker processes, or MIN:MAX for a pool that grows while requests wait and shrinks when
    /// workers idle.
    #[arg(long, value_name = "N|MIN:MAX", env = "ANTEROOM_WORKERS", default_value = "4")]
    pub workers: WorkerCount,
    /// With --workers MIN:MAX, a worker idle this long is stopped (down to MIN), in seconds.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_IDLE_TIMEOUT", default_value = "10")]
    pub idle_timeout: f64,
    /// How workers are spoken to.
    #[arg(long, value_name = "PROTOCOL", env = "ANTEROOM_WORKER_PROTOCOL", default_value = "fastcgi")]
    pub worker_protocol: WorkerProtocol,
    /// Most requests that may wait for a worker; beyond it, 503 at once.
    #[arg(long, value_name = "N", env = "ANTEROOM_MAX_QUEUE", default_value = "4096")]
    pub max_queue: usize,
    /// Most requests one client (its IP address; behind nginx's fastcgi_pass, the REMOTE_ADDR nginx passes)
    /// may have waiting; beyond it, 503 for that client only. 0: no limit.
    #[arg(long, value_name = "N", env = "ANTEROOM_MAX_QUEUE_PER_CLIENT", default_value = "0")]
    pub max_queue_per_client: usize,
    /// Longest a request may wait for a worker before it gets a 503, in seconds.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_QUEUE_TIMEOUT", default_value = "30")]
    pub queue_timeout: f64,
    /// Controlled delay: when the queue keeps growing while new requests would wait longer than this, in
    /// seconds, it is overloaded and refuses (503) requests that would wait longer. 1 by default: in the
    /// bench's sustained overload (twice the capacity, users patient for 5 s) it keeps every 200 useful with
    /// a p99 wait under 2 s, and a target below what a user waits is what makes a 200 worth serving. 0: off,
    /// the plain FIFO queue.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_QUEUE_TARGET", default_value = "1")]
    pub queue_target: f64,
    /// Controlled delay: the queue is overloaded only when it grew all through this long (judged in twelfths)
    /// and new requests face more than --queue-target, in seconds; normal again when they face less than half
    /// of it. 2.5 by default: longer than a burst's clients take to arrive (those the kernel's full backlog
    /// dropped retry 1 s and 3 s later, and on a busy machine the first two waves run together into 2 s of
    /// growth), short enough that twice the capacity is recognised before requests wait twice the target.
    /// 0: off.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_QUEUE_INTERVAL", default_value = "2.5")]
    pub queue_interval: f64,
    /// Listen backlog asked of the kernel (clamped by net.core.somaxconn).
    #[arg(long, value_name = "N", env = "ANTEROOM_BACKLOG", default_value = "1024")]
    pub backlog: u32,
    /// Largest request body accepted, in bytes (k, m, g suffixes allowed); larger gets 413.
    #[arg(long, value_name = "BYTES", env = "ANTEROOM_MAX_BODY_SIZE", default_value = "16m")]
    pub max_body_size: ByteSize,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    #[arg(long, value_name = "BYTES", env = "ANTEROOM_MAX_HEADER_SIZE", default_value = "16k")]
    pub max_header_size: ByteSize,
    /// Longest a client may take to send a request head, in seconds; slower gets 408. A connection's first
    /// head counts from the accept, a kept-alive connection's next one from its first byte; a kept-alive
    /// connection silent this long is closed.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_HEADER_TIMEOUT", default_value = "30")]
    pub header_timeout: f64,
    /// Most client connections open at once, across all listeners; at the limit the oldest idle ones are
    /// closed; temp files take from the same descriptors [default: RLIMIT_NOFILE minus a reserve for workers and
    /// the admin listener, at most 65536].
    #[arg(long, value_name = "N", env = "ANTEROOM_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Longest a client may pause between two reads of its request body, in seconds; then 408.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_BODY_TIMEOUT", default_value = "60")]
    pub body_timeout: f64,
    /// Longest a client may go without taking any of its response, in seconds; then the connection is
    /// closed.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_SEND_TIMEOUT", default_value = "60")]
    pub send_timeout: f64,
    /// A request body larger than this is written to a temp file in --temp-dir as it arrives.
    #[arg(long, value_name = "BYTES", env = "ANTEROOM_BODY_BUFFER_SIZE", default_value = "64k")]
    pub body_buffer_size: ByteSize,
    /// Most of one response held in memory for a client that reads more slowly than the worker writes;
    /// the rest goes to a temp file.
    #[arg(long, value_name = "BYTES", env = "ANTEROOM_RESPONSE_BUFFER_SIZE", default_value = "256k")]
    pub response_buffer_size: ByteSize,
    /// Most request and response body bytes held in memory at once, all clients together; beyond it,
    /// bodies go to temp files.
    #[arg(long, value_name = "BYTES", env = "ANTEROOM_MAX_QUEUE_BYTES", default_value = "256m")]
    pub max_queue_bytes: ByteSize,
    /// Directory for the unlinked temp files of large bodies [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR", env = "ANTEROOM_TEMP_DIR")]
    pub temp_dir: Option<PathBuf>,
    /// A fixed FastCGI param for every request, like nginx's fastcgi_param; repeatable.
    #[arg(long, value_name = "NAME=VALUE", env = "ANTEROOM_PARAM", value_delimiter = '\n')]
    #[serde(
        deserialize_with = "units::name_value_table",
        serialize_with = "units::name_value_table_out"
    )]
    pub param: Vec<NameValue>,
    /// An environment variable for the workers; repeatable.
    #[arg(long, value_name = "NAME=VALUE", env = "ANTEROOM_ENV", value_delimiter = '\n')]
    #[serde(
        deserialize_with = "units::name_value_table",
        serialize_with = "units::name_value_table_out"
    )]
    pub env: Vec<NameValue>,
    /// Workers get only PATH, LANG, --pass-env and --env: yes, no, or auto (yes with --user, no without);
    /// `--clear-env` alone is yes. anteroom's own ANTEROOM_* variables never reach workers.
    #[arg(
        long,
        value_name = "WHEN",
        env = "ANTEROOM_CLEAR_ENV",
        default_value = "auto",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "yes"
    )]
    pub clear_env: ClearEnv,
    /// With a cleared environment, a variable of anteroom's that workers still get; repeatable (the
    /// variable takes one NAME per line).
    #[arg(long, value_name = "NAME", env = "ANTEROOM_PASS_ENV", value_delimiter = '\n')]
    pub pass_env: Vec<String>,
    /// Run workers (and the exec-worker shim) as this user, name or uid, with its supplementary groups;
    /// anteroom must be root, or already this user [default: as anteroom].
    #[arg(long, value_name = "USER", env = "ANTEROOM_USER")]
    pub user: Option<String>,
    /// With --user, the workers' primary group, name or gid [default: the user's].
    #[arg(long, value_name = "GROUP", env = "ANTEROOM_GROUP")]
    pub group: Option<String>,
    /// With --user, anteroom itself becomes that user once its listeners are bound and the worker socket
    /// directory made: nothing after that needs root.
    #[arg(long, env = "ANTEROOM_DROP_PRIVILEGES")]
    pub drop_privileges: bool,
    /// Permission mode of the unix sockets of --listen and --listen-fastcgi, in octal (0660: only their
    /// owner and group may connect) [default: as the umask leaves it].
    #[arg(long, value_name = "MODE", env = "ANTEROOM_LISTEN_MODE")]
    pub listen_mode: Option<FileMode>,
    /// Owner (user name or uid) of those unix sockets [default: anteroom's user].
    #[arg(long, value_name = "USER", env = "ANTEROOM_LISTEN_OWNER")]
    pub listen_owner: Option<String>,
    /// Group (name or gid) of those unix sockets, such as nginx's [default: anteroom's group].
    #[arg(long, value_name = "GROUP", env = "ANTEROOM_LISTEN_GROUP")]
    pub listen_group: Option<String>,
    /// A resource limit set in each worker before exec, as NAME=VALUE (nofile, core, as, nproc, cpu...; VALUE
    /// N, SOFT:HARD or unlimited); repeatable (the variable takes one NAME=VALUE per line).
    #[arg(
        long,
        value_name = "NAME=VALUE",
        env = "ANTEROOM_WORKER_RLIMIT",
        value_delimiter = '\n'
    )]
    #[serde(
        deserialize_with = "units::rlimit_table",
        serialize_with = "units::rlimit_table_out"
    )]
    pub worker_rlimit: Vec<WorkerRlimit>,
    /// Address of the admin listener (metrics, status, health); `off` for none.
    #[arg(long, value_name = "ADDR", env = "ANTEROOM_ADMIN", default_value = Config::DEFAULT_ADMIN)]
    pub admin: AdminAddr,
    /// Serve HAProxy's agent-check protocol on this address (TCP, or a unix socket path): each connection gets
    /// one line and is closed: `up ready N%` with N following free capacity, `drain` in overload, while
    /// stopping or upgrading, `down` while every slot is crash-looping [default: off].
    #[arg(long, value_name = "ADDR", env = "ANTEROOM_AGENT")]
    pub agent: Option<ListenAddr>,
    /// A path (such as /health) requested from each new worker; it gets traffic only after a 2xx answer.
    /// Without it, a worker is ready once it has accepted a connection.
    #[arg(long, value_name = "PATH", env = "ANTEROOM_READY_PROBE")]
    pub ready_probe: Option<String>,
    /// Longest a new worker may take to become ready, in seconds; then it is killed and counts as a failed start.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_SPAWN_TIMEOUT", default_value = "30")]
    pub spawn_timeout: f64,
    /// Longest a worker may hold one request, in seconds; then it is stopped and the client gets 504; 0 = no limit.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_REQUEST_TIMEOUT", default_value = "60")]
    pub request_timeout: f64,
    /// Time between SIGTERM and SIGKILL when a worker is stopped, in seconds.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_KILL_GRACE", default_value = "5")]
    pub kill_grace: f64,
    /// Replace a worker after it has served this many requests; 0 = never.
    #[arg(long, value_name = "N", env = "ANTEROOM_MAX_REQUESTS", default_value = "0")]
    pub max_requests: u64,
    /// Add a random 0..=N to each worker's --max-requests, so that workers do not all recycle at once.
    #[arg(long, value_name = "N", env = "ANTEROOM_MAX_REQUESTS_JITTER", default_value = "0")]
    pub max_requests_jitter: u64,
    /// Replace a worker whose resident memory exceeds this many MiB, checked between requests.
    #[arg(long, value_name = "MIB", env = "ANTEROOM_MAX_RSS")]
    pub max_rss: Option<u64>,
    /// Replace a worker once it has lived this long, in seconds, times a random factor between 1 and 1.1
    /// of its own; between requests, and one worker at a time (the next waits until the replacement is
    /// ready); 0 = never.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_MAX_WORKER_LIFETIME", default_value = "0")]
    pub max_worker_lifetime: f64,
    /// Log one event (worker state, wchan, syscall, kernel stack, CPU, RSS) for a request a worker has held
    /// this long, in seconds; the request goes on; 0 = off.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_SLOWLOG_TIMEOUT", default_value = "0")]
    pub slowlog_timeout: f64,
    /// With --slowlog-timeout, a command run through `sh -c` for a slow request, `{pid}` replaced by the
    /// worker's pid (also in ANTEROOM_SLOW_PID), such as `py-spy dump --pid {pid}`; its output (at most
    /// 64 KiB, 10 seconds) goes into the event.
    #[arg(long, value_name = "CMD", env = "ANTEROOM_SLOWLOG_COMMAND")]
    pub slowlog_command: Option<String>,
    /// At most this many slow-request events a minute, all workers together (the rest are counted).
    #[arg(long, value_name = "N", env = "ANTEROOM_SLOWLOG_RATE", default_value = "10")]
    pub slowlog_rate: u32,
    /// Quarantine a request fingerprint (method and path) after it killed this many workers within the window, in at most twice as many of its requests (OOM kills and widespread deaths do not count); 0 = off.
    #[arg(long, value_name = "N", env = "ANTEROOM_QUARANTINE_AFTER", default_value = "3")]
    pub quarantine_after: u32,
    /// The window in which those deaths are counted, in seconds.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_QUARANTINE_WINDOW", default_value = "60")]
    pub quarantine_window: f64,
    /// How long a quarantined fingerprint is refused with 503, in seconds.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_QUARANTINE_FOR", default_value = "300")]
    pub quarantine_for: f64,
    /// Exit with code 3 after N unexpected worker deaths within SECS, for systemd's Restart= [default: off].
    #[arg(long, value_name = "N/SECS", env = "ANTEROOM_CRASH_EXIT")]
    pub crash_exit: Option<CrashExit>,
    /// On SIGTERM, how long to finish queued and running requests before stopping workers, in seconds.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_GRACEFUL_TIMEOUT", default_value = "30")]
    pub graceful_timeout: f64,
    /// On SIGTERM, keep serving and accepting this many seconds while /health/ready answers 503 and the agent
    /// `drain`, so that balancers stop sending before the listeners close; 0 = close at once.
    #[arg(long, value_name = "SECS", env = "ANTEROOM_DRAIN_DELAY", default_value = "0")]
    pub drain_delay: f64,
    /// Log every request in the combined format (plus request id, queue wait and worker time), target "access",
    /// once its response is written: the status and body bytes sent, and `end=` for one cut short.
    #[arg(long, env = "ANTEROOM_ACCESS_LOG")]
    pub access_log: bool,
    /// Show the query strings of running and crashed requests on /status and the status page (they often
    /// carry tokens and passwords) [default: off, paths only].
    #[arg(long, env = "ANTEROOM_STATUS_SHOW_QUERY")]
    pub status_show_query: bool,
    /// Log format: text, json or logfmt.
    #[arg(long, value_name = "FORMAT", env = "ANTEROOM_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// The worker command and its arguments; without it, the built-in demo app.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}
}

impl Settings {
    /// What the file deserializes a missing key to. Never read: [`Settings::take_from_file`] takes only the
    /// keys the file has.
    fn defaults() -> Settings {
        ServeArgs::default().settings
    }
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

/// When a request that keeps killing workers is refused (see `quarantine`).
#[derive(Debug, Clone, Copy)]
pub struct QuarantinePolicy {
    /// Deaths that trigger quarantine; 0 turns it off.
    pub after: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

/// Who may connect to the unix sockets of `--listen` and `--listen-fastcgi`: each part None leaves what
/// bind(2) made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: Option<u32>,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

impl SocketAccess {
    pub fn is_set(&self) -> bool {
        *self != SocketAccess::default()
    }
}

/// Settings as merged, before they are checked together.
struct Merged {
    settings: Settings,
    /// Ids of the options given at all: by flag, variable or file.
    chosen: BTreeSet<String>,
    /// Ids of those the file gave (`param` and `env` when the file has any name, even if a flag has more).
    from_file: BTreeSet<String>,
}

/// What `anteroom serve` runs with, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    /// Workers at start and at the least.
    pub workers: usize,
    /// Workers at the most (equal to `workers` for a fixed pool).
    pub workers_max: usize,
    pub idle_timeout: Duration,
    pub queue_timeout: Duration,
    /// `--queue-target` and `--queue-interval`; None when either is 0.
    pub queue_delay: Option<DelaySettings>,
    pub max_body_size: u64,
    pub max_header_size: usize,
    pub header_timeout: Duration,
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
    /// In bytes.
    pub max_rss: Option<u64>,
    /// None: workers are not replaced by age.
    pub max_worker_lifetime: Option<Duration>,
    /// None: no slow-request log.
    pub slowlog_timeout: Option<Duration>,
    pub quarantine: QuarantinePolicy,
    pub graceful_timeout: Duration,
    pub drain_delay: Duration,
    /// Workers run as this account (None: as anteroom).
    pub user: Option<Account>,
    /// Workers get only PATH, LANG, `pass_env` and `env` (`--clear-env`, `auto` resolved).
    pub clear_env: bool,
    pub pass_env: Vec<String>,
    pub worker_rlimits: Vec<WorkerLimit>,
    /// Mode, owner and group of the public unix sockets.
    pub listen_access: SocketAccess,
    /// Every option as merged, in its unit type. An option that needs no conversion is read from here,
    /// through `Deref` (`cfg.max_queue`), so adding one is a field of [`Settings`] and its README line; the
    /// fields above are those converted (`Duration`s, resolved accounts...) or decided together.
    pub settings: Settings,
}

/// `cfg.name` reads an option straight from [`Settings`] when [`Config`] has no converted field of that
/// name: the one declaration of an option is then all there is of it.
impl std::ops::Deref for Config {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

impl std::ops::DerefMut for Config {
    fn deref_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }
}

impl Config {
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:8000";
    pub const DEFAULT_ADMIN: &'static str = "127.0.0.1:8001";

    /// Merges flags and variables over the file (if any) over the defaults, and checks the result.
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let merged = Self::merge(args)?;
        Self::from_settings(merged.settings, &merged.chosen)
    }

    /// Flags and variables over the file (if any) over the defaults, not yet checked together.
    fn merge(args: ServeArgs) -> Result<Merged, ConfigError> {
        let ServeArgs {
            settings: mut s,
            mut given,
            ..
        } = args;
        let mut from_file = BTreeSet::new();
        if let Some(path) = s.config.clone() {
            let (mut file, in_file) = read_file(&path)?;
            let file_err = |reason: String| ConfigError::File {
                path: path.clone(),
                reason,
            };
            // The repeatable NAME=VALUE options add up: the file's names, then the flags', a flag replacing
            // the file's value for the same name.
            for (key, flags, table) in [
                ("param", &mut s.param, std::mem::take(&mut file.param)),
                ("env", &mut s.env, std::mem::take(&mut file.env)),
            ] {
                if let Some(NameValue(name, _)) = table.iter().find(|nv| !units::valid_name(&nv.0))
                {
                    return Err(file_err(format!("{key}: '{name}' is not a valid name")));
                }
                if !table.is_empty() {
                    from_file.insert(key.to_owned());
                }
                *flags = overlay(table, std::mem::take(flags));
                given.insert(key.to_owned());
            }
            let before = given.clone();
            s.take_from_file(file, &in_file, &mut given);
            from_file.extend(given.difference(&before).cloned());
        }
        Ok(Merged {
            settings: s,
            chosen: given,
            from_file,
        })
    }

    /// The validated configuration of merged settings; `chosen` names the options given at all (by flag,
    /// variable or file), for the two defaults that depend on it.
    fn from_settings(s: Settings, chosen: &BTreeSet<String>) -> Result<Config, ConfigError> {
        let settings = s.clone();
        let user = account(&s)?;
        let worker_rlimits = worker_rlimits(&s)?;
        let pass_env = pass_env(&s)?;
        let listen_access = socket_access(&s)?;
        let ready_probe = ready_probe(s.ready_probe.clone())?;
        let listen = if !chosen.contains("listen") && !s.listen_fastcgi.is_empty() {
            // Asked for FastCGI only: no HTTP listener unless one is named.
            Vec::new()
        } else {
            s.listen
        };
        let cfg = Config {
            listen,
            workers: s.workers.min,
            workers_max: s.workers.max,
            idle_timeout: secs("idle-timeout", s.idle_timeout)?,
            queue_timeout: secs("queue-timeout", s.queue_timeout)?,
            queue_delay: match (
                secs_or_off("queue-target", s.queue_target)?,
                secs_or_off("queue-interval", s.queue_interval)?,
            ) {
                (Some(target), Some(interval)) => Some(DelaySettings { target, interval }),
                _ => None,
            },
            max_body_size: s.max_body_size.0,
            max_header_size: usize::try_from(s.max_header_size.0).unwrap_or(usize::MAX),
            header_timeout: secs("header-timeout", s.header_timeout)?,
            body_timeout: secs("body-timeout", s.body_timeout)?,
            send_timeout: secs("send-timeout", s.send_timeout)?,
            body_buffer_size: s.body_buffer_size.0,
            response_buffer_size: s.response_buffer_size.0,
            max_queue_bytes: s.max_queue_bytes.0,
            temp_dir: s.temp_dir.unwrap_or_else(std::env::temp_dir),
            params: s.param.into_iter().map(|NameValue(n, v)| (n, v)).collect(),
            env: s.env.into_iter().map(|NameValue(n, v)| (n, v)).collect(),
            admin: match s.admin {
                AdminAddr::Off => None,
                AdminAddr::At(a) => Some(a),
            },
            admin_is_default: !chosen.contains("admin"),
            ready_probe,
            spawn_timeout: secs("spawn-timeout", s.spawn_timeout)?,
            request_timeout: secs_or_off("request-timeout", s.request_timeout)?,
            kill_grace: secs("kill-grace", s.kill_grace)?,
            max_rss: match s.max_rss {
                Some(0) => return Err(invalid("max-rss", "must be at least 1 MiB")),
                m => m.map(|m| m.saturating_mul(1 << 20)),
            },
            max_worker_lifetime: secs_or_off("max-worker-lifetime", s.max_worker_lifetime)?,
            slowlog_timeout: secs_or_off("slowlog-timeout", s.slowlog_timeout)?,
            quarantine: QuarantinePolicy {
                after: s.quarantine_after,
                window: secs("quarantine-window", s.quarantine_window)?,
                cooldown: secs("quarantine-for", s.quarantine_for)?,
            },
            graceful_timeout: secs("graceful-timeout", s.graceful_timeout)?,
            drain_delay: secs_or_off("drain-delay", s.drain_delay)?.unwrap_or_default(),
            clear_env: match s.clear_env {
                ClearEnv::Yes => true,
                ClearEnv::No => false,
                // Workers that run as another account than the one that started anteroom (typically root)
                // are across a privilege boundary: that account's environment is not theirs.
                ClearEnv::Auto => s.user.is_some(),
            },
            pass_env,
            user,
            worker_rlimits,
            listen_access,
            settings,
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
        if self.slowlog_rate == 0 {
            return Err(invalid(
                "slowlog-rate",
                "must be at least 1 (--slowlog-timeout 0 turns the log off)",
            ));
        }
        if self.slowlog_command.is_some() && self.slowlog_timeout.is_none() {
            return Err(invalid(
                "slowlog-command",
                "needs --slowlog-timeout, which says when to run it",
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
            if Some(*a) == self.agent.as_ref() {
                return Err(invalid("agent", format!("{a} is also a public listener")));
            }
        }
        if self.agent.is_some() && self.agent == self.admin {
            return Err(invalid("agent", "is also the admin listener"));
        }
        if self.proxy_protocol && self.trusted_proxy.is_empty() {
            return Err(invalid(
                "proxy-protocol",
                "needs --trusted-proxy naming the proxies that send the header (anyone else could choose \
                 the client address it carries)",
            ));
        }
        if self.max_connections.is_some() {
            // The same plan the server makes at start, with the limit it will raise itself to.
            limits::Limits::plan(self, limits::nofile_target())
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

/// The account of `--user` (and `--group`), resolved; refused if it does not exist or anteroom cannot
/// become it.
fn account(s: &Settings) -> Result<Option<Account>, ConfigError> {
    let Some(user) = s.user.as_deref() else {
        if s.group.is_some() {
            return Err(invalid("group", "needs --user"));
        }
        if s.drop_privileges {
            return Err(invalid(
                "drop-privileges",
                "needs --user, the account to become",
            ));
        }
        return Ok(None);
    };
    let (name, uid, primary, home) = find_user("user", user)?;
    let gid = match s.group.as_deref() {
        Some(g) => find_group("group", g)?,
        None => primary,
    };
    let groups = crate::sys::privilege::group_list(&name, gid)
        .map_err(|e| invalid("user", format!("cannot list the groups of '{name}': {e}")))?;
    let euid = crate::sys::process::effective_uid();
    if euid != 0 && euid != uid {
        return Err(invalid(
            "user",
            format!(
                "anteroom runs as uid {euid}, not as root: only root can run workers as '{name}' (uid {uid})"
            ),
        ));
    }
    if euid != 0 && s.group.is_some() && gid != crate::sys::privilege::gid() {
        // Already the user, not root: the workers' ids are left as they are, so a group cannot be honoured.
        return Err(invalid(
            "group",
            format!(
                "anteroom runs as uid {euid}, not as root: it cannot change the workers' group"
            ),
        ));
    }
    Ok(Some(Account {
        name,
        uid,
        gid,
        groups,
        home,
    }))
}

fn find_user(key: &'static str, user: &str) -> Result<(String, u32, u32, PathBuf), ConfigError> {
    match crate::sys::privilege::lookup_user(user) {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(invalid(key, format!("no user '{user}' on this system"))),
        Err(e) => Err(invalid(key, format!("cannot look up user '{user}': {e}"))),
    }
}

fn find_group(key: &'static str, group: &str) -> Result<u32, ConfigError> {
    match crate::sys::privilege::lookup_group(group) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(invalid(key, format!("no group '{group}' on this system"))),
        Err(e) => Err(invalid(key, format!("cannot look up group '{group}': {e}"))),
    }
}

/// `--listen-mode`, `--listen-owner` and `--listen-group`, with names resolved to ids.
fn socket_access(s: &Settings) -> Result<SocketAccess, ConfigError> {
    Ok(SocketAccess {
        mode: s.listen_mode.map(|m| m.0),
        owner: s
            .listen_owner
            .as_deref()
            .map(|u| find_user("listen-owner", u).map(|a| a.1))
            .transpose()?,
        group: s
            .listen_group
            .as_deref()
            .map(|g| find_group("listen-group", g))
            .transpose()?,
    })
}

/// `--ready-probe`: a path, as the request line will carry it.
fn ready_probe(p: Option<String>) -> Result<Option<String>, ConfigError> {
    match p {
        Some(p) if !p.starts_with('/') || p.parse::<http::Uri>().is_err() => Err(invalid(
            "ready-probe",
            format!("{p:?} is not a path such as /health"),
        )),
        p => Ok(p),
    }
}

/// `--worker-rlimit`, checked against what the worker's parent will be allowed to set: only root raises a
/// hard limit, and with --drop-privileges workers are started by anteroom as the user.
fn worker_rlimits(s: &Settings) -> Result<Vec<WorkerLimit>, ConfigError> {
    let limits: Vec<WorkerLimit> = overlay_limits(&s.worker_rlimit);
    let unprivileged = crate::sys::process::effective_uid() != 0 || s.drop_privileges;
    for l in &limits {
        let Some(own) = crate::sys::privilege::hard_limit(l.name) else {
            continue;
        };
        let raises = match (l.hard, own) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(want), Some(own)) => want > own,
        };
        if unprivileged && raises {
            let shown = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
            return Err(invalid(
                "worker-rlimit",
                format!(
                    "{}: {} is above anteroom's own hard limit {}, which only root can raise",
                    l.name,
                    shown(l.hard),
                    shown(own)
                ),
            ));
        }
    }
    Ok(limits)
}

fn pass_env(s: &Settings) -> Result<Vec<String>, ConfigError> {
    match s.pass_env.iter().find(|n| !units::valid_name(n)) {
        Some(name) => Err(invalid(
            "pass-env",
            format!("'{name}' is not a valid variable name"),
        )),
        None => Ok(s.pass_env.clone()),
    }
}

/// The limits in order, a later one replacing an earlier one of the same resource.
fn overlay_limits(given: &[WorkerRlimit]) -> Vec<WorkerLimit> {
    let mut out: Vec<WorkerLimit> = Vec::new();
    for WorkerRlimit(l) in given {
        out.retain(|o| o.name != l.name);
        out.push(*l);
    }
    out
}

/// `base` with each of `over` added, replacing an entry of the same name.
fn overlay(mut base: Vec<NameValue>, over: Vec<NameValue>) -> Vec<NameValue> {
    for nv in over {
        base.retain(|b| b.0 != nv.0);
        base.push(nv);
    }
    base
}

fn secs(key: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(invalid(
            key,
            format!("{v} is not a positive number of seconds"),
        ))
    }
}

/// 0 means no limit.
fn secs_or_off(key: &'static str, v: f64) -> Result<Option<Duration>, ConfigError> {
    if v == 0.0 {
        Ok(None)
    } else {
        secs(key, v).map(Some)
    }
}

/// The file's settings, and the keys it sets (only those override a default).
fn read_file(path: &Path) -> Result<(Settings, BTreeSet<String>), ConfigError> {
    let file_err = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason: reason.trim_end().replace('\n', " "),
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    // Parsed twice, once for the keys: the typed parse's errors point at the line.
    let settings: Settings = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
    Ok((settings, table.keys().cloned().collect()))
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
    fn slowlog_and_lifetime_options() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            (c.slowlog_timeout, c.max_worker_lifetime, c.slowlog_rate),
            (None, None, 10)
        );
        let c = parse(&[
            "--slowlog-timeout",
            "2.5",
            "--slowlog-command",
            "py-spy dump --pid {pid}",
            "--max-worker-lifetime",
            "3600",
        ])
        .unwrap();
        assert_eq!(c.slowlog_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(c.max_worker_lifetime, Some(Duration::from_secs(3600)));
        for (args, key) in [
            (&["--slowlog-rate", "0"][..], "slowlog-rate"),
            (
                &["--slowlog-command", "gdb -p {pid}"][..],
                "slowlog-command",
            ),
            (&["--slowlog-timeout=-1"][..], "slowlog-timeout"),
            (&["--max-worker-lifetime=-5"][..], "max-worker-lifetime"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(key), "{args:?}: {e}");
        }
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
    fn trusted_proxies() {
        let c = parse(&[]).unwrap();
        assert!(c.trusted_proxy.is_empty() && !c.proxy_protocol);
        assert_eq!(c.forwarded_header, ForwardedHeader::XForwardedFor);
        let c = parse(&[
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "unix",
            "--forwarded-header",
            "forwarded",
            "--proxy-protocol",
        ])
        .unwrap();
        assert_eq!(c.trusted_proxy.len(), 2);
        assert_eq!(c.trusted_proxy[1], TrustedProxy::Unix);
        assert_eq!(c.forwarded_header, ForwardedHeader::Forwarded);
        let e = parse(&["--proxy-protocol"]).unwrap_err();
        assert!(
            e.contains("proxy-protocol") && e.contains("--trusted-proxy"),
            "{e}"
        );
        let e = parse(&["--trusted-proxy", "10.0.0.1/8"]).unwrap_err();
        assert!(
            e.contains("--trusted-proxy") && e.contains("10.0.0.0/8"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "trusted-proxy = [\"::1\", \"unix\"]\nforwarded-header = \"x-forwarded-for\"\nproxy-protocol = true\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.trusted_proxy[0].to_string(), "::1/128");
        assert!(c.proxy_protocol);
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
    fn agent_and_drain_delay() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.agent.as_ref(), c.drain_delay), (None, Duration::ZERO));
        let c = parse(&["--agent", "127.0.0.1:8002", "--drain-delay", "2.5"]).unwrap();
        assert_eq!(c.agent, Some("127.0.0.1:8002".parse().unwrap()));
        assert_eq!(c.drain_delay, Duration::from_millis(2500));
        let e = parse(&["--agent", "127.0.0.1:8001", "--admin", "127.0.0.1:8001"]).unwrap_err();
        assert!(e.contains("agent") && e.contains("admin"), "{e}");
        let e = parse(&["--agent", "127.0.0.1:8000", "--listen", "127.0.0.1:8000"]).unwrap_err();
        assert!(e.contains("agent"), "{e}");
        let e = parse(&["--drain-delay=-1"]).unwrap_err();
        assert!(e.contains("drain-delay"), "{e}");
    }

    #[test]
    fn file_choices_count_as_chosen() {
        let c = parse(&[]).unwrap();
        assert!(c.admin_is_default);
        let c = parse(&["--listen-fastcgi", "127.0.0.1:9000"]).unwrap();
        assert!(c.listen.is_empty(), "FastCGI only: no HTTP listener");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "admin = \"off\"\nlisten-fastcgi = [\"127.0.0.1:9000\"]\naccess-log = true\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.admin, None);
        assert!(!c.admin_is_default);
        assert!(c.listen.is_empty());
        assert!(c.access_log);
        std::fs::write(
            &path,
            "listen = [\"127.0.0.1:9001\"]\nlisten-fastcgi = [\"127.0.0.1:9000\"]\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:9001".parse().unwrap()]);
        std::fs::write(&path, "[env]\n1X = \"y\"\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("env: '1X'"), "{e}");
        std::fs::write(&path, "config = \"b.toml\"\n").unwrap();
        assert!(parse(&["--config", path.to_str().unwrap()]).is_err());
    }

    /// One declaration gives the flag, the key and the variable: the variable's name is checked here, as it is
    /// the one part written out by hand; and every default is shown by --help and parses.
    #[test]
    fn each_option_has_its_variable_and_shows_its_default() {
        let cmd = Cli::command();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            // --print-config is an action, not an option: a variable left in an environment would stop
            // every start.
            if matches!(long, "help" | "version" | "print-config") {
                continue;
            }
            let want = format!("ANTEROOM_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(env.as_deref(), Some(want.as_str()), "--{long}");
            // Every repeatable option reads one value per line from its variable.
            if matches!(arg.get_action(), clap::ArgAction::Append) {
                assert_eq!(arg.get_value_delimiter(), Some('\n'), "--{long}");
            }
        }
        let help = cmd.clone().render_help().to_string();
        let long_help = cmd.clone().render_long_help().to_string();
        assert!(!long_help.contains("declared once"), "{long_help}");
        for shown in [
            "[default: 4]",
            "[default: 16m]",
            "[default: 127.0.0.1:8001]",
            "[env: ANTEROOM_WORKERS",
        ] {
            assert!(help.contains(shown), "{shown} not in {help}");
        }
        // The defaults parse (ServeArgs::default would panic otherwise) and pass validation.
        Config::from_args(ServeArgs::default()).unwrap();
    }

    #[allow(
        clippy::too_many_lines,
        reason = "one scenario: the refusals and the conversions of the least-privilege options, read in a row"
    )]
    #[test]
    fn privilege_options() {
        let c = parse(&[]).unwrap();
        assert!(c.user.is_none() && !c.drop_privileges && !c.listen_access.is_set());
        assert!(
            !c.clear_env,
            "without --user the environment passes, as gunicorn's does"
        );
        assert!(c.worker_rlimits.is_empty() && c.pass_env.is_empty());
        let c = parse(&[
            "--user",
            "root",
            "--worker-rlimit",
            "nofile=1024",
            "--worker-rlimit",
            "core=unlimited",
            "--worker-rlimit",
            "nofile=512:2k",
            "--listen-mode",
            "0660",
            "--listen-group",
            "0",
            "--pass-env",
            "A",
            "--pass-env",
            "B",
            "--pass-env",
            "C",
        ])
        .unwrap();
        let user = c.user.unwrap();
        assert_eq!((user.name.as_str(), user.uid, user.gid), ("root", 0, 0));
        assert!(c.clear_env, "auto: cleared with --user");
        assert_eq!(c.pass_env, ["A", "B", "C"]);
        assert_eq!(
            c.worker_rlimits,
            [
                WorkerLimit {
                    name: "core",
                    soft: None,
                    hard: None
                },
                WorkerLimit {
                    name: "nofile",
                    soft: Some(512),
                    hard: Some(2048)
                }
            ]
        );
        assert_eq!(
            c.listen_access,
            SocketAccess {
                mode: Some(0o660),
                owner: None,
                group: Some(0)
            }
        );
        assert!(parse(&["--clear-env"]).unwrap().clear_env);
        assert!(
            !parse(&["--user", "root", "--clear-env=no"])
                .unwrap()
                .clear_env
        );
        for (args, key) in [
            (&["--user", "no-such-user-anteroom"][..], "user:"),
            (
                &["--user", "root", "--group", "no-such-group-x"][..],
                "group:",
            ),
            (&["--group", "root"][..], "group:"),
            (&["--drop-privileges"][..], "drop-privileges:"),
            (
                &["--listen-owner", "no-such-user-anteroom"][..],
                "listen-owner:",
            ),
            (&["--pass-env", "1X"][..], "pass-env:"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.starts_with(key), "{args:?}: {e}");
        }
        for args in [
            &["--worker-rlimit", "files=1"][..],
            &["--worker-rlimit", "nofile"][..],
            &["--worker-rlimit", "nofile=2:1"][..],
            &["--worker-rlimit", "nofile=unlimited:1"][..],
            &["--listen-mode", "0800"][..],
            &["--listen-mode", "1777"][..],
            &["--clear-env=maybe"][..],
        ] {
            let e = parse(args).unwrap_err();
            assert!(
                e.contains(args[0].split('=').next().unwrap()),
                "{args:?}: {e}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "clear-env = true\npass-env = [\"X\"]\nlisten-mode = \"0600\"\nuser = \"root\"\n[worker-rlimit]\nnofile = 100\ncore = \"unlimited\"\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert!(c.clear_env);
        assert_eq!(c.pass_env, ["X"]);
        assert_eq!(c.listen_access.mode, Some(0o600));
        assert_eq!(c.user.unwrap().uid, 0);
        assert_eq!(c.worker_rlimits.len(), 2);
        std::fs::write(&path, "[worker-rlimit]\nfiles = 100\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("worker-rlimit") || e.contains("files"), "{e}");
    }

    #[test]
    fn seconds() {
        assert_eq!(
            "1.5".parse::<Seconds>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert!("0".parse::<Seconds>().is_err());
        assert!("-1".parse::<Seconds>().is_err());
        assert!("soon".parse::<Seconds>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("512k".parse::<ByteSize>().unwrap().0, 512 * 1024);
        assert_eq!("10".parse::<ByteSize>().unwrap().0, 10);
        assert!("x".parse::<ByteSize>().is_err());
        assert!("99999999999g".parse::<ByteSize>().is_err());
    }
}
