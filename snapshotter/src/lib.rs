//! `containerd-nydus-grpc`: a containerd proxy snapshotter that runs nydus images lazily
//! (their data layers are never downloaded; containers start from nydusd mounts) and
//! ordinary OCI images as containerd's overlayfs snapshotter does.
//!
//! * [`config`]: the TOML config (upstream nydus-snapshotter's field names).
//! * [`store`]: snapshot, image and daemon metadata in redb.
//! * [`service`]: containerd's snapshots gRPC API.
//! * [`daemons`]: the nydusd processes behind nydus images.
//! * [`filters`]: containerd's filter expressions for `List`.
//! * [`auth`]: registry credentials from a docker `config.json`.
//! * [`metrics`]: the snapshotter's Prometheus counters.

pub mod auth;
pub mod config;
pub mod daemons;
pub mod filters;
pub mod metrics;
pub mod service;
pub mod store;
pub mod system;

/// containerd's snapshots API, generated from `proto/` (containerd 1.6's messages).
#[allow(missing_docs)]
pub mod proto {
    /// The generated modules, nested as the protos' packages.
    pub mod containerd {
        /// `containerd.types`.
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services`.
        pub mod services {
            /// `containerd.services.snapshots`.
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}

/// The label containerd puts on a layer Prepare during a pull: the chain id the layer
/// will be committed as.
pub const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// A nydus image's data layer (a manifest annotation that CRI passes on).
pub const NYDUS_BLOB_LABEL: &str = "containerd.io/snapshot/nydus-blob";
/// A nydus image's bootstrap (meta) layer.
pub const NYDUS_BOOTSTRAP_LABEL: &str = "containerd.io/snapshot/nydus-bootstrap";
/// The image reference CRI passes with `disable_snapshot_annotations = false`.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The id of the one daemon of shared mode.
pub const SHARED_DAEMON_ID: &str = "shared";
