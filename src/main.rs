//! The `pgpar` binary: argument parsing, logging, and turning errors into one line and an
//! exit code. All the work is in the library.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pgpar::conninfo::{ConnArgs, ConnConfig, ProcessEnv};

#[derive(Parser)]
#[command(
    name = "pgpar",
    version,
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
    Backup(Box<pgpar::backup::BackupArgs>),
}

/// Connection options, as pg_basebackup names them.
#[derive(Args, Clone, Debug)]
pub struct Conn {
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
        Err(e) => {
            eprintln!("pgpar: error: {e}");
            if let Some(h) = e.hint() {
                eprintln!("pgpar: hint: {h}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn run(cmd: Cmd) -> pgpar::Result<()> {
    match cmd {
        Cmd::Check { conn, json } => {
            let cfg = resolve(&conn)?;
            let report = pgpar::check::run(&cfg).await?;
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
            let conn = Conn {
                dbname: args.dbname.clone(),
                host: args.host.clone(),
                port: args.port.clone(),
                username: args.username.clone(),
                no_password: args.no_password,
                help: None,
            };
            let cfg = resolve(&conn)?;
            pgpar::backup::run(&cfg, &args).await
        }
    }
}
