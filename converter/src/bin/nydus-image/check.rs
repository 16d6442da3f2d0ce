//! `nydus-image check`: validate a bootstrap, and with its blobs every chunk digest.

use crate::image_args::{BlobArgs, BootstrapArg};
use anyhow::{Context as _, Result};
use clap::Args;
use std::path::PathBuf;

/// Flags of `nydus-image check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    bootstrap: BootstrapArg,

    #[command(flatten)]
    blobs: BlobArgs,

    /// Print every path in the image.
    #[arg(short = 'v', long)]
    verbose: bool,

    /// Also write the result as JSON to this file.
    #[arg(short = 'J', long, value_name = "FILE")]
    output_json: Option<PathBuf>,
}

pub fn run(args: CheckArgs) -> Result<()> {
    let boot = args.bootstrap.path()?;
    let report = converter::check::check(&boot, &args.blobs.locator(), args.verbose)
        .with_context(|| format!("Checking {}", boot.display()))?;
    for p in &report.paths {
        println!("{p}");
    }
    println!(
        "RAFS v6 bootstrap {} is valid: {} inodes, {} entries, {} regular files ({} bytes), {} blob(s)",
        boot.display(),
        report.inodes,
        report.entries,
        report.files,
        report.file_bytes,
        report.blobs.len()
    );
    for b in &report.blobs {
        if args.blobs.locator().is_set() {
            println!(
                "  blob {}: {} chunks, {} verified ({} bytes)",
                b.id, b.chunks, b.verified_chunks, b.verified_bytes
            );
        } else {
            println!(
                "  blob {}: {} chunks (not read: pass -D to verify data)",
                b.id, b.chunks
            );
        }
    }
    if let Some(path) = args.output_json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(&path, json).with_context(|| format!("Writing {}", path.display()))?;
    }
    Ok(())
}
