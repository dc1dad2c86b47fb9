//! The value types of options: what a flag, an `ANTEROOM_*` variable or a file key is parsed into.
//!
//! Each type parses from the text a person types (`FromStr`, which clap uses) and from a TOML value
//! (`Deserialize`, which the file uses), with one message for a bad value whichever way it came, so that a
//! flag and a key never disagree on what they accept. Each also writes itself back (`Display`, `Serialize`) in
//! a form those accept, for `--print-config`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize, Serializer};

/// `Deserialize` through `FromStr`, for values that are always strings in the file.
macro_rules! deserialize_from_str {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    )*};
}

deserialize_from_str!(ListenAddr, AdminAddr, CrashExit, FileMode, TrustedProxy);

/// `Serialize` through `Display`: the text that `FromStr` reads back.
macro_rules! serialize_as_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}

serialize_as_text!(
    ListenAddr,
    AdminAddr,
    CrashExit,
    FileMode,
    ClearEnv,
    WorkerRlimit,
    TrustedProxy
);

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

/// `--trusted-proxy`: the peers whose word on the client is believed: an IP network (`10.0.0.0/8`,
/// `fd00::/8`), one address (`127.0.0.1`, `::1`), or `unix` for every connection on a unix listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustedProxy {
    /// `addr/prefix`, with the host bits cleared.
    Net {
        addr: IpAddr,
        prefix: u8,
    },
    Unix,
}

