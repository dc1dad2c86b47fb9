//! The configuration as an operator meets it from outside: `--print-config` (every source shown, nothing
//! bound), the repeatable options' variables, and `--version`.

use std::net::TcpListener;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_anteroom");

/// `anteroom ARGS` with only the `ANTEROOM_*` variables given (none inherited from whoever runs the tests).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ANTEROOM_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in\n{out}"))
}

/// A value from each source shows its source, and the precedence is flag > variable > file > default.
#[test]
fn print_config_shows_each_value_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("anteroom.toml");
    std::fs::write(
        &file,
        "max-queue = 10\nworkers = 7\nbacklog = 50\ncommand = [\"php-cgi\"]\n[env]\nFROM_FILE = \"1\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    // Taken: had --print-config bound anything, it would fail here.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let env = [
        ("ANTEROOM_CONFIG", path),
        ("ANTEROOM_WORKERS", "3"),
        ("ANTEROOM_BACKLOG", "77"),
    ];
    for top in [&[][..], &["serve"][..]] {
        let args: Vec<&str> = top
            .iter()
            .copied()
            .chain(["--print-config", "--backlog", "99", "--listen", &listen])
            .collect();
        let out = stdout_ok(&run(&args, &env));
        assert_eq!(line(&out, "backlog"), "backlog = 99  # from flag");
        assert_eq!(
            line(&out, "workers"),
            "workers = 3  # from env ANTEROOM_WORKERS"
        );
        assert_eq!(
            line(&out, "max-queue"),
            format!("max-queue = 10  # from file {path}")
        );
        assert_eq!(
            line(&out, "max-body-size"),
            "max-body-size = \"16m\"  # from default"
        );
        assert_eq!(
            line(&out, "listen"),
            format!("listen = [\"{listen}\"]  # from flag")
        );
        assert_eq!(
            line(&out, "command"),
            format!("command = [\"php-cgi\"]  # from file {path}")
        );
        assert!(
            out.contains(&format!("[env]  # from file {path}\nFROM_FILE = \"1\"\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "# config file: {path}  (from env ANTEROOM_CONFIG)"
            )),
            "{out}"
        );
    }
}

/// A refused configuration is refused by --print-config too, with the usual message and exit code.
#[test]
fn print_config_refuses_what_a_start_would() {
    let out = run(&["--print-config", "--workers", "0"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workers:"));
    let out = run(&["--print-config"], &[("ANTEROOM_MAX_QUEUE", "lots")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ANTEROOM_MAX_QUEUE"));
}

/// A repeatable option's variable holds one value per line; a bad one names the variable.
#[test]
fn repeatable_options_read_one_value_per_line_from_their_variable() {
    let env = [
        ("ANTEROOM_LISTEN", "127.0.0.1:18080\nunix:/tmp/a,b.sock"),
        ("ANTEROOM_PARAM", "SCRIPT_FILENAME=/srv/a,b.php\nX=1"),
        ("ANTEROOM_ENV", "PHP_FCGI_MAX_REQUESTS=0"),
    ];
    let out = stdout_ok(&run(&["--print-config"], &env));
    assert_eq!(
        line(&out, "listen"),
        "listen = [\"127.0.0.1:18080\", \"unix:/tmp/a,b.sock\"]  # from env ANTEROOM_LISTEN"
    );
    assert!(
        out.contains(
            "[param]  # from env ANTEROOM_PARAM\nSCRIPT_FILENAME = \"/srv/a,b.php\"\nX = \"1\"\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("[env]  # from env ANTEROOM_ENV\nPHP_FCGI_MAX_REQUESTS = \"0\"\n"),
        "{out}"
    );
    // The flag replaces the variable's whole list, as for any option.
    let out = stdout_ok(&run(&["--print-config", "--param", "Y=2"], &env));
    assert!(out.contains("[param]  # from flag\nY = \"2\"\n"), "{out}");
    let out = run(&["--print-config"], &[("ANTEROOM_PARAM", "A=1\n1X=y")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ANTEROOM_PARAM") && err.contains("1X"),
        "{err}"
    );
}

#[test]
fn version_names_the_version() {
    let out = stdout_ok(&run(&["--version"], &[]));
    let want = format!("anteroom {}", env!("CARGO_PKG_VERSION"));
    assert!(out.starts_with(&want), "{out}");
    // With a git revision when built from a checkout: `anteroom 0.1.0 (git 3f9c26fe2257)`.
    let rest = out.trim_end().strip_prefix(&want).unwrap();
    assert!(
        rest.is_empty() || (rest.starts_with(" (git ") && rest.ends_with(')')),
        "{out}"
    );
}
