//! `localfs`: blobs are files named by their id in one directory (upstream's `dir`), or a
//! single file (`blob_file`) used for every id.

use crate::{BackendError, BlobBackend, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A directory of blobs, with open files cached.
pub struct LocalFs {
    dir: Option<PathBuf>,
    blob_file: Option<PathBuf>,
    open: Mutex<HashMap<String, Arc<File>>>,
}

impl LocalFs {
    /// Blobs in `dir`, named by id.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalFs {
            dir: Some(dir.into()),
            blob_file: None,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// One blob file answering for every id.
    pub fn single_file(path: impl Into<PathBuf>) -> Self {
        LocalFs {
            dir: None,
            blob_file: Some(path.into()),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, blob_id: &str) -> Result<PathBuf> {
        if let Some(f) = &self.blob_file {
            return Ok(f.clone());
        }
        let valid = !blob_id.is_empty()
            && blob_id != "."
            && blob_id != ".."
            && !blob_id.contains('/')
            && !blob_id.contains('\0');
        if !valid {
            return Err(BackendError::NotFound(blob_id.to_string()));
        }
        Ok(self.dir.as_deref().unwrap_or(Path::new(".")).join(blob_id))
    }

    fn file(&self, blob_id: &str) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(blob_id) {
            return Ok(f.clone());
        }
        let path = self.path(blob_id)?;
        let f = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BackendError::NotFound(blob_id.to_string()),
            _ => BackendError::Io {
                what: format!("Opening blob {}", path.display()),
                source: e,
            },
        })?;
        let f = Arc::new(f);
        open.insert(blob_id.to_string(), f.clone());
        Ok(f)
    }
}

impl BlobBackend for LocalFs {
    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file(blob_id)?;
        f.read_exact_at(buf, offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => BackendError::OutOfRange {
                blob_id: blob_id.to_string(),
                offset,
                len: buf.len() as u64,
                size: f.metadata().map(|m| m.len()).unwrap_or(0),
            },
            _ => BackendError::Io {
                what: format!("Reading blob {blob_id} at {offset}"),
                source: e,
            },
        })
    }

    fn blob_size(&self, blob_id: &str) -> Result<u64> {
        let f = self.file(blob_id)?;
        f.metadata().map(|m| m.len()).map_err(|e| BackendError::Io {
            what: format!("Reading size of blob {blob_id}"),
            source: e,
        })
    }

    fn kind(&self) -> &'static str {
        "localfs"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ranges_and_rejects_bad_ids_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("abc"), b"0123456789").unwrap();
        let b = LocalFs::new(dir.path());
        let mut buf = [0u8; 4];
        b.read_at("abc", 3, &mut buf).unwrap();
        assert_eq!(&buf, b"3456");
        assert_eq!(b.blob_size("abc").unwrap(), 10);
        assert!(matches!(
            b.read_at("abc", 8, &mut buf),
            Err(BackendError::OutOfRange { .. })
        ));
        assert!(matches!(
            b.read_at("missing", 0, &mut buf),
            Err(BackendError::NotFound(_))
        ));
        assert!(matches!(
            b.read_at("../abc", 0, &mut buf),
            Err(BackendError::NotFound(_))
        ));
    }
}
