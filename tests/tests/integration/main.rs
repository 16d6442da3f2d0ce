//! End-to-end tests, one binary with a module per area (run as root: `bash tests/run.sh`).

mod cache_limit;
mod failover;
mod growing_upload;
mod guards;
mod judges;
mod layers;
mod nydusd;
mod nydusd_faults;
mod nydusd_mount;
mod nydusify;
mod nydusify_bad;
mod p2p_nydusd;
mod p2p_peer;
mod p2p_scheduler;
mod passthrough;
mod snapshotter;
mod varied_tree;
mod virtiofs;
