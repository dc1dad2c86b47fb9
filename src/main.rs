//! The `anteroom` command: parse the command line, set up logging, run. Errors end here, in words.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use anteroom::config::{Cli, Command, Config};
use anteroom::server::Stopped;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        None => report(serve(cli.serve)),
    }
}

fn report(r: anyhow::Result<Stopped>) -> ExitCode {
    match r {
        Ok(Stopped::Signal) => ExitCode::SUCCESS,
        Ok(Stopped::CrashLoop) => ExitCode::from(anteroom::server::EXIT_CRASH_LOOP),
        Err(e) => {
            eprintln!("anteroom: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: anteroom::config::ServeArgs) -> anyhow::Result<Stopped> {
    let cfg = Config::from_args(args)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ANTEROOM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stopped = rt.block_on(anteroom::server::run(cfg))?;
    // Workers that ignore SIGTERM must not keep the runtime's shutdown waiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(stopped)
}
