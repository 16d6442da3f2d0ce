#!/usr/bin/env bash
# The project's test command, also what CI runs (through .ci/run):
#
#   bash tests/run.sh
#
# Run as root on Debian 12. Idempotent: it installs only what is missing —
#   1. Debian packages the end-to-end tests use (erofs-utils, fuse3, registry, ...);
#   2. upstream Nydus 2.2 (nydus-rs from crates.io), the compatibility judge, built once
#      into a cache folder outside the repo (about 4 min the first time), and real
#      Dragonfly peers (dragonfly-client 1.5.10: dfdaemon), the P2P judge, likewise
#      (about 25 min the first time);
# then runs, stopping at the first failure:
#   3. cargo fmt --check;  4. cargo clippy -D warnings;  5. cargo build of the
#   workspace binaries, then cargo test (release);  6. each cargo-fuzz target in fuzz/
#   for FUZZ_SECONDS (default 30) seconds.
# Benchmarks are not part of it.
#
# Environment: FUZZ_SECONDS (per fuzz target), NYDUS_UPSTREAM_ROOT (where upstream
# Nydus is installed; default /var/cache/nydus-upstream-2.2), DRAGONFLY_ROOT (where
# dragonfly-client is installed; default /var/cache/dragonfly-client).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

UPSTREAM_VERSION=2.2.0
UPSTREAM_ROOT=${NYDUS_UPSTREAM_ROOT:-/var/cache/nydus-upstream-2.2}
UPSTREAM_BUILD_DIR=/var/cache/nydus-upstream-build
DRAGONFLY_VERSION=1.5.10
DRAGONFLY_ROOT=${DRAGONFLY_ROOT:-/var/cache/dragonfly-client}
DRAGONFLY_BUILD_DIR=/var/cache/dfclient-build
FUZZ_SECONDS=${FUZZ_SECONDS:-30}

# Root's tools live in sbin; rustup's cargo in ~/.cargo/bin. Neither is certain to be
# on the PATH of a non-login shell.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

STAGE=setup
STAGE_START=$SECONDS
DONE=""

stage() {
    finish_stage
    STAGE=$1
    STAGE_START=$SECONDS
    echo
    echo "==> tests/run.sh: $STAGE"
}

finish_stage() {
    if [[ $STAGE != setup ]]; then
        DONE+="${DONE:+; }$STAGE $((SECONDS - STAGE_START))s"
    fi
}

# Free disk at each stage's end and on failure: a CI machine once ran out of space in the
# swarm tests, and the log should say so without a rerun.
disk() {
    df -h "$PWD" "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR == 1 || !seen[$1]++' >&2 || true
}

fail() {
    echo "tests/run.sh: FAILED in stage '$STAGE': $*" >&2
    disk
    exit 1
}

on_error() {
    local rc=$?
    echo >&2
    echo "tests/run.sh: FAILED in stage '$STAGE' (exit code $rc, line $1); stages passed: ${DONE:-none}" >&2
    disk
    exit "$rc"
}
trap 'on_error $LINENO' ERR

[[ $(id -u) == 0 ]] || fail "run as root: the tests attach loop devices, mount filesystems and install packages"
command -v cargo >/dev/null || fail "cargo not found (looked in PATH and ~/.cargo/bin): install the Rust toolchain first"

# --- 1. Debian packages ------------------------------------------------------------------
# One line per package: the package, then the commands that tell it is installed. A
# package is installed only when one of its commands is missing.
REQUIRED=(
    "erofs-utils fsck.erofs mkfs.erofs dump.erofs"
    "fuse3 fusermount3"
    "mount losetup mount umount"
    "util-linux findmnt"
    "kmod modprobe"
    "busybox-static busybox"
    "docker-registry docker-registry"
    "skopeo skopeo"
    "curl curl"
    "apache2-utils htpasswd"
    "openssl openssl"
    "umoci umoci"
    "debootstrap debootstrap"
    "cmake cmake"
    "protobuf-compiler protoc"
    "containerd containerd ctr"
    "runc runc"
    "qemu-system-x86 qemu-system-x86_64"
    "xz-utils xz"
    "pkg-config pkg-config"
    "build-essential cc c++ make"
)

