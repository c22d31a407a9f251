//! Exit statuses, one per kind of failure a script may want to tell apart.

use cstor_import::Error as ImportError;
use cstor_proxy_client::Error as ClientError;
use cstor_proxy_client::protocol::ErrorCode;
use cstor_proxy_client::protocol::assemble::AssembleError;

/// Something else failed (the message says what).
pub const OTHER: u8 = 1;
/// The command line asks for something that cannot be done (clap's own status for bad
/// arguments; also for combinations only known to be impossible once parsed).
pub const USAGE: u8 = 2;
/// The image, layer or tag does not exist, or the reference is invalid, ambiguous or of
/// another transport.
pub const NOT_FOUND: u8 = 3;
/// Verification failed: a CRC, size or digest did not match.
pub const VERIFICATION: u8 = 4;
/// The helper could not be started, died, or stopped answering (and was killed).
pub const HELPER: u8 = 5;
/// Storage busy: a lock stayed held by a writer, or the helper did not answer in time.
pub const BUSY: u8 = 6;
/// `--copy-policy reflink-only` and a file could not be reflinked.
pub const REFLINK: u8 = 7;
/// stdout was closed early (`cstor layer-tar ... | head`): silently, as for a process
/// killed by SIGPIPE.
pub const PIPE: u8 = 141;

/// The exit statuses, for `--help` and the man page.
pub const HELP: &str = "\
Exit status:
  0    success
  1    any other failure
  2    command-line error
  3    image, layer or tag not found; invalid, ambiguous or unsupported reference
  4    verification failed (a CRC, size or digest did not match)
  5    the helper could not be started, died, or stopped answering (it is then killed)
  6    storage busy (a lock stayed held) or the helper did not answer in time; retry later
  7    --copy-policy reflink-only and a file could not be reflinked
  141  stdout was closed early (e.g. piped into head)";

/// Something the command line named that does not exist (exit status 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// A command line whose options cannot go together (exit status 2, as clap's own refusals).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ClientError>(),
            Some(ClientError::Assemble {
                cause: AssembleError::Write(w),
                ..
            }) if w.kind() == std::io::ErrorKind::BrokenPipe
        ) || c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|w| w.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn client_status(err: &ClientError) -> u8 {
    match err {
        ClientError::HelperNotFound(_)
        | ClientError::Spawn { .. }
        | ClientError::HelperDied { .. }
        | ClientError::HelperUnresponsive { .. } => HELPER,
        ClientError::DigestMismatch { .. } | ClientError::Assemble { .. } => VERIFICATION,
        ClientError::Timeout { .. } => BUSY,
        _ => match err.code() {
            Some(
                ErrorCode::ImageNotFound
                | ErrorCode::LayerNotFound
                | ErrorCode::AmbiguousReference
                | ErrorCode::InvalidReference,
            ) => NOT_FOUND,
            Some(ErrorCode::ChecksumMismatch | ErrorCode::MissingFile) => VERIFICATION,
            Some(ErrorCode::LockTimeout) => BUSY,
            _ => OTHER,
        },
    }
}

/// The exit status for `e`: from the first error in its chain that says.
pub fn status(e: &anyhow::Error) -> u8 {
    if broken_pipe(e) {
        return PIPE;
    }
    for cause in e.chain() {
        if let Some(err) = cause.downcast_ref::<ImportError>() {
            return match err {
                ImportError::Helper(c) => client_status(c),
                ImportError::ReflinkRequired { .. } => REFLINK,
                ImportError::ContentChanged { .. }
                | ImportError::OstreeObject { .. }
                | ImportError::SourceObject { .. } => VERIFICATION,
                ImportError::NotFound(_) => NOT_FOUND,
                _ => OTHER,
            };
        }
        if let Some(err) = cause.downcast_ref::<ClientError>() {
            return client_status(err);
        }
        if cause.downcast_ref::<NotFound>().is_some() {
            return NOT_FOUND;
        }
        if cause.downcast_ref::<Usage>().is_some() {
            return USAGE;
        }
    }
    OTHER
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn import_errors_from_the_helper_keep_their_status() {
        let e: Result<(), ImportError> =
            Err(ImportError::Helper(ClientError::HelperUnresponsive {
                what: "KeepAlive".into(),
                seconds: 1.0,
                stderr: String::new(),
            }));
        let e = e.context("importing x").unwrap_err();
        assert_eq!(status(&e), HELPER);
    }
}
