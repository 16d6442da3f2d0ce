//! `nydus-image unpack`: write an image's filesystem back out as a tar archive.

use crate::image_args::{BlobArgs, BootstrapArg};
use anyhow::{Context as _, Result};
use clap::Args;
use std::path::PathBuf;

/// Flags of `nydus-image unpack`.
#[derive(Debug, Args)]
pub struct UnpackArgs {
    #[command(flatten)]
    bootstrap: BootstrapArg,

    #[command(flatten)]
    blobs: BlobArgs,

    /// The tar file to write.
    #[arg(long, value_name = "TAR")]
    output: PathBuf,
}

pub fn run(args: UnpackArgs) -> Result<()> {
    let boot = args.bootstrap.path()?;
    let report = converter::unpack::unpack(&boot, &args.blobs.locator(), &args.output)
        .with_context(|| format!("Unpacking {}", boot.display()))?;
    println!(
        "Wrote {}: {} entries, {} bytes of file data{}",
        args.output.display(),
        report.entries,
        report.bytes,
        if report.skipped_sockets > 0 {
            format!(
                ", {} sockets skipped (tar cannot hold them)",
                report.skipped_sockets
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
