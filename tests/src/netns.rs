//! A network namespace of the test's own, joined to the root namespace by a veth pair,
//! with optional bandwidth shaping (`tc ... tbf`; netem is not available here).
//!
//! Servers run inside it (`ip netns exec`, see [`NetNs::exec`]) on their own address;
//! clients stay in the root namespace — `ip netns exec` also unshares the mount
//! namespace, so a FUSE mount made inside would be invisible outside.

use crate::daemons::run_ok;
use std::process::Command;

/// A network namespace `rafs-<tag>-<pid>` with a veth pair: `<addr_prefix>.1/24` on the
/// root side, `<addr_prefix>.2/24` inside. Deleting it on drop also deletes the pair
/// (and so any shaping); processes started inside must be stopped first (declare their
/// guards after this one).
pub struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    host_addr: String,
    ns_addr: String,
}

impl NetNs {
    /// Creates the namespace and the veth pair. `tag` (a few letters) names them; the
    /// /24 is `10.<200 + pid % 50>.<pid / 50 % 250>`, so that concurrent tests of other
    /// processes get other addresses.
    ///
    /// # Panics
    /// When `ip` fails (not root, or the names are taken).
    pub fn create(tag: &str) -> NetNs {
        let pid = std::process::id();
        let name = format!("rafs-{tag}-{pid}");
        // Interface names are limited to 15 bytes.
        let short = format!("{}{}", &tag[..tag.len().min(4)], pid % 100_000);
        let prefix = format!("10.{}.{}", 200 + pid % 50, pid / 50 % 250);
        let ns = NetNs {
            host_if: format!("{short}h"),
            ns_if: format!("{short}n"),
            host_addr: format!("{prefix}.1"),
            ns_addr: format!("{prefix}.2"),
            name,
        };
        // A namespace left by an earlier run of this pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        run_ok(Command::new("ip").args(["netns", "add", &ns.name]));
        // From here on, drop undoes what was done.
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args));
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
            "netns",
            &ns.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_addr),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let nsip = |args: &[&str]| run_ok(Command::new("ip").args(["-n", &ns.name]).args(args));
        nsip(&[
            "addr",
            "add",
            &format!("{}/24", ns.ns_addr),
            "dev",
            &ns.ns_if,
        ]);
        nsip(&["link", "set", &ns.ns_if, "up"]);
        nsip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace (servers listen here).
    pub fn addr(&self) -> &str {
        &self.ns_addr
    }

    /// The root namespace's address on the pair.
    pub fn host_addr(&self) -> &str {
        &self.host_addr
    }

    /// `ip netns exec <name> <program>`: a command run inside the namespace (it `exec`s,
    /// so the child's pid is the program's).
    pub fn exec(&self, program: &str) -> Command {
        exec_in(&self.name, program)
    }

    /// Limits both directions of the pair to `mbit` Mbit/s (a token bucket on each end's
    /// egress), replacing any earlier limit.
    ///
    /// # Panics
    /// When `tc` fails.
    pub fn shape(&self, mbit: u32) {
        let rate = format!("{mbit}mbit");
        let tbf = ["tbf", "rate", &rate, "burst", "128kb", "latency", "50ms"];
        run_ok(
            Command::new("tc")
                .args(["qdisc", "replace", "dev", &self.host_if, "root"])
                .args(tbf),
        );
        run_ok(
            Command::new("tc")
                .args([
                    "-n",
                    &self.name,
                    "qdisc",
                    "replace",
                    "dev",
                    &self.ns_if,
                    "root",
                ])
                .args(tbf),
        );
    }

    /// Removes the limits of [`NetNs::shape`].
    pub fn unshape(&self) {
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", &self.host_if, "root"])
            .output();
        let _ = Command::new("tc")
            .args(["-n", &self.name, "qdisc", "del", "dev", &self.ns_if, "root"])
            .output();
    }
}

/// `ip netns exec <ns> <program>` (it `exec`s: the child's pid is the program's).
pub(crate) fn exec_in(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the pair, and with it the other end.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}