impl TrustedProxy {
    /// Whether `ip` is in this network (an IPv4 address mapped into IPv6 counts as the IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let TrustedProxy::Net { addr, prefix } = *self else {
            return false;
        };
        match (addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u128::from(u32::from(ip)), prefix, 32) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(ip), prefix, 128) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` (of a `width`-bit address) with all but the first `prefix` cleared.
fn mask(bits: u128, prefix: u8, width: u8) -> u128 {
    let host = u32::from(width.saturating_sub(prefix));
    if host >= 128 {
        0
    } else {
        bits >> host << host
    }
}

impl FromStr for TrustedProxy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "unix" {
            return Ok(TrustedProxy::Unix);
        }
        let bad = || format!("'{s}' is neither an IP address, ADDRESS/PREFIX nor unix");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        let width: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= width => p,
                _ => return Err(format!("'{s}': the prefix must be 0 to {width}")),
            },
        };
        let addr = match ip {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                u32::try_from(mask(u128::from(u32::from(a)), prefix, 32)).unwrap_or(0),
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask(u128::from(a), prefix, 128))),
        };
        if addr != ip {
            return Err(format!(
                "'{s}' has host bits set: did you mean {addr}/{prefix}?"
            ));
        }
        Ok(TrustedProxy::Net { addr, prefix })
    }
}

impl fmt::Display for TrustedProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustedProxy::Unix => f.write_str("unix"),
            TrustedProxy::Net { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

/// `--forwarded-header`: which header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (and `X-Forwarded-Proto`): what nginx, HAProxy and most load balancers send.
    XForwardedFor,
    /// RFC 7239's `Forwarded` (`for=`, `proto=`).
    Forwarded,
}

impl fmt::Display for ForwardedHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        })
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
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

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddr::Off => f.write_str("off"),
            AdminAddr::At(a) => a.fmt(f),
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

/// A fixed pool as a number (`workers = 4`), a growing one as text (`workers = "2:16"`).
impl Serialize for WorkerCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.min == self.max {
            s.serialize_u64(self.min as u64)
        } else {
            s.collect_str(&format_args!("{}:{}", self.min, self.max))
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

pub(super) fn valid_name(name: &str) -> bool {
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

/// With the largest suffix that is exact (`16m`, `64k`), as people write sizes; without one, a number.
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        match [(30, 'g'), (20, 'm'), (10, 'k')]
            .into_iter()
            .find(|(shift, _)| n != 0 && n.trailing_zeros() >= *shift)
        {
            Some((shift, suffix)) => s.collect_str(&format_args!("{}{suffix}", n >> shift)),
            None => s.serialize_u64(n),
        }
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

/// A permission mode in octal, such as `0660` (`--listen-mode`). Written as a string in the file
/// (`listen-mode = "0660"`): TOML has no octal integers with a leading zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let digits = t.strip_prefix("0o").unwrap_or(t);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if !digits.is_empty() && m <= 0o777 => Ok(FileMode(m)),
            _ => Err(format!(
                "'{s}' is not a permission mode in octal between 0 and 0777 (such as 0660)"
            )),
        }
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// `--clear-env`: whether workers get only `PATH`, `LANG`, `--pass-env` and `--env`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearEnv {
    /// Cleared when workers run as another account (`--user`), passed otherwise.
    Auto,
    Yes,
    No,
}

impl FromStr for ClearEnv {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(ClearEnv::Auto),
            "yes" | "true" | "on" | "1" => Ok(ClearEnv::Yes),
            "no" | "false" | "off" | "0" => Ok(ClearEnv::No),
            _ => Err(format!("'{s}' is not auto, yes or no")),
        }
    }
}

impl fmt::Display for ClearEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClearEnv::Auto => "auto",
            ClearEnv::Yes => "yes",
            ClearEnv::No => "no",
        })
    }
}

impl<'de> Deserialize<'de> for ClearEnv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            B(bool),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::B(true) => Ok(ClearEnv::Yes),
            Raw::B(false) => Ok(ClearEnv::No),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `--worker-rlimit NAME=VALUE`: a resource limit set in each worker before exec. VALUE is a number (with
/// k, m, g suffixes), `unlimited`, or `SOFT:HARD`; one number sets both, as php-fpm's `rlimit_*` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerRlimit(pub crate::sys::privilege::WorkerLimit);

impl WorkerRlimit {
    fn parse(name: &str, value: &str) -> Result<Self, String> {
        let Some(name) = crate::sys::privilege::rlimit_name(name.trim()) else {
            let known: Vec<&str> = crate::sys::privilege::rlimit_names().collect();
            return Err(format!(
                "'{name}' is not a resource limit (one of {})",
                known.join(", ")
            ));
        };
        let one = |v: &str| -> Result<Option<u64>, String> {
            match v.trim() {
                "unlimited" | "infinity" => Ok(None),
                v => v.parse::<ByteSize>().map(|b| Some(b.0)).map_err(|_| {
                    format!("'{value}' is not a limit for {name} (N, N:N or unlimited)")
                }),
            }
        };
        let (soft, hard) = match value.split_once(':') {
            Some((s, h)) => (one(s)?, one(h)?),
            None => (one(value)?, one(value)?),
        };
        let above = |s: Option<u64>, h: Option<u64>| match (s, h) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(s), Some(h)) => s > h,
        };
        if above(soft, hard) {
            return Err(format!("{name}: the soft limit is above the hard one"));
        }
        Ok(WorkerRlimit(crate::sys::privilege::WorkerLimit {
            name,
            soft,
            hard,
        }))
    }
}

impl FromStr for WorkerRlimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, value)) => WorkerRlimit::parse(name, value),
            None => Err(format!("'{s}' is not NAME=VALUE (such as nofile=4096)")),
        }
    }
}

impl WorkerRlimit {
    /// VALUE as `parse` reads it: one number when soft and hard are the same, else `SOFT:HARD`.
    fn value(&self) -> String {
        let one = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        let l = &self.0;
        if l.soft == l.hard {
            one(l.soft)
        } else {
            format!("{}:{}", one(l.soft), one(l.hard))
        }
    }
}

impl fmt::Display for WorkerRlimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.0.name, self.value())
    }
}

/// The same table back, for `--print-config`.
pub(super) fn rlimit_table_out<S: Serializer>(
    limits: &[WorkerRlimit],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(limits.iter().map(|l| (l.0.name, l.value())))
}

/// The file's `[worker-rlimit]` table: `nofile = 4096`, `core = "unlimited"`, `as = "1g"`.
pub(super) fn rlimit_table<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<WorkerRlimit>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    let table = std::collections::BTreeMap::<String, Raw>::deserialize(d)?;
    table
        .into_iter()
        .map(|(name, v)| {
            let v = match v {
                Raw::N(n) => n.to_string(),
                Raw::S(s) => s,
            };
            WorkerRlimit::parse(&name, &v).map_err(serde::de::Error::custom)
        })
        .collect()
}

impl fmt::Display for CrashExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.deaths, self.within.as_secs_f64())
    }
}

/// A `[param]` or `[env]` table of the file, in the order of its names.
pub(super) fn name_value_table<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<NameValue>, D::Error> {
    let table = std::collections::BTreeMap::<String, String>::deserialize(d)?;
    Ok(table.into_iter().map(|(n, v)| NameValue(n, v)).collect())
}

/// The same table back, for `--print-config`.
pub(super) fn name_value_table_out<S: Serializer>(
    nvs: &[NameValue],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(nvs.iter().map(|NameValue(n, v)| (n, v)))
}

/// A positive number of seconds below 10^9 (fractions allowed), as a `Duration`: an option of this type needs
/// no conversion or check in `Config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl Seconds {
    fn from_f64(v: f64) -> Result<Self, String> {
        if v.is_finite() && v > 0.0 && v < 1e9 {
            Ok(Seconds(Duration::from_secs_f64(v)))
        } else {
            Err(format!("{v} is not a positive number of seconds"))
        }
    }
}

impl FromStr for Seconds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a number of seconds"))?;
        Seconds::from_f64(v)
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Seconds::from_f64(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
