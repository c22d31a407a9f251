//! Printing for people and for scripts (`--json`).

use std::io::Write;

use anyhow::Result;

/// Writes `v` as pretty JSON and a newline on stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// The 12 hex digits podman shows of an id or digest.
pub fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    id.get(..12).unwrap_or(id)
}

/// A byte count as people read it (`4.77 MiB`).
pub fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}
