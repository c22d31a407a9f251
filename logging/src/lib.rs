//! Logging set-up shared by the `cstor` and `cstor-helper` binaries.
//!
//! Both log with `tracing` to stderr and are quiet by default: warnings and errors only,
//! `-v` for informational messages, `-vv` for debugging, `-vvv` for everything, and
//! `RUST_LOG` (an `EnvFilter` directive) over all of them. Colour codes are written only when
//! stderr is a terminal and `NO_COLOR` is unset, so that a log captured by a supervisor, a
//! test harness or a pipe stays plain text.
//!
//! Only binaries call this; the libraries emit `tracing` events and leave the choice of
//! subscriber to the program that embeds them.
//!
//! ```
//! cstor_logging::init(cstor_logging::Verbosity::from_flags(1, false));
//! tracing::info!("shown: -v was given");
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How much a binary logs when `RUST_LOG` does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// Errors only (`-q`).
    Quiet,
    /// Warnings and errors: the default.
    Normal,
    /// Informational messages too (`-v`).
    Info,
    /// Debugging messages (`-vv`).
    Debug,
    /// Everything (`-vvv`).
    Trace,
}

impl Verbosity {
    /// The verbosity given by a count of `-v` flags and a `-q` flag (which wins).
    pub fn from_flags(verbose: u8, quiet: bool) -> Self {
        match (quiet, verbose) {
            (true, _) => Verbosity::Quiet,
            (false, 0) => Verbosity::Normal,
            (false, 1) => Verbosity::Info,
            (false, 2) => Verbosity::Debug,
            (false, _) => Verbosity::Trace,
        }
    }

    fn directive(self) -> &'static str {
        match self {
            Verbosity::Quiet => "error",
            Verbosity::Normal => "warn",
            Verbosity::Info => "info",
            Verbosity::Debug => "debug",
            Verbosity::Trace => "trace",
        }
    }
}

/// Whether log lines may carry colour codes: only on a terminal, and not under `NO_COLOR`
/// (<https://no-color.org>).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the stderr subscriber. `RUST_LOG`, when set and valid, overrides `verbosity`.
///
/// Does nothing if the process already has a global subscriber (for example when a test
/// harness installed one), so calling it twice is harmless.
pub fn init(verbosity: Verbosity) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(verbosity.directive()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::Verbosity;

    #[test]
    fn quiet_wins_over_verbose_flags() {
        assert_eq!(Verbosity::from_flags(3, true), Verbosity::Quiet);
        assert_eq!(Verbosity::from_flags(0, false), Verbosity::Normal);
        assert_eq!(Verbosity::from_flags(2, false), Verbosity::Debug);
        assert_eq!(Verbosity::from_flags(9, false), Verbosity::Trace);
    }
}
