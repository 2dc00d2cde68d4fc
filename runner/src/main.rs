//! `idem`: move messages from a log into sinks, each exactly once.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use idem::generate::{generate, GenerateOptions};
use idem::produce::{produce, ProduceOptions};
use idem::{app, commands, registry};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Mapping allocates a few small strings per message; with mimalloc a
/// 1M-event load spends about a tenth less CPU than with glibc's malloc.
/// Built without transparent huge pages (`no_thp`): a huge page counts
/// whole in the resident set however little of it is used.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 3 keeps memory freed for a second (its `purge_delay`) before
/// it hands it back to the system. A committed batch is freed and the next
/// one allocated well within that, so both counted in the resident set:
/// the 1M-event load into S3 Parquet peaked at 236 MiB with the second,
/// 167 MiB with 100 ms and 142 MiB with 0 (which cost 0.5 s more system
/// time). `MIMALLOC_PURGE_DELAY` in the environment still decides.
const PURGE_DELAY_MS: std::ffi::c_long = 100;
/// `mi_option_purge_delay` in mimalloc 3's option enum, which
/// libmimalloc-sys does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// That option's default in mimalloc 3: any other value means the enum
/// moved, and the option is left alone.
const MI_PURGE_DELAY_DEFAULT: std::ffi::c_long = 1000;

