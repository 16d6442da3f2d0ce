//! `nydus-image merge`: stack per-layer bootstraps into one bootstrap with OCI whiteouts.

use anyhow::{bail, Context as _, Result};
use clap::Args;
use converter::merge::MergeOptions;
use std::path::PathBuf;

pub const EXAMPLES: &str = "\
Examples:
  # Merge three layer blobs built with --blob-inline-meta (lowest first); blob ids are
  # the OCI layer digests, as nydusify passes them:
  nydus-image merge -B image.boot --blob-digests d1,d2,d3 l1.blob l2.blob l3.blob

  # Also fill the prefetch table (patterns on stdin, one absolute path per line):
  echo /usr/bin | nydus-image merge --prefetch-policy fs -B image.boot l1.boot l2.boot";

/// Flags of `nydus-image merge`, named as in upstream nydus.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Layer bootstraps, or data blobs with an inline bootstrap, lowest layer first.
    #[arg(value_name = "SOURCE", required = true)]
    sources: Vec<PathBuf>,

    /// Write the merged bootstrap to this file.
    #[arg(short = 'B', long, value_name = "FILE")]
    bootstrap: PathBuf,

    /// Blob ids of the layers' blobs, one per SOURCE, comma separated: the OCI layer
    /// digests (with or without `sha256:`).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    blob_digests: Vec<String>,

    /// Sizes in bytes of the layers' blobs, one per SOURCE, comma separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    blob_sizes: Vec<u64>,

    /// sha256 of each layer blob's TOC, one per SOURCE, comma separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    blob_toc_digests: Vec<String>,

    /// Size of each layer blob's TOC (with its tar header), one per SOURCE.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    blob_toc_sizes: Vec<u64>,

    /// fs: read prefetch patterns from stdin (one absolute path per line) into the
    /// bootstrap's prefetch table. none: no prefetch table.
    #[arg(long, value_name = "POLICY", default_value = "none")]
    prefetch_policy: String,

    /// Also write the result (bootstrap path, blob ids) as JSON to this file.
    #[arg(short = 'J', long, value_name = "FILE")]
    output_json: Option<PathBuf>,
}

/// Runs `nydus-image merge`.
pub fn run(args: MergeArgs) -> Result<()> {
    let prefetch = match args.prefetch_policy.as_str() {
        "fs" => converter::prefetch::read_patterns(std::io::stdin().lock())
            .context("Reading prefetch patterns from stdin")?,
        "none" => Vec::new(),
        other => bail!("unknown prefetch policy '{other}' (use fs or none)"),
    };
    let opts = MergeOptions {
        sources: args.sources,
        bootstrap: args.bootstrap,
        blob_digests: args.blob_digests,
        blob_sizes: args.blob_sizes,
        blob_toc_digests: args.blob_toc_digests,
        blob_toc_sizes: args.blob_toc_sizes,
        prefetch,
    };
    let out = converter::merge::merge(&opts)?;
    tracing::info!(
        "merged {} layers into {} ({} bytes, {} blobs)",
        opts.sources.len(),
        out.bootstrap.display(),
        out.bootstrap_size,
        out.blobs.len()
    );
    if let Some(path) = args.output_json {
        let json = serde_json::to_vec_pretty(&out)?;
        std::fs::write(&path, json).with_context(|| format!("Writing {}", path.display()))?;
    }
    Ok(())
}
