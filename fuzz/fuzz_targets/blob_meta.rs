//! Blob tails (TOC, tar sections, ci arrays) parsed from arbitrary bytes never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rafs::read;
use rafs::{BlobInfo, Compressor, Digester};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let n = u32::from_le_bytes(data[..4].try_into().unwrap()) % 64;
    let csize = u32::from_le_bytes(data[4..8].try_into().unwrap()) as u64 % 4096;
    let body = data[8..].to_vec();
    let info = BlobInfo {
        id: "0".repeat(64),
        chunk_count: n,
        chunk_size: 0x100000,
        compressor: Compressor::Zstd,
        digester: Digester::Blake3,
        features: 0x7000_0021,
        compressed_size: body.len() as u64,
        uncompressed_size: 1 << 30,
        toc_size: 0,
        toc_digest: [0; 32],
        ci_compressor: if csize < n as u64 * 16 { Compressor::Zstd } else { Compressor::None },
        ci_offset: 0,
        ci_compressed_size: csize,
        ci_uncompressed_size: n as u64 * 16,
        meta_digest: [0; 32],
        meta_size: 0,
        mapped_blkaddr: 0,
    };
    let _ = read::parse_ci_array(&body, &info, 0);
    let _ = read::read_toc(&body, &info);
    let _ = read::tar_sections(&body);
    let _ = read::read_inline_bootstrap(&body);
});
