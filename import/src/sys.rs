//! What the import asks of its own process: lower priority for its background threads, and
//! memory figures in its debug log.

/// Lowers the calling thread's scheduling priority by `by` nice steps (to 19 at most). Best
/// effort: a failure only leaves the thread at its priority. On Linux, `setpriority` on "this
/// process" changes the calling thread only.
pub(crate) fn lower_thread_priority(by: i32) {
    let Ok(now) = rustix::process::getpriority_process(None) else {
        return;
    };
    let _ = rustix::process::setpriority_process(None, now.saturating_add(by).min(19));
}

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
        peak_kib = field("VmHWM:"),
        "memory"
    );
}
