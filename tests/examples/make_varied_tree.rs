//! Writes the varied test tree into a directory, for looking at it or feeding it to a
//! tool by hand: `cargo run -p rafs-e2e --example make_varied_tree -- DIR` (as root).

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: make_varied_tree DIR   (as root; DIR should be empty or missing)");
        std::process::exit(2);
    };
    if let Err(e) = rafs_e2e::make_varied_tree(std::path::Path::new(&dir)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
