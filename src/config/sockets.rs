//! The flags of `anteroom sockets`, declared with the rest of the command line (the subcommand itself is in
//! `sockdiag`).

use std::net::SocketAddr;
use std::time::Duration;

/// Flags of `anteroom sockets`. With no filter, every listening socket is shown; `--port` and `--path`
/// add up (a socket shows if it matches any of them), `--tcp` and `--unix` narrow by kind.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SocketsArgs {
    /// Print one JSON object instead of a table (with --watch, one line per interval).
    #[arg(long)]
    pub json: bool,
    /// Redraw every SECS seconds, with the recent queue lengths of each socket, until Ctrl-C [default: 1].
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1", value_parser = parse_interval)]
    pub watch: Option<Duration>,
    /// Only TCP sockets on this local port; repeatable (with --path, a socket matching either is shown).
    #[arg(long, value_name = "N")]
    pub port: Vec<u16>,
    /// Only unix sockets whose path contains SUBSTRING (abstract names read as @name); repeatable.
    #[arg(long, value_name = "SUBSTRING")]
    pub path: Vec<String>,
    /// Only TCP sockets (IPv4 and IPv6).
    #[arg(long)]
    pub tcp: bool,
    /// Only unix sockets.
    #[arg(long)]
    pub unix: bool,
    /// Serve Prometheus metrics on ADDR (`/metrics`) until stopped, instead of printing: each selected
    /// socket's queue, backlog and owner, and the highest queue seen since the previous scrape, so that a
    /// queue that filled for 50 ms between two scrapes still shows; plus ListenOverflows and ListenDrops.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["json", "watch"])]
    pub serve: Option<SocketAddr>,
    /// With --serve: how often the queues are sampled, in seconds (one netlink dump per socket kind each
    /// time); the max gauge catches a queue that lasts at least this long.
    #[arg(long, value_name = "SECS", default_value = "0.01", value_parser = parse_sample_every, requires = "serve")]
    pub sample_every: Duration,
}

fn parse_sample_every(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.001..=60.0).contains(&secs) {
        return Err(format!(
            "{s} seconds is not a sampling interval between 0.001 and 60"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.05..=86400.0).contains(&secs) {
        return Err(format!(
            "{s} seconds is not an interval between 0.05 and 86400"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}
