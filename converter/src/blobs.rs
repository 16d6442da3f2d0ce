//! Finding the data blobs a bootstrap refers to: a directory of blobs named by id
//! (`-D/--blob-dir`) or one blob file (`--blob`).

use crate::error::{Error, Result};
use rafs::BlobInfo;
use std::fs::File;
use std::path::PathBuf;

/// Where blob files are.
#[derive(Clone, Debug, Default)]
pub struct BlobLocator {
    /// Directory holding blobs named by their id.
    pub dir: Option<PathBuf>,
    /// A single blob file, used for every blob whose id is not found in `dir`.
    pub file: Option<PathBuf>,
}

impl BlobLocator {
    /// Whether any blob location was given.
    pub fn is_set(&self) -> bool {
        self.dir.is_some() || self.file.is_some()
    }

    /// Opens the blob file of `info`.
    pub fn open(&self, info: &BlobInfo) -> Result<File> {
        if let Some(dir) = &self.dir {
            let path = dir.join(&info.id);
            if path.exists() || self.file.is_none() {
                return File::open(&path).map_err(|e| Error::source(path, e));
            }
        }
        match &self.file {
            Some(path) => File::open(path).map_err(|e| Error::source(path.clone(), e)),
            None => Err(Error::options(format!(
                "blob {} is needed but no blob directory (-D) or blob file (--blob) was given",
                info.id
            ))),
        }
    }
}
