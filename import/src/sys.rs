//! What the import reads of its own process: memory figures for its debug log.

/// Logs the process's resident and peak memory at `phase` (debug level, from /proc).
pub(crate) fn log_memory(phase: &str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tracing::debug!(
        phase,
        rss_kib = field("VmRSS:"),
        anon_kib = field("RssAnon:"),
        peak_kib = field("VmHWM:"),
        "memory"
    );
}
