//! Walks a bootstrap and reads every regular file through its blobs (verifying every
//! chunk), printing `sha256 size path`. Usage: verify BOOTSTRAP BLOB_DIR

use rafs::read::{self, Bootstrap};
use sha2::Digest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (boot, dir) = (
        args.next().ok_or("usage: verify BOOTSTRAP BLOB_DIR")?,
        args.next().ok_or("usage")?,
    );
    let bs = Bootstrap::open(&boot)?;
    let blobs: Vec<std::fs::File> = bs
        .blobs()
        .iter()
        .map(|b| std::fs::File::open(std::path::Path::new(&dir).join(&b.id)))
        .collect::<Result<_, _>>()?;
    bs.walk(|path, _, inode| {
        if inode.is_reg() {
            let mut h = sha2::Sha256::new();
            for s in bs.map_range(inode, 0, inode.size)? {
                let c = bs.chunk_info(&s.chunk)?.expect("chunk in table");
                let data = read::read_chunk(
                    &blobs[s.chunk.blob_index as usize],
                    &bs.blobs()[s.chunk.blob_index as usize],
                    &c,
                )?;
                h.update(&data[s.offset as usize..(s.offset + s.len) as usize]);
            }
            println!(
                "{} {} {}",
                hex::encode(h.finalize()),
                inode.size,
                String::from_utf8_lossy(path)
            );
        }
        Ok(())
    })?;
    Ok(())
}
