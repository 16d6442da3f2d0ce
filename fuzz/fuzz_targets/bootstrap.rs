//! Any bytes given to the bootstrap reader either fail to open or can be walked, read and
//! mapped without panicking or looping.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rafs::read::Bootstrap;

fuzz_target!(|data: &[u8]| {
    let Ok(bs) = Bootstrap::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = bs.prefetch_table();
    let mut budget = 10_000u32;
    let _ = bs.walk(|_, _, inode| {
        budget = budget.checked_sub(1).ok_or_else(|| rafs::Error::Tree("budget".into()))?;
        let _ = bs.xattrs(inode);
        if inode.is_symlink() {
            let _ = bs.readlink(inode);
        }
        if inode.is_reg() {
            if let Ok(slices) = bs.map_range(inode, 0, inode.size.min(64 << 20)) {
                for s in slices.iter().take(64) {
                    let _ = bs.chunk_info(&s.chunk);
                }
            }
        }
        Ok(())
    });
    let _ = bs.lookup_path("/a/b");
});
