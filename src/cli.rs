//! Command line (`operations.md`, "Command line"): `run` (the default), `validate`, and
//! `demo` (the gateway plus a local echo backend, for the README's examples).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::config::{Config, Overrides};

#[derive(Parser, Debug)]
#[command(
    name = "scp-gateway",
    version,
    about = "API gateway data plane serving SCP deployment snapshots"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve traffic (the default when no subcommand is given).
    Run(RunArgs),
    /// Check snapshot files: one line per problem (JSON path + reason) and per warning (a
    /// setting that can never admit a caller); exit 1 if any file is invalid.
    Validate {
        /// Also exit 1 when a file has warnings.
        #[arg(long)]
        strict: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the `key_sha256` of an API key (usage_plans[].api_keys[]).
    ///
    /// The key is the argument, or standard input without its final line break (so that
    /// `echo KEY | scp-gateway key-hash` gives the digest of KEY, not of KEY and a newline).
    KeyHash {
        /// The key value; read from standard input when absent.
        key: Option<String>,
    },
    /// Print the `secret_base64` of an HMAC secret (auths[].verification, HS256/384/512).
    ///
    /// The secret is the argument, or standard input without its final line break; its
    /// bytes are encoded as they are (standard base64, with padding).
    SecretBase64 {
        /// The secret; read from standard input when absent.
        secret: Option<String>,
    },
    /// Serve traffic and a local echo backend, for trying the gateway out.
    ///
    /// Reads config/gateway.toml (from the working directory, or --config FILE) and the
    /// snapshots of its snapshots.dir, which it copies into a temporary directory (named at
    /// start): snapshots pushed through the admin API and the state are kept there, never
    /// in the checkout.
    Demo {
        #[command(flatten)]
        run: RunArgs,
        /// Where the echo backend listens (the example snapshots point at 127.0.0.1:9000).
        #[arg(long, default_value = "127.0.0.1:9000")]
        backend_listen: SocketAddr,
    },
}

#[derive(Args, Debug, Default, Clone)]
struct RunArgs {
    /// Gateway config (TOML); relative paths in it are relative to its directory. Without
    /// it, the built-in defaults (those of config/gateway.toml) relative to the working
    /// directory.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Data-plane listen address (repeatable; replaces server.listen).
    #[arg(long = "listen")]
    listen: Vec<SocketAddr>,
    /// Admin listen address (replaces admin.listen).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Snapshot directory (replaces snapshots.dir).
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// State directory (replaces state.dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

const EXIT_CONFIG: u8 = 2;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Some(Command::Validate { files, strict }) => validate(&files, strict),
        Some(Command::KeyHash { key }) => {
            print_derived(key, |k| hex(&crate::snapshot::model::sha256(k)))
        }
        Some(Command::SecretBase64 { secret }) => print_derived(secret, |s| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(s)
        }),
        Some(Command::Run(args)) => run(args, None),
        Some(Command::Demo {
            run: args,
            backend_listen,
        }) => run(args, Some(backend_listen)),
        None => run(cli.run, None),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    crate::request_id::hex_into(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default()
}

