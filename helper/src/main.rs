//! `cstor-helper`: serves containers-storage over JSON-RPC with fd passing (fd 0 is a
//! socket), over stdin/stdout with `--stdio` for debugging, or as a varlink
//! `org.composefs.Oci` layer source with `--varlink`.
//!
//! Exit codes: 0 after end of input or `Shutdown`; 1 when the storage cannot be opened or
//! served (the reason is on stderr); 2 for command-line errors.

#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cstor_helper::server::{Helper, ServerConfig, socket, stdio};
use cstor_helper::storage::Storage;
use cstor_helper::storage::config::{ConfigEnv, Overrides, StorageOptions};

/// Read-only server of containers-storage (overlay) for cstor clients.
///
/// Normally started by a client with a socket on fd 0. For debugging, `--stdio` reads one
/// JSON-RPC request per line on stdin and prints the replies, e.g.
/// `echo '{"jsonrpc":"2.0","id":1,"method":"ListImages"}' | cstor-helper --stdio`.
///
/// `--varlink SOCKET` serves composefs' `org.composefs.Oci` interface (GetInfo, HasLayer,
/// GetLayer as splitdirfdstream-v0) on a Unix socket instead, for composefs-rs consumers;
/// started by systemd socket activation (`LISTEN_FDS`), `--varlink` serves the passed socket.
/// See docs/varlink.md.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Serve JSON lines on stdin/stdout instead of the socket on fd 0.
    #[arg(long)]
    stdio: bool,
    /// Serve org.composefs.Oci over varlink on this Unix socket path (created 0600; must not
    /// exist), or on the socket systemd passes (LISTEN_FDS) when given without a path. Only
    /// peers with the helper's own uid are served.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, conflicts_with = "stdio")]
    varlink: Option<Option<PathBuf>>,
    /// Serve org.composefs.Oci over varlink on the connected socket on fd 0 (one peer, until
    /// it closes): how cstor starts a helper whose layers it hands to a repository service.
    #[arg(long, conflicts_with_all = ["stdio", "varlink"])]
    varlink_stdin: bool,
    /// Storage root (graphroot), overriding storage.conf.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Run root, overriding storage.conf.
    #[arg(long, value_name = "DIR")]
    runroot: Option<PathBuf>,
    /// Separate image store, overriding storage.conf.
    #[arg(long, value_name = "DIR")]
    imagestore: Option<PathBuf>,
    /// Graph driver, overriding storage.conf (only overlay is served).
    #[arg(long, value_name = "NAME")]
    storage_driver: Option<String>,
    /// Driver option, replacing storage.conf's options (repeatable; like STORAGE_OPTS).
    #[arg(long = "storage-opt", value_name = "OPT")]
    storage_opts: Vec<String>,
    /// Additional read-only image store (repeatable).
    #[arg(long = "additional-image-store", value_name = "DIR")]
    additional_image_stores: Vec<PathBuf>,
    /// Read only this storage.conf (like CONTAINERS_STORAGE_CONF).
    #[arg(long, value_name = "FILE")]
    storage_conf: Option<PathBuf>,
    /// Release a layer handle after this many seconds without a request naming it.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = parse_seconds)]
    lease_timeout: Duration,
    /// Give up waiting for a storage lock held by a writer after this many seconds.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    lock_timeout: Duration,
    /// With --stdio: write each layer GetLayer describes as DIR/<diff-id>.tar and check it.
    #[arg(long, value_name = "DIR", requires = "stdio", value_parser = parse_dir)]
    dump_tar: Option<PathBuf>,
    /// With --stdio: describe at most N stream entries per GetLayer.
    #[arg(long, value_name = "N", default_value_t = 100_000, requires = "stdio")]
    describe_limit: usize,
    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// Command-line values are checked by clap, so a bad one exits with status 2 like any
/// other usage error.
fn parse_seconds(v: &str) -> std::result::Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{v:?} is not a positive number of seconds"))
}

fn parse_dir(v: &str) -> std::result::Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if p.is_dir() {
        Ok(p)
    } else {
        Err(format!("{v}: not a directory"))
    }
}

