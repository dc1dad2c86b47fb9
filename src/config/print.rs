//! `--print-config`: the configuration anteroom would run with, and where each value came from.
//!
//! With three sources (flags, `ANTEROOM_*` variables, the file) and their precedence, "why does it use 8
//! workers?" needs an answer that does not mean reading all three: each option is printed as a TOML line
//! with its source in a comment (`workers = 8  # from env ANTEROOM_WORKERS`). The lines are in the file's own
//! syntax, written by the same types that read it, so the output pasted into a config file gives the same
//! configuration. The merge and the checks are the ones a start makes ([`Config::merge`],
//! [`Config::from_settings`]): a configuration that would be refused is refused here too, with the same
//! message. Nothing is bound and no worker starts.
//!
//! `--print-config` is an action, not an option: it has no variable (one left in an environment would make
//! every start print and exit) and no file key.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use clap::{Arg, ArgAction, ArgMatches, Args};

use super::{invalid, Config, ConfigError, ServeArgs, Settings, VERSION};

const ID: &str = "print_config";

/// The flag, added beside the options of [`Settings`].
pub(super) fn flag() -> Arg {
    Arg::new(ID)
        .long("print-config")
        .action(ArgAction::SetTrue)
        .help(
            "Print the merged configuration (flags, ANTEROOM_* variables, file, defaults) as TOML, with \
             where each value came from, then exit without serving",
        )
}

/// Whether the flag was given, taken out of `m` so that it is not counted as an option.
pub(super) fn take_flag(m: &mut ArgMatches) -> bool {
    m.try_remove_one::<bool>(ID).ok().flatten().unwrap_or(false)
}