/// `key-hash` and `secret-base64`: the argument, or standard input without its final line
/// break (`\n` or `\r\n`), turned into what the snapshot wants.
fn print_derived(arg: Option<String>, derive: impl Fn(&[u8]) -> String) -> ExitCode {
    let input = match arg {
        Some(a) => a.into_bytes(),
        None => {
            let mut buf = Vec::new();
            if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf) {
                return usage_error(format!("cannot read standard input: {e}"));
            }
            if buf.ends_with(b"\n") {
                buf.pop();
                if buf.ends_with(b"\r") {
                    buf.pop();
                }
            }
            buf
        }
    };
    if input.is_empty() {
        return usage_error("the value is empty");
    }
    let _ = writeln!(std::io::stdout().lock(), "{}", derive(&input));
    ExitCode::SUCCESS
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "scp-gateway: error: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn validate(files: &[PathBuf], strict: bool) -> ExitCode {
    let mut invalid = false;
    let mut out = std::io::stdout().lock();
    for f in files {
        match crate::snapshot::check_file(f) {
            Ok((api, warnings)) => {
                for w in &warnings {
                    let _ = writeln!(out, "{}: {}: warning: {}", f.display(), w.path, w.message);
                }
                invalid |= strict && !warnings.is_empty();
                let _ = writeln!(
                    out,
                    "{}: ok (api {}, revision {}{})",
                    f.display(),
                    api.id,
                    api.revision,
                    match warnings.len() {
                        0 => String::new(),
                        n => format!(", {n} warning(s)"),
                    }
                );
            }
            Err(issues) => {
                invalid = true;
                for i in issues {
                    let _ = writeln!(out, "{}: {i}", f.display());
                }
            }
        }
    }
    if invalid {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// A fatal start-up error: one line on stderr, exit code 2. Written without `eprintln!`,
/// which panics when stderr is a closed pipe (`scp-gateway run ... 2>&1 | head -1`): a
/// closed pipe must never change the documented exit code.
fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "scp-gateway: error: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(args: RunArgs, demo_backend: Option<SocketAddr>) -> ExitCode {
    let demo = demo_backend.is_some();
    let config_path = match (&args.config, demo) {
        (Some(p), _) => Some(p.clone()),
        // The demo reads the checkout's example configuration.
        (None, true) => Some(PathBuf::from("config/gateway.toml")),
        (None, false) => None,
    };
    let mut config = match &config_path {
        Some(path) if demo && !path.is_file() => {
            return config_error(format!(
                "the demo reads {} (run it from the checkout, or give --config FILE)",
                path.display()
            ))
        }
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => return config_error(e),
        },
        None => Config::default(),
    };
    if let Err(e) = config.apply(Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        snapshot_dir: args.snapshot_dir,
        state_dir: args.state_dir.clone(),
    }) {
        return config_error(e);
    }
    if demo {
        match demo_runtime_dir(&mut config, args.state_dir.is_none()) {
            Ok(dir) => tracing::info!(
                dir = %dir.display(),
                "demo: snapshots copied there; pushed snapshots and state are kept there"
            ),
            Err(e) => return config_error(e),
        }
    }
    if config.admin.is_open() {
        tracing::warn!(
            admin = %config.admin.listen,
            "the admin API is served without a token on an address other hosts can reach \
             (admin.allow_unauthenticated = true): anyone reaching it can replace every route"
        );
    }
    // Every client and backend connection is a descriptor: raise the soft limit to the hard
    // one (as nginx's worker_rlimit_nofile would), so that a default 1,024 does not cap
    // the gateway far below what the machine allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < config.limits.max_connections as u64 + 256 => tracing::warn!(
            open_file_limit = n,
            max_connections = config.limits.max_connections,
            "the open file limit is below limits.max_connections (+256 for backends and files); \
             connections will fail with EMFILE before the cap: raise `ulimit -n` or lower the cap"
        ),
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
    // The main thread's runtime runs the control plane (admin API, signals, reload and
    // flush scheduling, fleet pushes); the data plane runs on its own worker threads.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("scp-control")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return config_error(format!("cannot start the runtime: {e}")),
    };
    rt.block_on(serve(config, demo_backend))
}

/// The demo's runtime directory (under the system's temporary directory): the snapshots
/// of the configured directory are copied there, and it becomes the snapshot (and, unless
/// given, the state) directory, so that the demo never writes into the checkout.
fn demo_runtime_dir(config: &mut Config, own_state: bool) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join("scp-gateway-demo");
    let snapshots = dir.join("snapshots");
    let e = |e: std::io::Error| format!("demo directory {}: {e}", dir.display());
    std::fs::create_dir_all(&snapshots).map_err(e)?;
    // A fresh copy each start: snapshots pushed during an earlier demo do not linger.
    for old in crate::snapshot::snapshot_files(&snapshots).map_err(e)? {
        std::fs::remove_file(old).map_err(e)?;
    }
    let source = &config.snapshots.dir;
    let files = crate::snapshot::snapshot_files(source).map_err(|err| {
        format!(
            "config key `snapshots.dir`: cannot read {}: {err}",
            source.display()
        )
    })?;
    for f in files {
        if let Some(name) = f.file_name() {
            std::fs::copy(&f, snapshots.join(name)).map_err(e)?;
        }
    }
    config.snapshots.dir = snapshots;
    if own_state {
        config.state.dir = dir.join("state");
    }
    Ok(dir)
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("config key `{key}`: cannot listen on {addr}: {e}"))
}

/// Every data-plane address bound once per worker, with what each listener does.
struct Bound {
    /// `listeners[w]`: worker `w`'s sockets.
    listeners: Vec<crate::server::WorkerListeners>,
    data: Vec<String>,
    proxy: Vec<String>,
    tls: Vec<String>,
    cert_stores: Vec<Arc<crate::server::tls::CertStore>>,
}

fn bind_data_plane(config: &Config, workers: usize) -> Result<Bound, String> {
    use crate::server::{bind::bind, ListenerKind};
    let mut b = Bound {
        listeners: (0..workers).map(|_| Vec::new()).collect(),
        data: Vec::new(),
        proxy: Vec::new(),
        tls: Vec::new(),
        cert_stores: Vec::new(),
    };
    let mut add = |socks: Vec<std::net::TcpListener>, kind: &ListenerKind| -> Option<String> {
        let addr = socks.first()?.local_addr().ok()?.to_string();
        for (w, sock) in socks.into_iter().enumerate() {
            b.listeners[w].push((sock, kind.clone()));
        }
        Some(addr)
    };
    let mut data = Vec::new();
    for addr in &config.server.listen {
        data.extend(add(
            bind(*addr, workers, "server.listen")?,
            &ListenerKind::Plain,
        ));
    }
    let mut proxy = Vec::new();
    for addr in &config.server.proxy_protocol_listen {
        proxy.extend(add(
            bind(*addr, workers, "server.proxy_protocol_listen")?,
            &ListenerKind::ProxyProtocol,
        ));
    }
    let mut tls = Vec::new();
    let mut stores = Vec::new();
    for (i, t) in config.server.tls.iter().enumerate() {
        let store = crate::server::tls::CertStore::load(t, i)?;
        let server_config = store
            .server_config()
            .map_err(|e| format!("config key `server.tls[{i}]`: {e}"))?;
        let kind = ListenerKind::Tls(tokio_rustls::TlsAcceptor::from(server_config));
        tls.extend(add(bind(t.listen, workers, "server.tls.listen")?, &kind));
        stores.push(store);
    }
    b.data = data;
    b.proxy = proxy;
    b.tls = tls;
    b.cert_stores = stores;
    Ok(b)
}

