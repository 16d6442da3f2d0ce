//! A QEMU TCG guest (built by `fixtures/make-virtiofs-guest.sh`) with a virtio-fs device
//! on a vhost-user socket, driven through its serial console: the guest runs a shell with
//! echo off and no prompt, and each command is followed by a marker carrying its exit
//! status.

use crate::guards::ChildGuard;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest's kernel and initramfs (built once per machine and cached).
pub fn guest_files() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/make-virtiofs-guest.sh");
    let out = crate::run_ok(Command::new("bash").arg(script));
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        text.lines()
            .last()
            .expect("the script prints the guest's directory")
            .trim(),
    )
}

/// A running guest; killed when dropped.
pub struct Guest {
    child: ChildGuard,
    stdin: ChildStdin,
    lines: Receiver<String>,
    console: Arc<Mutex<String>>,
    seq: u32,
}

impl Guest {
    /// Boots a guest whose virtio-fs device (tag `tag`) talks to the vhost-user backend
    /// on `sock`, and waits up to 90 s for its shell.
    pub fn boot(sock: &Path, tag: &str) -> Guest {
        Guest::boot_with(sock, tag, "")
    }

    /// [`Guest::boot`] with options added to the vhost-user socket's `-chardev` (e.g.
    /// `",reconnect=1"`: QEMU connects again when the backend comes back).
    pub fn boot_with(sock: &Path, tag: &str, chardev_options: &str) -> Guest {
        let files = guest_files();
        let mut child = ChildGuard::spawn(
            Command::new("qemu-system-x86_64")
                .args([
                    "-machine",
                    "q35",
                    "-accel",
                    "tcg,thread=multi",
                    "-cpu",
                    "max",
                ])
                .args(["-smp", "2", "-m", "512M"])
                // vhost-user needs the guest's memory shared with the backend.
                .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
                .args(["-numa", "node,memdev=mem"])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=char0,path={}{chardev_options}",
                    sock.display()
                ))
                .arg("-device")
                .arg(format!("vhost-user-fs-pci,chardev=char0,tag={tag}"))
                .arg("-kernel")
                .arg(files.join("vmlinuz"))
                .arg("-initrd")
                .arg(files.join("initramfs.cpio.gz"))
                .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
                .args([
                    "-nographic",
                    "-no-reboot",
                    "-nodefaults",
                    "-serial",
                    "stdio",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("starting qemu-system-x86_64 (package qemu-system-x86)");
        let stdin = child.child_mut().stdin.take().expect("piped stdin");
        let stdout = child.child_mut().stdout.take().expect("piped stdout");
        let stderr = child.child_mut().stderr.take().expect("piped stderr");
        let console = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = std::sync::mpsc::channel();
        for (stream, tx) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, Some(tx)),
            (Box::new(stderr), None),
        ] {
            let console = console.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    console.lock().unwrap().push_str(&format!("{line}\n"));
                    if let Some(tx) = &tx {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            });
        }
        let mut g = Guest {
            child,
            stdin,
            lines,
            console,
            seq: 0,
        };
        g.wait_for(Duration::from_secs(90), |l| l.ends_with("GUEST-READY"))
            .unwrap_or_else(|e| panic!("the guest did not boot: {e}\nconsole:\n{}", g.console()));
        g
    }

    /// Everything the guest and QEMU printed so far.
    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    fn wait_for(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&str) -> bool,
    ) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if want(&l) => return Ok(seen),
                Ok(l) => seen.push(l),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no answer within {timeout:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => return Err("QEMU exited".into()),
            }
        }
    }

    /// Runs `cmd` in the guest's shell; returns its output lines and exit status, or an
    /// error when no answer came within `timeout`.
    pub fn try_run(&mut self, cmd: &str, timeout: Duration) -> Result<(String, i32), String> {
        self.seq += 1;
        let marker = format!("@@END{}@@", self.seq);
        writeln!(self.stdin, "{cmd}; echo \"{marker} $?\"").map_err(|e| e.to_string())?;
        self.stdin.flush().map_err(|e| e.to_string())?;
        let (mut status, mut last) = (0, String::new());
        // The marker may follow output that ended without a newline, on the same line.
        let mut out = self.wait_for(timeout, |l| match l.find(&marker) {
            Some(at) => {
                status = l[at + marker.len()..].trim().parse().unwrap_or(-1);
                last = l[..at].to_string();
                true
            }
            None => false,
        })?;
        if !last.is_empty() {
            out.push(last);
        }
        Ok((out.join("\n"), status))
    }

    /// Runs `cmd` (60 s at most); panics with the console unless it exits with 0.
    pub fn run(&mut self, cmd: &str) -> String {
        match self.try_run(cmd, Duration::from_secs(60)) {
            Ok((out, 0)) => out,
            Ok((out, status)) => panic!("guest: `{cmd}` exited with {status}:\n{out}"),
            Err(e) => panic!("guest: `{cmd}`: {e}\nconsole:\n{}", self.console()),
        }
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