stage "Debian packages"
missing=()
for line in "${REQUIRED[@]}"; do
    read -r package commands <<<"$line"
    for command in $commands; do
        if ! command -v "$command" >/dev/null; then
            missing+=("$package")
            break
        fi
    done
done
# Upstream nydus-rs 2.2, the judge built below, links against OpenSSL (ours uses rustls).
# dragonfly-api (the scheduler's protos) and dfdaemon compile protos that import
# google/protobuf/*.proto (libprotobuf-dev); dfdaemon's RocksDB needs libclang (bindgen).
for dev in libssl-dev libprotobuf-dev libclang-dev; do
    if ! dpkg-query -W -f='${Status}' "$dev" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$dev")
    fi
done
# The initramfs of the VM tests needs the *static* busybox, not just any busybox.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed"; then
    [[ " ${missing[*]} " == *" busybox-static "* ]] || missing+=(busybox-static)
fi
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    # A hook on these machines deletes downloaded .debs after the first dpkg batch:
    # give apt an archive directory of its own.
    mkdir -p /tmp/apt/partial
    apt-get update -q </dev/null || fail "apt-get update failed"
    apt-get -q -o Dir::Cache::Archives=/tmp/apt/ install -y --no-install-recommends \
        "${missing[@]}" </dev/null || fail "apt-get install ${missing[*]} failed"
else
    echo "all present"
fi

stage "kernel features"
# EROFS and FUSE mounts, loop devices and overlayfs; modules are loaded if need be.
for fs in erofs fuse overlay; do
    grep -qw "$fs" /proc/filesystems || modprobe "$fs" 2>/dev/null || true
    grep -qw "$fs" /proc/filesystems || fail "the kernel has no $fs filesystem (modprobe $fs failed)"