#[allow(unsafe_code)]
fn purge_freed_memory_sooner() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reads and sets one integer option of the allocator this
    // binary links; mimalloc's options may be read and set at any time
    // from any thread, and take no pointers.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_PURGE_DELAY_DEFAULT {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "idem",
    version,
    about = "Move messages from a log into databases, object stores and warehouses, each exactly once.",
    long_about = "Idem runs connectors described in one TOML file. Each connector reads a source \
        (files or Kafka topics) and writes a sink, committing every batch's effects together \
        with the source position, so a crash, a restart or a retry never loses or duplicates a \
        message.\n\nStart with:
  idem generate -n 10000 -o quickstart/events.jsonl
  idem run config/examples/quickstart.toml",
    after_help = "Exit codes: 0 done (or stopped cleanly by SIGTERM/SIGINT), 1 a connector failed, 2 invalid config or arguments.\nLogs go to stderr; RUST_LOG=debug shows every commit."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every connector in CONFIG until its sources end (batch mode) or SIGTERM.
    Run {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Validate CONFIG, open each sink, and print each connector's guarantee and why.
    Check {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Show each connector's state, committed positions, source end and lag:
    /// from the admin API of the idem running CONFIG if one answers, else as
    /// the sinks store them. Exits 1 when a running connector is not ready.
    Status {
        /// The TOML config file.
        config: Option<PathBuf>,
        /// A running idem's admin API (default: the config's runner.admin.listen).
        #[arg(long)]
        url: Option<String>,
    },
    /// Audit each connector's sink against its source, up to the committed
    /// positions: every message exactly once, no row without a message.
    /// Exits 1 on any finding.
    Verify {
        /// The TOML config file.
        config: PathBuf,
        /// Only this connector.
        #[arg(long)]
        connector: Option<String>,
        /// Compare each change data capture connector's target table with
        /// the PostgreSQL table it replicates, row for row, in the database
        /// at this URL (`postgres://user:password@host:port/db`).
        #[arg(long, value_name = "URL")]
        against: Option<String>,
    },
    /// Write sample events (NDJSON, ~200 bytes each) for trying Idem out.
    Generate {
        #[command(flatten)]
        events: EventArgs,
        /// Output file (`-` for stdout).
        #[arg(short, long, default_value = "-")]
        out: PathBuf,
    },
    /// Write the same generated events to a Kafka topic (idempotent
    /// producer, keyed by event id).
    Produce {
        /// The topic.
        topic: String,
        /// Bootstrap brokers.
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Create the topic with this many partitions if it does not exist.
        #[arg(long)]
        partitions: Option<i32>,
        /// How each event's value is encoded: `json`, or `avro` (one Avro
        /// value in the binary encoding, written with `--schema-file`).
        #[arg(long, default_value = "json", value_parser = ["json", "avro"])]
        format: String,
        /// `--format avro`: the writer's schema (`.avsc`); each event's
        /// fields are written by name, logical types from their text.
        #[arg(long, required_if_eq("format", "avro"))]
        schema_file: Option<PathBuf>,
        #[command(flatten)]
        events: EventArgs,
    },
}

/// The generated events, for `generate` and `produce`.
#[derive(clap::Args)]
struct EventArgs {
    /// Number of events.
    #[arg(short = 'n', long, default_value_t = 1000)]
    count: u64,
    /// Fraction of events that repeat an earlier event id (a producer
    /// retry), at a later position.
    #[arg(long, default_value_t = 0.05)]
    duplicates: f64,
    /// Malformed messages to mix in, for the dead letters.
    #[arg(long, default_value_t = 5)]
    malformed: u64,
    /// Random seed: the same seed writes the same events.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Event ids of 20 random hex digits instead of sequential ones.
    #[arg(long)]
    random_ids: bool,
    /// Event times at random over this many days (late and backfilled
    /// events, as a day-partitioned lake receives them); 0: one second
    /// apart, in order.
    #[arg(long, default_value_t = 0)]
    spread_days: u32,
}

impl From<&EventArgs> for GenerateOptions {
    fn from(a: &EventArgs) -> Self {
        GenerateOptions {
            count: a.count,
            duplicates: a.duplicates,
            malformed: a.malformed,
            seed: a.seed,
            random_ids: a.random_ids,
            spread_days: a.spread_days,
        }
    }
}

/// `RUST_LOG` wins over the config's `[runner] log`.
fn init_logs(format: LogFormat, configured: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let wanted = configured.unwrap_or("info");
        // The AWS SDK logs each provider it tried for a region or
        // credentials (instance metadata, profiles) as a page-long warning;
        // the S3 sink names a missing credential itself.
        let quiet = match wanted.contains("aws_config") {
            true => wanted.to_string(),
            false => format!("{wanted},aws_config=error"),
        };
        tracing_subscriber::EnvFilter::try_new(&quiet).unwrap_or_else(|e| {
            idem::say_err!(
                "idem: runner.log = {wanted:?} is not a log filter ({e}); using \"info\""
            );
            tracing_subscriber::EnvFilter::new("info")
        })
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(idem::output::RedactedStderr);
    match format {
        LogFormat::Human => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> Result<registry::Config, ExitCode> {
    registry::load(path).map_err(|e| {
        idem::say_err!("idem: invalid config: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    purge_freed_memory_sooner();
    // Files Idem creates (DuckDB databases and their WAL, the embedded
    // dedup store, dead letters) hold raw payloads: owner only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    // Commands that read a config log at its `[runner] log` levels.
    let config = match &cli.command {
        Command::Run { config } | Command::Check { config } | Command::Verify { config, .. } => {
            match load(config).and_then(|c| {
                idem::preflight::check(config, &c).map_err(|e| {
                    idem::say_err!("idem: invalid config: {e}");
                    ExitCode::from(2)
                })?;
                Ok(c)
            }) {
                Ok(c) => Some(c),
                Err(code) => return code,
            }
        }
        Command::Status {
            config: Some(config),
            ..
        } => match load(config) {
            Ok(c) => Some(c),
            Err(code) => return code,
        },
        _ => None,
    };
    init_logs(
        cli.log_format,
        config.as_ref().map(|c| c.runner.log.as_str()),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            idem::say_err!("idem: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result: anyhow::Result<i32> = match cli.command {
        Command::Run { config: path } => match config {
            Some(c) => runtime.block_on(app::run(c, &path)),
            None => return ExitCode::from(2),
        },
        Command::Check { .. } => match config {
            Some(c) => runtime.block_on(commands::check(c)),
            None => return ExitCode::from(2),
        },
        Command::Status { url, .. } => runtime.block_on(commands::status(config, url)),
        Command::Verify {
            connector, against, ..
        } => match config {
            Some(c) => runtime.block_on(idem::verify::verify(c, connector, against)),
            None => return ExitCode::from(2),
        },
        Command::Produce {
            topic,
            brokers,
            partitions,
            format,
            schema_file,
            events,
        } => {
            let malformed = events.malformed;
            let avro = match schema_file.filter(|_| format == "avro") {
                None => None,
                Some(path) => match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|text| idem_core::mapping::avro::AvroSchema::parse(&text))
                {
                    Ok(schema) => Some(schema),
                    Err(e) => {
                        idem::say_err!("idem: --schema-file {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                },
            };
            let opts = ProduceOptions {
                brokers,
                topic,
                partitions,
                avro,
                events: GenerateOptions::from(&events),
            };
            runtime
                .block_on(produce(&opts))
                .with_context(|| format!("produce to {}", opts.topic))
                .map(|(sent, distinct, elapsed)| {
                    idem::say_err!(
                        "idem: wrote {sent} messages to {} in {:.1}s ({distinct} distinct event ids, {malformed} malformed, {:.0} msg/s)",
                        opts.topic,
                        elapsed.as_secs_f64(),
                        sent as f64 / elapsed.as_secs_f64().max(1e-9)
                    );
                    0
                })
        }
        Command::Generate { events, out } => {
            let malformed = events.malformed;
            let opts = GenerateOptions::from(&events);
            let written = if out.as_os_str() == "-" {
                generate(&mut std::io::stdout().lock(), &opts)
            } else {
                match out.parent().filter(|d| !d.as_os_str().is_empty()) {
                    Some(dir) => std::fs::create_dir_all(dir),
                    None => Ok(()),
                }
                .and_then(|()| std::fs::File::create(&out))
                .and_then(|mut f| generate(&mut f, &opts))
            };
            written
                .with_context(|| format!("write {}", out.display()))
                .map(|(lines, distinct)| {
                    if out.as_os_str() != "-" {
                        idem::say_err!(
                            "idem: wrote {lines} lines to {} ({distinct} distinct event ids, {malformed} malformed)",
                            out.display()
                        );
                    }
                    0
                })
        }
    };
    // Shutting the runtime down drops every task, and with them the Kafka
    // clients: librdkafka's threads must be gone before the process exits,
    // or exit's cleanup (OpenSSL's among it) races a broker thread still
    // mid-handshake. A blocking sink call abandoned after the grace period
    // is not waited for beyond this.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            idem::say_err!("idem: {e:#}");
            ExitCode::from(1)
        }
    }
}
