//! The `meshd` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use meshd::{
    config::{Config, LogFormat},
    storage::ControlDb,
};

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "meshd: the reDB mesh network appliance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM.
    Run {
        /// TOML config file; every key can be overridden by MESHD_<SECTION>__<KEY>.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log line format (overrides `[log] format`).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Create a node's data directory: control database, node id, Ed25519 and TLS keys.
    Init {
        /// The data directory to create.
        #[arg(long)]
        data_dir: PathBuf,
        /// The node id the platform assigned (default: MESH_ROUTING_ID, else random).
        #[arg(long, env = "MESH_ROUTING_ID")]
        node_id: Option<u64>,
        /// Also write a new mesh secret (64 hex digits) to this file, readable by its owner
        /// only, unless it exists: give the same file to every node of a configured mesh
        /// (`mesh_secret_file`).
        #[arg(long)]
        mesh_secret_file: Option<PathBuf>,
    },
    /// Seed, join, stop, start, leave or evict through a running node (its gRPC port).
    Mesh {
        /// The node's gRPC address.
        #[arg(long, default_value = "127.0.0.1:50056")]
        grpc: String,
        #[command(subcommand)]
        action: meshd::cli::MeshAction,
    },
    /// Validate a config file and print the resolved settings.
    CheckConfig {
        /// TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Writes a new random mesh secret to `path` (0600), leaving an existing file alone.
fn write_new_secret(path: &std::path::Path) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut secret = [0u8; meshd_shards::credential::SECRET_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            writeln!(file, "{}", meshd_shards::credential::format_secret(&secret))?;
            println!("wrote a new mesh secret to {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            println!("{} exists; kept as it is", path.display());
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("cannot write {}: {e}", path.display())),
    }
}

fn init_logging(level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Replaceable: `log.level` is a live setting (SetPolicy through the control group).
    let (filter, handle) = reload::Layer::new(filter);
    // Colour codes only for a person at a terminal: a log file or a journal gets plain text.
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_thread_names(true)
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_thread_names(true)
            .with_current_span(true)
            .with_span_list(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    meshd::control::live::set_log_reloader(Box::new(move |text| {
        let filter = EnvFilter::try_new(text).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }));
}

/// Makes any panic, on any thread, take the whole process down.
///
/// meshd's threads (shards, control, api) only work together: each feeds the others through
/// rings. A thread that unwinds and ends leaves the rest running against rings nobody drains,
/// a half-alive node that keeps its ports and answers health checks while it drops traffic,
/// and that no supervisor restarts. Aborting ends it visibly instead (systemd or the harness
/// sees the death and can start the node again, which recovers its state from the control
/// database). The cost: a panic inside a tokio task (one gRPC call) ends the node too, which
/// is why bad input must be refused with an error, never met with a panic.
fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("<unnamed>");
        let location = info
            .location()
            .map_or_else(|| "<unknown>".to_owned(), ToString::to_string);
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("<non-string panic payload>");
        tracing::error!(thread, %location, message, "a thread panicked; aborting meshd");
        // The standard report as well (with a backtrace under RUST_BACKTRACE), for when
        // logging is not set up yet or filtered.
        default_hook(info);
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, log_format } => match Config::load(config.as_deref()) {
            Ok((config, resolved)) => {
                init_logging(&config.log.level, log_format.unwrap_or(config.log.format));
                meshd::node::run(config, resolved)
            }
            Err(e) => Err(e.into()),
        },
        Command::Init {
            data_dir,
            node_id,
            mesh_secret_file,
        } => {
            init_logging("info", LogFormat::Text);
            if let Some(path) = mesh_secret_file
                && let Err(e) = write_new_secret(&path)
            {
                eprintln!("meshd: {e:#}");
                return ExitCode::FAILURE;
            }
            ControlDb::open(&data_dir)
                .and_then(|db| db.load_or_create_identity(node_id.unwrap_or(0)))
                .map(|(identity, created)| {
                    let verb = if created { "created" } else { "already holds" };
                    println!("{} {verb} node {}", data_dir.display(), identity.node_id);
                })
                .map_err(Into::into)
        }
        Command::Mesh { grpc, action } => meshd::cli::run(&grpc, action),
        Command::CheckConfig { config } => Config::load(config.as_deref())
            .map(|(config, resolved)| {
                println!(
                    "config is valid: node_id={} shards={} listen={:?} peers={:?} grpc={}",
                    config.node_id,
                    resolved.n_shards,
                    resolved.listen,
                    resolved.peers,
                    resolved.grpc_listen
                );
            })
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
