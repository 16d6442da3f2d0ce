//! `nydus-image`: build RAFS v6 (nydus) filesystem images.
//!
//! Each subcommand lives in its own module with a clap `Args` struct and a `run`
//! function; the work is done by the `converter` library.

#![forbid(unsafe_code)]

mod check;
mod create;
mod image_args;
mod inspect;
mod merge;
mod unpack;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Build RAFS v6 filesystem images (nydus accelerated container images) from
/// directories and OCI layer tars.
#[derive(Debug, Parser)]
#[command(name = "nydus-image", version, propagate_version = true)]
struct Cli {
    /// How much to log on stderr.
    #[arg(
        short = 'l',
        long,
        global = true,
        value_enum,
        default_value_t = LogLevel::Info
    )]
    log_level: LogLevel,

    /// Write the log to this file instead of stderr.
    #[arg(short = 'L', long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build one RAFS layer (data blob + bootstrap) from a directory or a tar file.
    #[command(after_help = create::EXAMPLES)]
    Create(create::CreateArgs),
    /// Stack per-layer bootstraps (lowest first) into one, applying OCI whiteouts.
    #[command(after_help = merge::EXAMPLES)]
    Merge(merge::MergeArgs),
    /// Validate a bootstrap; with -D/--blob also read and verify every chunk of its blobs.
    Check(check::CheckArgs),
    /// Answer one question about a bootstrap (stats, blobs, prefetch, stat PATH, ls DIR).
    Inspect(inspect::InspectArgs),
    /// Write the filesystem of a bootstrap and its blobs out as a tar archive.
    Unpack(unpack::UnpackArgs),
}

/// Log verbosity.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl From<LogLevel> for tracing::Level {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Trace => tracing::Level::TRACE,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Error => tracing::Level::ERROR,
        }
    }
}

fn init_logging(level: LogLevel, file: Option<&PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::from(level))
        .with_target(false);
    match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("Opening log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init();
        }
        None => {
            use std::io::IsTerminal as _;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init()
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_level, cli.log_file.as_ref())?;
    match cli.command {
        Command::Create(args) => create::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Check(args) => check::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Unpack(args) => unpack::run(args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            // As upstream: 2 means the layers do not form a consistent filesystem.
            match e.downcast_ref::<converter::Error>() {
                Some(converter::Error::Inconsistent(_)) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
