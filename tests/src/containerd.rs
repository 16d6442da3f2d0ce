//! A private containerd (Debian's 1.6) with our snapshotter as a proxy plugin, a CRI
//! client for lazy pulls, and cleanup of everything they leave: containerd's shims,
//! nydusd daemons and mounts under the test's directory, found by pid and path.

use crate::daemons::run_ok;
use crate::guards::{wait_until, ChildGuard};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The name containerd knows our snapshotter by in these tests.
pub const SNAPSHOTTER: &str = "nydus";

/// Our snapshotter (`containerd-nydus-grpc`) with its root under a test directory.
pub struct NydusSnapshotter {
    child: Option<ChildGuard>,
    /// Its gRPC socket.
    pub sock: PathBuf,
    /// Its state directory.
    pub root: PathBuf,
    /// The nydusd it starts (`--nydusd-path`; read by [`NydusSnapshotter::up`]).
    pub nydusd: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl NydusSnapshotter {
    /// Starts the snapshotter with `root` and the TOML `config` (the workspace's nydusd
    /// given by `--nydusd-path`), and waits for its socket.
    pub fn start(root: &Path, config: &str) -> NydusSnapshotter {
        fs::create_dir_all(root).unwrap();
        let path = root.with_extension("toml");
        fs::write(&path, config).unwrap();
        let mut s = NydusSnapshotter {
            child: None,
            nydusd: crate::bin("nydusd"),
            sock: root.with_extension("sock"),
            root: root.to_path_buf(),
            config: path,
            log: root.with_extension("log"),
        };
        s.up();
        s
    }

    /// Starts it (again).
    pub fn up(&mut self) {
        let _ = fs::remove_file(&self.sock);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = ChildGuard::spawn(
            Command::new(crate::bin("containerd-nydus-grpc"))
                .arg("--config")
                .arg(&self.config)
                .arg("--root")
                .arg(&self.root)
                .arg("--address")
                .arg(&self.sock)
                .arg("--nydusd-path")
                .arg(&self.nydusd)
                .arg("--log-level")
                .arg("debug")
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
        .unwrap();
        self.child = Some(child);
        let sock = self.sock.clone();
        assert!(
            wait_until(Duration::from_secs(20), || sock.exists()),
            "the snapshotter did not listen on {}; log:\n{}",
            sock.display(),
            self.log_text()
        );
    }

    /// Stops it with SIGTERM (daemons keep running unless `cleanup_on_close`).
    pub fn down(&mut self) {
        if let Some(c) = self.child.take() {
            c.terminate(Duration::from_secs(20)).unwrap();
        }
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        drop(self.child.take());
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pids of the nydusd processes it started (those whose command line names its root).
    pub fn nydusd_pids(&self) -> Vec<u32> {
        pids_mentioning(&self.root, "nydusd")
    }

    /// The FUSE mounts under its root.
    pub fn fuse_mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.root)
            .into_iter()
            .filter(|(_, fstype)| fstype.starts_with("fuse"))
            .map(|(p, _)| p)
            .collect()
    }
}

impl Drop for NydusSnapshotter {
    fn drop(&mut self) {
        self.kill();
        for pid in self.nydusd_pids() {
            kill_pid(pid);
        }
        unmount_all_under(&self.root);
    }
}

/// Writes `<hosts>/<registry>/hosts.toml` (containerd's registry hosts directory):
/// pulls from `registry` (`host:port`, plain HTTP) go through `mirror` (a P2P peer's
/// proxy, `http://ip:port`) first, as nodes configure a Dragonfly mirror.
pub fn mirror_hosts(hosts: &Path, registry: &str, mirror: &str) {
    fs::create_dir_all(hosts.join(registry)).unwrap();
    fs::write(
        hosts.join(registry).join("hosts.toml"),
        format!(
            "server = \"http://{registry}\"\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
}

/// A containerd with its own root, state and socket under `dir`, our snapshotter
/// configured as proxy plugin [`SNAPSHOTTER`] and CRI's default snapshotter.
pub struct Containerd {
    child: Option<ChildGuard>,
    /// Its gRPC socket.
    pub sock: PathBuf,
    dir: PathBuf,
    config: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers.
    pub fn start(dir: &Path, snapshotter_sock: &Path) -> Containerd {
        Containerd::start_with(dir, snapshotter_sock, SNAPSHOTTER)
    }

    /// [`Containerd::start`] with CRI pulling into `cri_snapshotter` (e.g. containerd's
    /// own `overlayfs`) instead of ours.
    pub fn start_with(dir: &Path, snapshotter_sock: &Path, cri_snapshotter: &str) -> Containerd {
        let docker_io = r#"  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
    endpoint = []"#;
        Containerd::start_config(dir, snapshotter_sock, cri_snapshotter, docker_io)
    }

    /// [`Containerd::start_with`] with CRI's registries configured by the hosts
    /// directory `hosts_dir` (`<hosts_dir>/<registry host:port>/hosts.toml`: mirrors
    /// and the like, as nodes configure a P2P mirror).
    pub fn start_with_hosts(
        dir: &Path,
        snapshotter_sock: &Path,
        cri_snapshotter: &str,
        hosts_dir: &Path,
    ) -> Containerd {
        let registry = format!(
            "  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{}\"",
            hosts_dir.display()
        );
        Containerd::start_config(dir, snapshotter_sock, cri_snapshotter, &registry)
    }

    fn start_config(
        dir: &Path,
        snapshotter_sock: &Path,
        cri_snapshotter: &str,
        registry: &str,
    ) -> Containerd {
        fs::create_dir_all(dir).unwrap();
        let sock = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[proxy_plugins]
  [proxy_plugins.{SNAPSHOTTER}]
    type = "snapshot"
    address = "{snap}"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{cri_snapshotter}"
    disable_snapshot_annotations = false
{registry}
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = sock.display(),
                snap = snapshotter_sock.display(),
            ),
        )
        .unwrap();
        let mut c = Containerd {
            child: None,
            sock,
            dir: dir.to_path_buf(),
            config,
        };
        c.up();
        c
    }

    /// Starts containerd (again).
    pub fn up(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        self.child = Some(
            ChildGuard::spawn(
                Command::new("containerd")
                    .arg("--config")
                    .arg(&self.config)
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
            )
            .expect("starting containerd (Debian package containerd)"),
        );
        assert!(
            wait_until(Duration::from_secs(20), || {
                self.ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            }),
            "containerd did not answer; log:\n{}",
            fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
        );
    }

    /// Stops containerd (SIGTERM).
    pub fn down(&mut self) {
        if let Some(c) = self.child.take() {
            c.terminate(Duration::from_secs(20)).unwrap();
        }
    }

    /// `ctr` talking to this containerd.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock);
        c
    }