done
[[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
[[ -e /dev/loop-control ]] || fail "no loop devices (/dev/loop-control missing; modprobe loop failed)"
[[ -c /dev/fuse ]] || fail "/dev/fuse is missing"
# nydusd passes fully cached files through to the kernel (FUSE passthrough, Linux 6.9+).
kconfig=$( (zcat /proc/config.gz || cat "/boot/config-$(uname -r)") 2>/dev/null || true)
if [[ -n $kconfig ]]; then
    grep -q '^CONFIG_FUSE_PASSTHROUGH=y' <<<"$kconfig" ||
        fail "the kernel $(uname -r) lacks CONFIG_FUSE_PASSTHROUGH (nydusd's passthrough tests need it)"
else
    IFS=. read -r kmajor kminor _ <<<"$(uname -r)"
    ((kmajor > 6 || (kmajor == 6 && kminor >= 9))) ||
        fail "the kernel $(uname -r) predates FUSE passthrough (6.9), which nydusd's tests need"
fi
echo "erofs, fuse (with passthrough), overlay, loop: present"

# --- 2. Upstream Nydus 2.2, the judge -----------------------------------------------------
stage "upstream nydus $UPSTREAM_VERSION"
if [[ -x $UPSTREAM_ROOT/bin/nydus-image && -x $UPSTREAM_ROOT/bin/nydusd ]]; then
    echo "cached in $UPSTREAM_ROOT/bin"
else
    echo "building nydus-rs $UPSTREAM_VERSION into $UPSTREAM_ROOT (once; a few minutes)"
    CARGO_TARGET_DIR=$UPSTREAM_BUILD_DIR cargo install nydus-rs --version "$UPSTREAM_VERSION" \
        --locked --root "$UPSTREAM_ROOT" </dev/null ||
        fail "cargo install nydus-rs $UPSTREAM_VERSION failed (it needs cmake, a C/C++ compiler, perl and make)"
fi
export NYDUS_UPSTREAM_BIN=$UPSTREAM_ROOT/bin
"$NYDUS_UPSTREAM_BIN/nydus-image" --version

stage "dragonfly-client $DRAGONFLY_VERSION (dfdaemon)"
if [[ -x $DRAGONFLY_ROOT/bin/dfdaemon ]]; then
    echo "cached in $DRAGONFLY_ROOT/bin"
else
    echo "building dragonfly-client $DRAGONFLY_VERSION into $DRAGONFLY_ROOT (once; about 25 minutes)"
    CARGO_TARGET_DIR=$DRAGONFLY_BUILD_DIR cargo install dragonfly-client --version "$DRAGONFLY_VERSION" \
        --locked --root "$DRAGONFLY_ROOT" </dev/null ||
        fail "cargo install dragonfly-client $DRAGONFLY_VERSION failed (it needs protoc, libprotobuf-dev, libclang-dev, cmake)"
    # The build tree is large and only the binaries are needed.
    rm -rf "$DRAGONFLY_BUILD_DIR"
fi
export DRAGONFLY_ROOT
"$DRAGONFLY_ROOT/bin/dfdaemon" --version

# --- 3-5. Format, lints, tests --------------------------------------------------------------
stage "cargo fmt --check"
cargo fmt --all -- --check || fail "code is not formatted: run 'cargo fmt --all'"

# Clippy runs on the release profile so that it shares build scripts and proc macros
# with the release test build that follows (measured faster in total than a dev-profile
# clippy plus a release build).
stage "cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings ||
    fail "clippy found warnings (treated as errors)"

# The end-to-end tests start every workspace binary (nydusd, nydusify, p2p-*,
# containerd-nydus-grpc). `cargo test` builds a package's binaries only when that package
# has integration tests of its own, so build them all first, in the same profile.
stage "cargo build"
cargo build --workspace --release --bins || fail "cargo build of the workspace binaries failed"

stage "cargo test"
disk
TEST_LOG=$(mktemp)
cargo test --workspace --release 2>&1 | tee "$TEST_LOG" || fail "tests failed (see the output above)"
# Totals over all test binaries, from cargo's "test result: ok. N passed; N failed; N ignored".
read -r passed failed ignored < <(awk '/^test result:/ { p += $4; f += $6; i += $8 }
    END { print p + 0, f + 0, i + 0 }' "$TEST_LOG")
rm -f "$TEST_LOG"
((passed > 0)) || fail "cargo test ran no test"

# --- 6. Fuzzing -------------------------------------------------------------------------------
fuzzed=0
if [[ -d fuzz/fuzz_targets ]]; then
    stage "cargo fuzz (${FUZZ_SECONDS}s per target)"
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "installing cargo-fuzz"
        cargo install cargo-fuzz --locked </dev/null || fail "cargo install cargo-fuzz failed"
    fi
    shopt -s nullglob
    # Seed corpora with real inputs so the fuzzers start past the magic numbers: the
    # golden image's bootstrap and blob, and the golden layer tar.
    seed=$(mktemp -d)
    target/release/nydus-image create -l warn -t tar-rafs --chunk-size 0x1000 --features blob-toc \
        -B "$seed/image.boot" -D "$seed" fixtures/golden/golden.tar </dev/null ||
        fail "building the fuzz seed image failed"
    mkdir -p fuzz/corpus/bootstrap fuzz/corpus/blob_meta fuzz/corpus/tar_layer
    cp "$seed/image.boot" fuzz/corpus/bootstrap/golden.boot
    for b in "$seed"/*; do
        [[ "$b" == */image.boot ]] || { printf '\x04\x00\x00\x00\x80\x00\x00\x00' | cat - "$b" >fuzz/corpus/blob_meta/golden.blob; }
    done
    cp fixtures/golden/golden.tar fuzz/corpus/tar_layer/golden.tar
    rm -rf "$seed"
    for source in fuzz/fuzz_targets/*.rs; do
        target=$(basename "$source" .rs)
        echo "--- fuzz target $target"
        # cargo-fuzz needs nightly flags (sanitizers); RUSTC_BOOTSTRAP lets the one stable
        # toolchain of these machines accept them.
        RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" </dev/null ||
            fail "fuzz target '$target' failed (a crashing input, if any, is saved under fuzz/artifacts/$target/)"
        fuzzed=$((fuzzed + 1))
    done
    shopt -u nullglob
fi
finish_stage

echo
echo "tests/run.sh: PASSED in ${SECONDS}s ($DONE; fuzz targets run: $fuzzed)"
echo "tests: $passed passed, $failed failed, $ignored skipped"
