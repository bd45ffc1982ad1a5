//! The `pgpar` binary: flags (clap), logging, signals, printing (reports, the summary,
//! errors as one line and a hint) and exit codes. All the work is in the library, which gets
//! validated options and a reporter and never prints.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pgpar::conninfo::{ConnArgs, ConnConfig, ProcessEnv};
use pgpar::manifest::ChecksumKind;
use pgpar::options::{BackupRequest, Checkpoint, MethodChoice};
use pgpar::progress::{ProgressMode, Snapshot};
use pgpar::session::{Reporter, Summary};

#[derive(Parser)]
#[command(
    name = "pgpar",
    version,
    // `pgpar backup --version` answers as `pg_basebackup --version` does: one line, exit 0.
    propagate_version = true,
    about = "PostgreSQL base backups over many replication connections at once"
)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect and report what a backup of this server needs to know.
    #[command(disable_help_flag = true)]
    Check {
        #[command(flatten)]
        conn: Conn,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take a base backup into a directory (plain format).
    #[command(disable_help_flag = true)]
    Backup(Box<BackupArgs>),
}

/// `-c`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum CheckpointArg {
    /// Checkpoint as fast as possible.
    Fast,
    /// Spread the checkpoint over checkpoint_completion_target (the server's default).
    Spread,
}

/// `--method`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum MethodArg {
    /// Parallel when the server offers it, else sql when the role may, else stream.
    Auto,
    /// BASE_BACKUP over one connection (any PostgreSQL 15 or later).
    Stream,
    /// START_BACKUP / SEND_FILES_CONTENT over --jobs connections (patched servers).
    Parallel,
    /// pg_backup_start / pg_read_binary_file over --jobs SQL sessions (PostgreSQL 15 or
    /// later; `pgpar check` lists the privileges it needs).
    Sql,
}

/// `-P`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProgressArg {
    /// A progress bar on a terminal.
    Bar,
    /// One JSON object per line on stderr, for scripts.
    Json,
}

/// `--manifest-checksums`.
#[derive(Debug, Clone, Copy, ValueEnum)]
#[value(rename_all = "UPPER")]
enum ChecksumArg {
    /// No checksum.
    None,
    /// CRC-32C (the default).
    Crc32c,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

/// Options of `pgpar backup`, named as pg_basebackup names them.
#[derive(Args, Debug, Clone)]
struct BackupArgs {
    #[command(flatten)]
    conn: Conn,
    /// Directory to write the backup to (created if missing; must be empty).
    #[arg(short = 'D', long = "pgdata", value_name = "DIR")]
    pgdata: PathBuf,
    /// Backup label.
    #[arg(short = 'l', long, default_value = "pgpar base backup")]
    label: String,
    /// Checkpoint mode.
    // pg_basebackup compares -c and --manifest-checksums with pg_strcasecmp.
    #[arg(
        short = 'c',
        long,
        value_enum,
        ignore_case = true,
        default_value = "spread"
    )]
    checkpoint: CheckpointArg,
    /// Do not wait for the backup to be written safely to disk.
    #[arg(short = 'N', long)]
    no_sync: bool,
    /// Do not verify data checksums.
    #[arg(long)]
    no_verify_checksums: bool,
    /// Show progress on stderr: a bar (-P), or JSON lines (--progress=json).
    #[arg(short = 'P', long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "bar")]
    progress: Option<ProgressArg>,
    /// Checksum algorithm for files in the manifest.
    #[arg(long, value_enum, ignore_case = true, default_value = "CRC32C")]
    manifest_checksums: ChecksumArg,
    /// Relocate the tablespace in OLDDIR to NEWDIR (repeatable).
    #[arg(short = 'T', long = "tablespace-mapping", value_name = "OLDDIR=NEWDIR")]
    tablespace_mapping: Vec<String>,
    /// Keep what was written when the backup fails (never with a manifest).
    #[arg(short = 'n', long)]
    no_clean: bool,
    /// Print a JSON summary on stdout when done.
    #[arg(long)]
    json: bool,
    /// Backup method.
    #[arg(long, value_enum, default_value = "auto")]
    method: MethodArg,
    /// Worker connections for the parallel and sql methods [default: 4, fewer when the
    /// server's free walsenders do not allow 4].
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    /// Files larger than this are split into ranges spread over the workers (parallel and sql methods).
    #[arg(long, default_value = "64MB", value_name = "SIZE")]
    chunk_size: String,
    /// Write standby.signal and primary_conninfo so the backup starts as a standby.
    #[arg(short = 'R', long)]
    write_recovery_conf: bool,
    /// Replication slot for the WAL stream (and primary_slot_name with -R).
    #[arg(short = 'S', long)]
    slot: Option<String>,
    /// Create the slot named by -S first.
    #[arg(short = 'C', long)]
    create_slot: bool,
    /// Maximum total transfer rate, kB/s (suffix k or M), across all connections.
    #[arg(short = 'r', long, value_name = "RATE")]
    max_rate: Option<String>,
    /// A connection that delivers nothing for this many seconds is taken for stalled: a
    /// worker's ranges are fetched again elsewhere, anything else (the leader's file list
    /// and pg_control, the stream method's connection, the WAL stream) ends the backup. The
    /// wait for the start checkpoint is not bounded (a spread checkpoint is rightly silent
    /// for minutes): there TCP keepalives find a peer that is gone, and the WAL stream's
    /// detector a server that stopped answering.
    #[arg(long, value_name = "SECONDS", default_value_t = pgpar::options::DEFAULT_STALL_TIMEOUT)]
    stall_timeout: u64,
    /// Do not compare the size of the backup with the free space of the target first.
    #[arg(long)]
    no_space_check: bool,
}

