//! Stopping an import or a copy: when [`crate::ImportOptions::cancel`] fires, or when its
//! future is dropped. Both set one flag that the layer readers, the object workers and the
//! finalize step look at before each file or step (and between the chunks of a large file);
//! cancelled, the work still winds down before the call returns, so that none of its threads
//! is left running.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The stop flag of one import or copy, set when this is dropped (the future was dropped).
#[derive(Debug, Default)]
pub(crate) struct StopOnDrop {
    pub flag: Arc<AtomicBool>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::Relaxed);
    }
}

/// Runs `work`, which watches `stop`'s flag, until it ends or `token` fires; then it sets
/// the flag, lets the work wind down, and fails with [`Error::Cancelled`] (unless the work
/// had finished anyway).
pub(crate) async fn run<T>(
    token: Option<&CancellationToken>,
    stop: &StopOnDrop,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    let Some(token) = token else {
        return work.await;
    };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        () = token.cancelled() => {
            stop.flag.store(true, Ordering::Relaxed);
            match work.await {
                Ok(done) => Ok(done),
                Err(_) => Err(Error::Cancelled),
            }
        }
    }
}
