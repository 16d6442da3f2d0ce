//! Flags shared by the subcommands that read an existing image.

use anyhow::{bail, Result};
use clap::Args;
use converter::BlobLocator;
use std::path::PathBuf;

/// Which bootstrap to read: positional (upstream's current form) or `-B` (deprecated form).
#[derive(Debug, Args)]
pub struct BootstrapArg {
    /// The bootstrap file to read.
    #[arg(value_name = "BOOTSTRAP")]
    bootstrap: Option<PathBuf>,

    /// The bootstrap file to read (older form of the positional argument).
    #[arg(
        short = 'B',
        long = "bootstrap",
        value_name = "FILE",
        conflicts_with = "bootstrap"
    )]
    bootstrap_flag: Option<PathBuf>,
}

impl BootstrapArg {
    /// The bootstrap path, from either form.
    pub fn path(&self) -> Result<PathBuf> {
        match (&self.bootstrap, &self.bootstrap_flag) {
            (Some(p), _) | (None, Some(p)) => Ok(p.clone()),
            (None, None) => bail!("no bootstrap given: pass BOOTSTRAP or -B FILE"),
        }
    }
}

/// Where the data blobs are.
#[derive(Debug, Args)]
pub struct BlobArgs {
    /// Directory holding the data blobs, each named by its blob id.
    #[arg(short = 'D', long, value_name = "DIR")]
    blob_dir: Option<PathBuf>,

    /// A single data blob file (for images with one blob, or blobs not found in -D).
    #[arg(short = 'b', long, value_name = "FILE")]
    blob: Option<PathBuf>,
}

impl BlobArgs {
    /// As a locator.
    pub fn locator(&self) -> BlobLocator {
        BlobLocator {
            dir: self.blob_dir.clone(),
            file: self.blob.clone(),
        }
    }
}