async fn serve(config: Config, demo_backend: Option<SocketAddr>) -> ExitCode {
    if let Some(addr) = demo_backend {
        match crate::demo::start_echo(addr).await {
            Ok((local, _task)) => tracing::info!(backend = %local, "demo echo backend listening"),
            Err(e) => return config_error(format!("demo backend cannot listen on {addr}: {e}")),
        }
    }
    let workers = config.runtime.workers();
    crate::worker::set_count(workers);
    let bound = match bind_data_plane(&config, workers) {
        Ok(b) => b,
        Err(e) => return config_error(e),
    };
    let admin = match bind(config.admin.listen, "admin.listen").await {
        Ok(l) => l,
        Err(e) => return config_error(e),
    };
    if !config.snapshots.dir.is_dir() {
        return config_error(format!(
            "config key `snapshots.dir`: {} is not a directory (create it, or point the key \
             or --snapshot-dir at the directory of your snapshot files)",
            config.snapshots.dir.display()
        ));
    }
    let snapshot_dir = config.snapshots.dir.clone();
    let app = match App::new(config) {
        Ok(a) => a,
        Err(e) => return config_error(e),
    };
    app.spawn_state_flusher();
    let app2 = app.clone();
    let r = app
        .control
        .run(move || crate::reload::reconcile(&app2))
        .await
        .unwrap_or_default();
    tracing::info!(dir = %snapshot_dir.display(), loaded = r.loaded, rejected = r.rejected, "snapshot directory read");
    let _watcher = if app.config.snapshots.watch {
        match crate::reload::watch(app.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                return config_error(format!(
                    "config key `snapshots.dir`: cannot watch {}: {e}",
                    snapshot_dir.display()
                ))
            }
        }
    } else {
        None
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin_addr = admin
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let Bound {
        listeners,
        data,
        proxy,
        tls,
        cert_stores,
    } = bound;
    let workers = match crate::server::Workers::start(&app, listeners, &shutdown_rx) {
        Ok(w) => w,
        Err(e) => return config_error(format!("cannot start the worker threads: {e}")),
    };
    tokio::spawn(crate::admin::serve(app.clone(), admin));
    app.set_ready(true);
    tracing::info!(data = %data.join(","), admin = %admin_addr, workers = crate::worker::count(), "scp-gateway ready");
    // One machine-readable line on stdout with the bound addresses (tests and scripts that
    // bind port 0 read it); logs go to stderr.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "listening data={} admin={admin_addr} proxy={} tls={}",
            data.join(","),
            proxy.join(","),
            tls.join(",")
        );
        let _ = out.flush();
    }

    wait_for_signals(&app, &cert_stores).await;

    let drain_timeout = app.config.server.drain_timeout;
    tracing::info!(
        deadline_s = drain_timeout.as_secs(),
        "shutting down: draining connections"
    );
    app.start_draining();
    let _ = shutdown_tx.send(true);
    // The workers stop accepting, let their connections finish (up to the drain
    // deadline) and exit; the admin listener answers meanwhile (/readyz says 503).
    let left = tokio::task::spawn_blocking(move || workers.join())
        .await
        .unwrap_or(0);
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain deadline reached; remaining connections were cut"
        );
    }
    app.flush_state();
    // Fleet mode: the usage counted since the last push (none is lost on a graceful stop).
    if let Err(e) = app.quota.push().await {
        tracing::warn!(error = %e, "the last usage counts could not be added to the fleet's usage hours; they are lost");
    }
    if let Some(log) = &app.access_log {
        log.close();
    }
    if app.tracing.is_some() {
        // Waits until the export thread has sent what is queued (bounded by the export
        // timeout), on a blocking thread: the runtime keeps serving the admin API.
        let app = app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = &app.tracing {
                t.flush();
            }
        })
        .await;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

#[cfg(unix)]
async fn wait_for_signals(app: &Arc<App>, cert_stores: &[Arc<crate::server::tls::CertStore>]) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: re-reading the snapshot directory and TLS certificates");
                for store in cert_stores {
                    match store.reload() {
                        Ok(()) => tracing::info!("TLS certificates reloaded"),
                        Err(e) => tracing::error!(error = %e, "TLS certificates not reloaded; the current ones stay"),
                    }
                }
                let app2 = app.clone();
                if let Some(r) = app.control.run(move || crate::reload::reconcile(&app2)).await {
                    tracing::info!(loaded = r.loaded, rejected = r.rejected, unloaded = r.unloaded, "snapshot directory re-read");
                }
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_app: &Arc<App>, _cert_stores: &[Arc<crate::server::tls::CertStore>]) {
    let _ = tokio::signal::ctrl_c().await;
}
