//! `nydus-image inspect -R REQUEST`: one-shot questions about a bootstrap.

use crate::image_args::BootstrapArg;
use anyhow::{Context as _, Result};
use clap::Args;

/// Flags of `nydus-image inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    bootstrap: BootstrapArg,

    /// What to show: stats, blobs, prefetch, "stat PATH" or "ls DIR". Output is JSON.
    #[arg(short = 'R', long, value_name = "REQUEST")]
    request: String,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let boot = args.bootstrap.path()?;
    let bs = rafs::read::Bootstrap::open(&boot)
        .with_context(|| format!("Opening {}", boot.display()))?;
    let answer = converter::inspect::inspect(&bs, &args.request)?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}
