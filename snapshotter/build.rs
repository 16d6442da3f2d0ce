//! Generates containerd's snapshots service (server side) with tonic 0.14 from the
//! protos in `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/snapshots.proto", "proto/mount.proto"], &["proto"])?;
    Ok(())
}