/// Binds a Unix socket at `path`. A socket already there that nobody listens on is what a
/// killed helper leaves behind: it is replaced. Anything else there is an error.
fn bind_replacing_stale(
    path: &std::path::Path,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    match UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            let refused = matches!(
                UnixStream::connect(path),
                Err(c) if c.kind() == std::io::ErrorKind::ConnectionRefused
            );
            if !(is_socket && refused) {
                return Err(e);
            }
            tracing::info!(path = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

fn run(cli: Cli) -> Result<()> {
    // Content fds are opened ahead of the client; the soft limit is often only 1024. The fd
    // table is grown while this process has one thread (see reserve_table).
    cstor_protocol::fds::raise_soft_limit();
    cstor_protocol::fds::reserve_table(ServerConfig::default().fds_held());
    let mut env = ConfigEnv::from_process();
    if let Some(conf) = &cli.storage_conf {
        env.vars.insert(
            "CONTAINERS_STORAGE_CONF".into(),
            conf.clone().into_os_string(),
        );
    }
    let mut options = StorageOptions::load(&env).context("reading storage configuration")?;
    options.apply(&Overrides {
        graphroot: cli.root.clone(),
        runroot: cli.runroot.clone(),
        imagestore: cli.imagestore.clone(),
        driver: cli.storage_driver.clone(),
        storage_opts: (!cli.storage_opts.is_empty()).then(|| cli.storage_opts.clone()),
        additional_image_stores: cli.additional_image_stores.clone(),
    });
    tracing::info!(graphroot = %options.graphroot.display(), rootless = options.rootless, "storage");
    let storage = Storage::open(options, cli.lock_timeout).context("opening the storage")?;
    let helper = Arc::new(Helper {
        storage,
        config: ServerConfig {
            lease: cli.lease_timeout,
            dump_tar: cli.dump_tar.clone(),
            describe_limit: cli.describe_limit,
            ..ServerConfig::default()
        }
        .fit_fd_budget(cstor_protocol::fds::budget()),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let Some(path) = &cli.varlink {
        let listener = match cstor_helper::varlink::activation_listener()
            .context("taking the socket systemd passed")?
        {
            Some(l) => l,
            None => {
                let Some(path) = path else {
                    bail!("--varlink without a path needs a socket from systemd (LISTEN_FDS)");
                };
                let l = bind_replacing_stale(path)
                    .with_context(|| format!("binding {}", path.display()))?;
                // Connections from other users are refused anyway (peer credentials); the
                // mode keeps them from connecting at all.
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .with_context(|| format!("restricting {} to its owner", path.display()))?;
                l
            }
        };
        listener
            .set_nonblocking(true)
            .context("configuring the varlink socket")?;
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener)?;
            cstor_helper::varlink::serve(helper, listener).await
        })
        .context("serving varlink")?;
    } else if cli.varlink_stdin {
        let sock = socket_on_fd0()?;
        rt.block_on(async move {
            let stream = std::os::unix::net::UnixStream::from(sock);
            stream.set_nonblocking(true)?;
            let stream = tokio::net::UnixStream::from_std(stream)?;
            cstor_helper::varlink::serve_connected(helper, stream).await
        })
        .context("serving varlink on fd 0")?;
    } else if cli.stdio {
        rt.block_on(stdio::serve(helper))
            .context("serving stdin/stdout")?;
    } else {
        let sock = socket_on_fd0()?;
        rt.block_on(socket::serve(helper, sock))
            .context("serving the socket on fd 0")?;
    }
    Ok(())
}

/// The socket the client passed on fd 0.
fn socket_on_fd0() -> Result<std::os::fd::OwnedFd> {
    let stdin = std::io::stdin();
    let fd = stdin.as_fd();
    let st = rustix::fs::fstat(fd).context("inspecting fd 0")?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        bail!(
            "fd 0 is not a socket: cstor-helper is started by a client with a socketpair on \
             fd 0 (e.g. by the cstor CLI); for interactive use, run it with --stdio"
        );
    }
    fd.try_clone_to_owned()
        .context("duplicating the socket on fd 0")
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cstor_logging::init(cstor_logging::Verbosity::from_flags(cli.verbose, false));
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cstor-helper: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
