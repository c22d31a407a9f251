//! How a peer sizes its use of file descriptors, so that `SCM_RIGHTS` never drops any.
//!
//! A process that receives a message carrying more fds than its soft `RLIMIT_NOFILE` leaves
//! room for gets the message, with the ancillary data cut short (`MSG_CTRUNC`) and the fds
//! closed by the kernel. Both sides therefore count: the helper sizes its per-layer queues
//! from its limit, and a client holds no more content fds than [`budget`] allows.
//!
//! The fd table is also worth growing once, early: the kernel doubles it as fds arrive, and
//! in a process with several threads each doubling waits for an RCU grace period.
//! [`reserve_table`] grows it while the caller still has one thread.

/// Fds kept free for everything that is not content: sockets, pipes, the repository's
/// directories, libraries that open files behind the caller's back.
pub const RESERVE: usize = 64;

/// How many more fds this process may hold: its soft `RLIMIT_NOFILE` less [`RESERVE`], or
/// `usize::MAX` without a limit.
///
/// ```
/// assert!(cstor_protocol::fds::budget() > 0);
/// ```
pub fn budget() -> usize {
    match rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        Some(n) => usize::try_from(n)
            .unwrap_or(usize::MAX)
            .saturating_sub(RESERVE),
        None => usize::MAX,
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as a process that holds many fds on
/// purpose should (the soft limit is often 1024 for compatibility with `select`). Best
/// effort: a failure leaves the limit as it was, and the caller sizes itself by [`budget`].
pub fn raise_soft_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if let Some(max) = lim.maximum
        && lim.current != Some(max)
    {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// Grows this process's fd table so that it holds `n` fds (capped at the soft limit)
/// without growing again.
///
/// Done while the process has one thread it costs an allocation; later it waits for one RCU
/// grace period at most instead of one per doubling. Best effort: it never fails, and a
/// table already that large is left alone.
///
/// ```
/// cstor_protocol::fds::reserve_table(1024);
/// ```
pub fn reserve_table(n: usize) {
    let limit = usize::try_from(
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX),
    )
    .unwrap_or(usize::MAX);
    // F_DUPFD picks the lowest free fd at or above this one, so the table must reach it.
    let Ok(top) = i32::try_from(n.min(limit).saturating_sub(1)) else {
        return;
    };
    if top > 0 {
        // The duplicate is closed again right away; only the table's size stays.
        let _ = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), top);
    }
}
