//! `cstor`: look at, verify and export images of containers-storage, and import them into
//! composefs repositories, through `cstor-helper`.
//!
//! The exit statuses are listed in [`exit`] (and in `cstor --help`).

#![forbid(unsafe_code)]

mod args;
mod commands;
mod exit;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;

use crate::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cstor_logging::init(cstor_logging::Verbosity::from_flags(
        cli.global.verbose,
        cli.global.quiet,
    ));
    // While this is the only thread (see reserve_fd_table): an import of two layers holds
    // about 1,200 fds.
    cstor_proxy_client::reserve_fd_table(4096);
    // An import's streaming buffers, once freed, must not stay resident beside the image's
    // tree (glibc's dynamic thresholds would keep tens of MB of them).
    cstor_sys::memory::limit_retained_memory();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cstor: starting the async runtime: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit::status(&e);
            if code != exit::PIPE {
                eprintln!("cstor: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}
