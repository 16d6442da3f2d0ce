//! Any bytes given to the layer tar reader either build a tree or fail with an error.
#![no_main]

use converter::source::tar::read_tar;
use converter::WhiteoutSpec;
use libfuzzer_sys::fuzz_target;
use rafs::write::{write_chunks, BlobOptions, ChunkArena};

fuzz_target!(|data: &[u8]| {
    let opts = BlobOptions { chunk_size: 0x1000, threads: 1, ..Default::default() };
    let mut arena = ChunkArena::default();
    let _ = write_chunks(Vec::new(), &opts, &mut arena, |sink| {
        read_tar(data, WhiteoutSpec::Oci, sink).map_err(|e| rafs::Error::Tree(e.to_string()))
    });
});