impl BackupArgs {
    fn request(&self) -> BackupRequest {
        BackupRequest {
            pgdata: self.pgdata.clone(),
            label: self.label.clone(),
            checkpoint: match self.checkpoint {
                CheckpointArg::Fast => Checkpoint::Fast,
                CheckpointArg::Spread => Checkpoint::Spread,
            },
            no_sync: self.no_sync,
            no_verify_checksums: self.no_verify_checksums,
            progress: self.progress.map(|p| match p {
                ProgressArg::Bar => ProgressMode::Bar,
                ProgressArg::Json => ProgressMode::Json,
            }),
            manifest_checksums: match self.manifest_checksums {
                ChecksumArg::None => ChecksumKind::None,
                ChecksumArg::Crc32c => ChecksumKind::Crc32c,
                ChecksumArg::Sha224 => ChecksumKind::Sha224,
                ChecksumArg::Sha256 => ChecksumKind::Sha256,
                ChecksumArg::Sha384 => ChecksumKind::Sha384,
                ChecksumArg::Sha512 => ChecksumKind::Sha512,
            },
            tablespace_mapping: self.tablespace_mapping.clone(),
            no_clean: self.no_clean,
            method: match self.method {
                MethodArg::Auto => MethodChoice::Auto,
                MethodArg::Stream => MethodChoice::Stream,
                MethodArg::Parallel => MethodChoice::Parallel,
                MethodArg::Sql => MethodChoice::Sql,
            },
            jobs: self.jobs.unwrap_or(4),
            jobs_given: self.jobs.is_some(),
            stall_timeout: self.stall_timeout,
            no_space_check: self.no_space_check,
            chunk_size: self.chunk_size.clone(),
            write_recovery_conf: self.write_recovery_conf,
            slot: self.slot.clone(),
            create_slot: self.create_slot,
            max_rate: self.max_rate.clone(),
        }
    }
}

/// Connection options, as pg_basebackup names them: the same for every subcommand.
#[derive(Args, Clone, Debug)]
struct Conn {
    /// Connection string (keyword=value or postgresql:// URI).
    #[arg(short = 'd', long = "dbname")]
    dbname: Option<String>,
    /// Database server host or socket directory.
    #[arg(short = 'h', long)]
    host: Option<String>,
    /// Database server port.
    #[arg(short = 'p', long)]
    port: Option<String>,
    /// Connect as this role.
    #[arg(short = 'U', long)]
    username: Option<String>,
    /// Never prompt for a password (pgpar never prompts; accepted for compatibility).
    #[arg(short = 'w', long = "no-password")]
    no_password: bool,
    /// Print help (-h is the host, as in pg_basebackup).
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// Prints what the library reports, as every other line pgpar writes to stderr, and draws
/// its progress snapshots: a bar for `-P`, one JSON object per line for `--progress=json`.
#[derive(Default)]
struct Stderr {
    /// The bar of the transfer under way; made at its first snapshot, dropped at its last.
    bar: std::sync::Mutex<Option<ProgressBar>>,
}

impl Reporter for Stderr {
    fn notice(&self, msg: &str) {
        eprintln!("pgpar: notice: {msg}");
    }
    fn step(&self, msg: &str) {
        eprintln!("pgpar: {msg}");
    }
    fn warning(&self, msg: &str) {
        eprintln!("pgpar: warning: {msg}");
    }
    fn progress(&self, s: &Snapshot) {
        match s.mode {
            ProgressMode::Bar => self.draw_bar(s),
            ProgressMode::Json => eprintln!("{}", progress_json(s)),
        }
    }
}

impl Stderr {
    fn draw_bar(&self, s: &Snapshot) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        let pb = slot.get_or_insert_with(|| {
            let pb = ProgressBar::with_draw_target(
                Some(s.bytes_total.max(1)),
                ProgressDrawTarget::stderr(),
            );
            pb.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} ({percent}%) {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            pb
        });
        pb.set_length(s.bytes_total.max(1));
        pb.set_position(s.bytes_done);
        pb.set_message(format!("{} active", s.active_workers));
        if s.done {
            pb.finish();
            *slot = None;
        }
    }
}

