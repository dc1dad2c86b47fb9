//! The `anteroom` command: parse the command line, set up logging, run. Errors end here, in words.

use std::process::ExitCode;

use anyhow::Context;

use anteroom::app::Stopped;
use anteroom::config::{Cli, Command, Config, ConfigError, LogFormat};
use anteroom::systemd::Inherited;

#[global_allocator]
static ALLOCATOR: anteroom::Allocator = anteroom::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse_env_aware();
    match cli.command {
        Some(Command::DemoWorker) => match anteroom::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo worker: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::ExecWorker { argv }) => {
            let e = anteroom::pool::spawn::exec_worker(&argv);
            eprintln!("anteroom: cannot run worker command {:?}: {e}", argv[0]);
            // 127, as a shell says "command not found".
            ExitCode::from(127)
        }
        Some(Command::Serve(args)) => report(serve(*args)),
        Some(Command::Sockets(args)) => match anteroom::sockdiag::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("anteroom sockets: {e}");
                ExitCode::FAILURE
            }
        },
        None => report(serve(cli.serve)),
    }
}

fn report(r: anyhow::Result<Stopped>) -> ExitCode {
    match r {
        Ok(Stopped::Signal | Stopped::Upgraded) => ExitCode::SUCCESS,
        Ok(Stopped::CrashLoop) => ExitCode::from(anteroom::app::EXIT_CRASH_LOOP),
        Err(e) => {
            eprintln!("anteroom: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                // As clap does for a bad flag: the command line or file is wrong, not the run.
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn serve(args: anteroom::config::ServeArgs) -> anyhow::Result<Stopped> {
    if args.print_config {
        // Exit 0 after printing, as after a clean stop; a refused configuration is an error as at a start.
        print!("{}", anteroom::config::print_config(args)?);
        return Ok(Stopped::Signal);
    }
    // First, while this is the only thread: systemd's (or an upgrade's) variables, read and removed.
    let inherited = Inherited::take_from_env();
    let cfg = Config::from_args(args)?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("ANTEROOM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => fmt.json().init(),
        // No colours: they would be written into the span fields that logfmt lines carry.
        LogFormat::Logfmt => fmt
            .with_ansi(false)
            .event_format(anteroom::logfmt::Logfmt)
            .init(),
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stopped = rt.block_on(anteroom::app::serve(cfg, inherited))?;
    // Workers that ignore SIGTERM must not keep the runtime's shutdown waiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(stopped)
}