    /// Pulls `image` through CRI's `ImageService/PullImage` (the lazy path, as kubelet
    /// pulls), returning the image id, or the gRPC error's text.
    pub fn cri_pull(&self, image: &str) -> Result<String, String> {
        self.cri_pull_auth(image, None)
    }

    /// [`Containerd::cri_pull`] with registry credentials `(user, password)`, as kubelet
    /// passes an image pull secret.
    pub fn cri_pull_auth(&self, image: &str, auth: Option<(&str, &str)>) -> Result<String, String> {
        let auth = auth.map(|(u, p)| k8s_cri::v1::AuthConfig {
            username: u.to_string(),
            password: p.to_string(),
            ..Default::default()
        });
        let sock = self.sock.clone();
        let image = image.to_string();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                use k8s_cri::v1::image_service_client::ImageServiceClient;
                use k8s_cri::v1::{ImageSpec, PullImageRequest};
                let channel = uds_channel(sock)
                    .await
                    .map_err(|e| format!("connecting to containerd: {e}"))?;
                let reply = ImageServiceClient::new(channel)
                    .pull_image(PullImageRequest {
                        image: Some(ImageSpec {
                            image,
                            ..Default::default()
                        }),
                        auth,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
                Ok(reply.into_inner().image_ref)
            })
    }

    /// `ctr -n k8s.io run --rm --snapshotter nydus IMAGE ID ARGS...`: runs a container
    /// to its end; panics unless it succeeds.
    pub fn run(&self, image: &str, id: &str, args: &[&str]) -> Output {
        self.run_with(SNAPSHOTTER, image, id, args)
    }

    /// [`Containerd::run`] with the rootfs from `snapshotter`.
    pub fn run_with(&self, snapshotter: &str, image: &str, id: &str, args: &[&str]) -> Output {
        run_ok(&mut self.run_command(snapshotter, image, id, args))
    }

    /// The `ctr run --rm` command of [`Containerd::run_with`], to spawn.
    pub fn run_command(&self, snapshotter: &str, image: &str, id: &str, args: &[&str]) -> Command {
        let mut cmd = self.ctr();
        cmd.args([
            "-n",
            "k8s.io",
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            image,
            id,
        ])
        .args(args);
        cmd
    }

    /// Waits (up to 30 s) until `ctr` lists our snapshotter's snapshots: containerd
    /// redials a restarted proxy plugin with gRPC's backoff (about 1 s first).
    pub fn reaches_snapshotter(&self) -> bool {
        wait_until(Duration::from_secs(30), || {
            self.ctr()
                .args([
                    "-n",
                    "k8s.io",
                    "snapshots",
                    "--snapshotter",
                    SNAPSHOTTER,
                    "ls",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        drop(self.child.take());
        // Shims (and their containers) outlive containerd by design.
        for pid in pids_mentioning(&self.dir, "containerd-shim") {
            kill_pid(pid);
        }
        unmount_all_under(&self.dir);
    }
}

/// A gRPC channel over the unix socket `sock` (containerd's, a snapshotter's).
pub async fn uds_channel(
    sock: PathBuf,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .expect("a valid placeholder URI")
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
}

/// Pids of processes whose command line mentions `path` and whose name starts with
/// `name`.
pub fn pids_mentioning(path: &Path, name: &str) -> Vec<u32> {
    let want = path.to_string_lossy().into_owned();
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let named = args.first().is_some_and(|a| {
            Path::new(a)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(name))
        });
        if named && args.iter().any(|a| a.contains(&want)) && crate::pid_alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Kills process `pid` with `SIGKILL` and waits (up to 5 s) until it is gone.
pub fn kill_pid(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
    wait_until(Duration::from_secs(5), || !crate::pid_alive(pid));
}

/// Mount points (and filesystem types) at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<(PathBuf, String)> = table
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let mp = PathBuf::from(fields.get(4)?.replace("\\040", " "));
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?.to_string();
            mp.starts_with(dir).then_some((mp, fstype))
        })
        .collect();
    out.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    out
}

/// Lazily unmounts everything at or under `dir`.
pub fn unmount_all_under(dir: &Path) {
    for (mp, _) in mounts_under(dir) {
        let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
    }
}