/// One `--progress=json` line: bytes done of the total, percent, MB/s, ETA, active workers.
fn progress_json(s: &Snapshot) -> String {
    let (done, total, rate) = (s.bytes_done, s.bytes_total, s.bytes_per_sec);
    let eta = if rate > 0.0 {
        (total - done) as f64 / rate
    } else {
        0.0
    };
    serde_json::json!({
        "bytes_done": done,
        "bytes_total": total,
        "percent": if total > 0 { (done as f64 * 100.0 / total as f64 * 10.0).round() / 10.0 } else { 100.0 },
        "mb_per_s": (rate / 1_048_576.0 * 10.0).round() / 10.0,
        "eta_s": eta.round(),
        "active_workers": s.active_workers,
        "done": s.done,
    })
    .to_string()
}

/// Resolves when SIGINT or SIGTERM arrives (a scheduler's stop is as final as Ctrl-C), naming it.
async fn interrupted() -> String {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "interrupted by SIGINT".into(),
            _ = term.recv() => "interrupted by SIGTERM".into(),
        },
        // Without signal handling, the default action (exit) applies; never resolve.
        _ => std::future::pending().await,
    }
}

fn print_summary(args: &BackupArgs, summary: &Summary) {
    if args.json {
        println!(
            "{}",
            serde_json::to_string(summary).expect("summary serialises")
        );
    } else if args.progress.is_some() {
        eprintln!(
            "pgpar: backup complete: {} files, {:.1} MB in {:.1} s ({:.1} MB/s), {} method, WAL {}..{}",
            summary.files,
            summary.bytes as f64 / 1_048_576.0,
            summary.seconds,
            summary.mb_per_s,
            summary.method,
            summary.start_lsn,
            summary.stop_lsn
        );
    }
}

/// Log lines look like every other line pgpar writes to stderr: `pgpar: warning: …`.
struct LineFormat;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LineFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        let from_server = event.metadata().target() == "pgpar::server";
        write!(
            w,
            "pgpar: {level}: {}",
            if from_server { "server: " } else { "" }
        )?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

fn resolve(c: &Conn) -> pgpar::Result<ConnConfig> {
    ConnConfig::resolve(
        &ConnArgs {
            dbname: c.dbname.clone(),
            host: c.host.clone(),
            port: c.port.clone(),
            username: c.username.clone(),
        },
        &ProcessEnv,
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGPAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(LineFormat)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgpar: error: could not start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((e, code)) => {
            eprintln!("pgpar: error: {e}");
            if let Some(h) = e.hint() {
                eprintln!("pgpar: hint: {h}");
            }
            ExitCode::from(code as u8)
        }
    }
}

/// Runs a subcommand; on failure, the error and the exit code.
async fn run(cmd: Cmd) -> Result<(), (pgpar::Error, i32)> {
    let early = |e: pgpar::Error| {
        let code = e.exit_code();
        (e, code)
    };
    match cmd {
        Cmd::Check { conn, json } => {
            let cfg = resolve(&conn).map_err(early)?;
            let report = pgpar::check::run(&cfg).await.map_err(early)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serialises")
                );
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Cmd::Backup(args) => {
            let opts = args.request().validate().map_err(early)?;
            let cfg = resolve(&args.conn).map_err(early)?;
            let reporter = std::sync::Arc::new(Stderr::default());
            match pgpar::session::run(&cfg, &opts, reporter, interrupted()).await {
                Ok(summary) => {
                    print_summary(&args, &summary);
                    Ok(())
                }
                Err(f) => {
                    let code = f.exit_code();
                    Err((f.error, code))
                }
            }
        }
    }
}
