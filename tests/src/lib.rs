//! Helpers for the project's end-to-end tests.
//!
//! The end-to-end tests run the real components — the workspace binaries, upstream
//! Nydus 2.2 as a judge, the kernel's EROFS and FUSE, loop devices — and compare what
//! a filesystem shows with the tree it was built from. This crate holds what those
//! tests share:
//!
//! - [`bin`] and [`upstream_bin`] find the binaries under test and the judge;
//! - [`require_root_tools`] makes a test fail loudly (never skip) when it is not root
//!   or a tool is missing: `bash tests/run.sh` installs them;
//! - [`LoopDevice`], [`Mount`] and [`ChildGuard`] undo a loop attach, a mount or a
//!   daemon when dropped, also when the test panics;
//! - [`make_varied_tree`] writes a deterministic source tree with every file type and
//!   the awkward cases of the format (hard links, long names and symlinks, xattrs,
//!   big uids, nanosecond mtimes, 5,000 entries in one directory, ...);
//! - [`build_image`], [`ErofsMount`], [`unpack_image`] build an image with our
//!   `nydus-image`, mount it with the kernel's EROFS, unpack it; [`umoci_image`] and
//!   [`umoci_rootfs`] make an OCI image from [`LayerTar`]s and unpack it with umoci;
//! - [`Registry`] runs Debian's docker-registry on a loopback port, or inside a
//!   [`NetNs`] (a network namespace with a veth pair and optional bandwidth shaping),
//!   and [`FaultProxy`] puts 503s and dropped connections in front of it;
//! - [`differences`] reports every difference between two trees, typed ([`What`]), and
//!   [`compare_trees`] shows them as text lines;
//! - [`Dfdaemon`] runs a real Dragonfly peer (dragonfly-client 1.5.10) on a fresh
//!   loopback address, and [`Scheduler`] our `p2p-scheduler`;
//! - [`limit_loop`] and [`median`] are the benchmarks' shared baseline and statistic.
//!
//! Most helpers need root, as do the tests that use them; `bash tests/run.sh` runs
//! everything as CI does.

mod bench;
mod bins;
mod compare;
mod containerd;
mod daemons;
mod dragonfly;
mod fault_proxy;
mod guards;
mod image;
mod netns;
mod registry;
mod token_server;
mod tree;
mod vm;

pub use bench::{
    background_cpu, decode_limit, limit_loop, median, python_images, CpuBusy, PerfRecord,
    LIMIT_CHUNK,
};
pub use bins::{bin, require_root_tools, upstream_bin, UPSTREAM_BIN_DEFAULT};
pub use compare::{
    assert_same_tree, compare_trees, compare_trees_with, differences, sha256_file, CompareOptions,
    Difference, What,
};
pub use containerd::{
    kill_pid, mirror_hosts, mounts_under, pids_mentioning, uds_channel, unmount_all_under,
    Containerd, NydusSnapshotter, SNAPSHOTTER,
};
pub use daemons::{
    drop_caches, localfs_config, run_ok, start_fuse_daemon, start_upstream_nydusd,
    upstream_nydusd_command, FuseDaemon,
};
pub use dragonfly::{
    dfdaemon_bin, finish_fetch, fresh_loopback_ip, metric_value, peak_rss, Dfdaemon, HashedFetch,
    OurPeer, Scheduler, DRAGONFLY_ROOT_DEFAULT,
};
pub use fault_proxy::{Fault, FaultProxy};
pub use guards::{is_mounted, wait_until, ChildGuard, LoopDevice, Mount};
pub use image::{
    bootstrap_of_layout, build_image, build_image_with, expand_blobs, extract_tar,
    pull_nydus_image, push_python_image, umoci_compare, umoci_image, umoci_rootfs, unpack_image,
    BuiltImage, ErofsMount, LayerTar,
};
pub use netns::NetNs;
pub use nydusd::client::launcher::pid_alive;
pub use registry::{AccessEntry, Registry};
pub use token_server::TokenServer;
pub use tree::{
    long_name_path, make_varied_tree, noise, DEEP_LEVELS, HARD_LINK_NAMES, MULTI_CHUNK_FILE,
    WIDE_DIR, WIDE_DIR_ENTRIES,
};
pub use vm::{guest_files, Guest};