/// The merged configuration of `args` as TOML lines, each with its source; an error if anteroom would refuse
/// to start with it.
pub fn print_config(args: ServeArgs) -> Result<String, ConfigError> {
    let from_env = args.from_env.clone();
    let from_flag: BTreeSet<String> = args.given.difference(&from_env).cloned().collect();
    let file = args.settings.config.clone();
    let mut merged = Config::merge(args)?;
    let cfg = Config::from_settings(merged.settings.clone(), &merged.chosen)?;
    // A default that depends on other options is shown as it was decided (`--listen-fastcgi` alone: no HTTP
    // listener), so that the output in a file, where it would count as chosen, means the same.
    merged.settings.listen = cfg.listen;
    let values = toml::Table::try_from(&merged.settings).map_err(|e| {
        invalid(
            "print-config",
            format!("cannot write the configuration: {e}"),
        )
    })?;

    let source = |id: &str, var: Option<&str>| {
        let file = || match &file {
            Some(p) => format!("file {}", p.display()),
            None => "file".into(),
        };
        let given = if from_flag.contains(id) {
            Some(if id == "command" {
                "command line".to_owned()
            } else {
                "flag".to_owned()
            })
        } else if from_env.contains(id) {
            Some(format!("env {}", var.unwrap_or("?")))
        } else {
            None
        };
        match (given, merged.from_file.contains(id)) {
            // `param` and `env` add up: the file's names, then the flag's or variable's.
            (Some(g), true) => format!("{g} over {}", file()),
            (Some(g), false) => g,
            (None, true) => file(),
            (None, false) => "default".into(),
        }
    };

    let mut out = format!("# anteroom {VERSION}: the configuration it would run with\n");
    match &file {
        Some(p) => {
            let var = if from_env.contains("config") {
                "env ANTEROOM_CONFIG"
            } else {
                "flag"
            };
            let _ = writeln!(out, "# config file: {}  (from {var})", p.display());
        }
        None => out.push_str("# config file: none\n"),
    }
    // Tables last: in TOML, every key after a [table] header belongs to it.
    let mut tables = String::new();
    let cmd = Settings::augment_args(clap::Command::new("anteroom"));
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "config" {
            continue;
        }
        let key = id.replace('_', "-");
        let var = arg.get_env().and_then(|v| v.to_str());
        let from = source(id, var);
        match values.get(&key) {
            Some(toml::Value::Table(t)) => {
                let _ = writeln!(tables, "\n[{key}]  # from {from}");
                for (name, v) in t {
                    let _ = writeln!(tables, "{name} = {v}");
                }
            }
            Some(v) => {
                let _ = writeln!(out, "{key} = {v}  # from {from}");
            }
            // TOML has no null: an option without a value is shown, commented out.
            None => {
                let _ = writeln!(out, "# {key} is not set  # from {from}");
            }
        }
    }
    out.push_str(&tables);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::config::Cli;

    fn print(args: &[&str]) -> Result<String, ConfigError> {
        let m = Cli::command()
            .mut_args(|a| a.env(None::<&'static str>))
            .try_get_matches_from(std::iter::once("anteroom").chain(args.iter().copied()))
            .unwrap();
        print_config(Cli::from_arg_matches(&m).unwrap().serve)
    }

    fn line<'a>(out: &'a str, key: &str) -> &'a str {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} ")))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
    }

    #[test]
    fn each_line_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "max-queue = 10\nworkers = \"2:6\"\n[param]\nA = \"file\"\nB = \"file\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let out = print(&[
            "--config",
            p,
            "--max-body-size",
            "2m",
            "--param",
            "B=flag",
            "--print-config",
            "--",
            "php-cgi",
        ])
        .unwrap();
        assert_eq!(
            line(&out, "max-body-size"),
            "max-body-size = \"2m\"  # from flag"
        );
        assert_eq!(
            line(&out, "max-queue"),
            format!("max-queue = 10  # from file {p}")
        );
        assert_eq!(
            line(&out, "workers"),
            format!("workers = \"2:6\"  # from file {p}")
        );
        assert_eq!(line(&out, "backlog"), "backlog = 1024  # from default");
        assert_eq!(
            line(&out, "max-header-size"),
            "max-header-size = \"16k\"  # from default"
        );
        assert_eq!(
            line(&out, "command"),
            "command = [\"php-cgi\"]  # from command line"
        );
        assert_eq!(
            line(&out, "max-connections"),
            "# max-connections is not set  # from default"
        );
        assert!(
            out.contains(&format!(
                "\n[param]  # from flag over file {p}\nA = \"file\"\nB = \"flag\"\n"
            )),
            "{out}"
        );
        assert!(!out.contains("print-config"), "{out}");
    }

    /// What it prints is a config file that gives the same configuration.
    #[test]
    fn the_output_reads_back_as_the_same_settings() {
        let out = print(&[
            "--workers",
            "3",
            "--crash-exit",
            "10/90",
            "--admin",
            "off",
            "--listen",
            "unix:/tmp/a.sock",
            "--listen",
            "127.0.0.1:9",
            "--env",
            "X=a b",
            "--body-buffer-size",
            "1000",
            "--queue-timeout",
            "1.5",
            "--access-log",
            "--",
            "app",
            "-v",
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, &out).unwrap();
        let again = print(&["--config", path.to_str().unwrap()]).unwrap();
        let strip = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with("# config file"))
                .map(|l| l.split("  # from").next().unwrap_or(l).to_owned())
                .collect()
        };
        assert_eq!(strip(&out), strip(&again));
        assert!(again.contains("crash-exit = \"10/90\""), "{again}");
        assert!(again.contains("admin = \"off\""), "{again}");
        assert!(again.contains("body-buffer-size = 1000"), "{again}");
    }

    #[test]
    fn a_default_that_depends_on_others_is_shown_as_decided() {
        let out = print(&["--listen-fastcgi", "127.0.0.1:9"]).unwrap();
        assert_eq!(line(&out, "listen"), "listen = []  # from default");
    }

    #[test]
    fn a_configuration_that_would_be_refused_is_refused() {
        let e = print(&["--workers", "0", "--print-config"]).unwrap_err();
        assert!(e.to_string().starts_with("workers:"), "{e}");
    }
}
