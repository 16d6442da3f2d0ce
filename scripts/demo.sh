#!/usr/bin/env bash
# The main job, end to end on one machine: build a small directory tree into a RAFS v6
# image with this project's nydus-image, check it, inspect it, unpack it back to a tar,
# and show that the tar holds the same tree.
#
#   bash scripts/demo.sh          (KEEP=1 keeps the work directory)
#
# The commands are upstream Nydus's own forms, so this script also runs against an
# upstream nydus-image: NYDUS_IMAGE=/path/to/nydus-image bash scripts/demo.sh
set -Eeuo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

step() { echo; echo "==> $*"; }
fail() { echo "demo.sh: FAILED: $*" >&2; exit 1; }
trap 'echo "demo.sh: FAILED at line $LINENO (work directory kept: $WORK)" >&2' ERR

if [[ -z ${NYDUS_IMAGE:-} ]]; then
    step "cargo build --release -p converter -p nydusd"
    cargo build --release -p converter -p nydusd
    NYDUS_IMAGE=${CARGO_TARGET_DIR:-target}/release/nydus-image
fi
[[ -x $NYDUS_IMAGE ]] || fail "$NYDUS_IMAGE is not an executable"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nydus-demo.XXXXXX")
SRC=$WORK/src OUT=$WORK/out UNPACKED=$WORK/unpacked
mkdir -p "$SRC" "$OUT/blobs" "$UNPACKED"

step "making a source tree in $SRC"
mkdir -p "$SRC/etc" "$SRC/usr/share/doc" "$SRC/var/empty-dir"
printf 'hello from a lazily loaded image\n' >"$SRC/etc/motd"
: >"$SRC/etc/empty"
seq 1 600000 >"$SRC/usr/share/doc/numbers.txt"                        # ~3.9 MiB: 4 chunks
head -c $((2 * 1024 * 1024 + 4321)) /dev/urandom >"$SRC/usr/random.bin" # incompressible
cp "$SRC/usr/random.bin" "$SRC/usr/random-copy.bin"                     # deduplicated chunks
ln "$SRC/etc/motd" "$SRC/usr/share/doc/motd-hardlink"
ln -s ../etc/motd "$SRC/usr/motd-symlink"
mkfifo "$SRC/var/fifo"
chmod 4755 "$SRC/usr/random.bin"
find "$SRC" -mindepth 1 -depth -exec touch -h -d @1700000000.123456789 {} +
echo "$(find "$SRC" -mindepth 1 | wc -l) entries, $(du -sh --apparent-size "$SRC" | cut -f1)"

step "nydus-image create -t dir-rafs -B $OUT/image.boot -D $OUT/blobs $SRC"
"$NYDUS_IMAGE" create -t dir-rafs -B "$OUT/image.boot" -D "$OUT/blobs" "$SRC"
ls -l "$OUT/image.boot" "$OUT/blobs"

step "nydus-image check $OUT/image.boot -D $OUT/blobs"
"$NYDUS_IMAGE" check "$OUT/image.boot" -D "$OUT/blobs"

step "nydus-image inspect $OUT/image.boot -R stats"
"$NYDUS_IMAGE" inspect "$OUT/image.boot" -R stats

step "nydus-image unpack $OUT/image.boot -D $OUT/blobs --output $OUT/image.tar"
"$NYDUS_IMAGE" unpack "$OUT/image.boot" -D "$OUT/blobs" --output "$OUT/image.tar"

step "comparing the unpacked tar with the source"
tar -C "$UNPACKED" --numeric-owner -xpf "$OUT/image.tar"
# Path, type, mode, owner, size (not of directories), mtime, link count, symlink target...
listing() {
    (cd "$1" && find . -mindepth 1 \( -type d -printf '%P %y %m %U:%G %Ts\n' \) -o \
        -printf '%P %y %m %U:%G %s %Ts %n %l\n' | LC_ALL=C sort)
}
# ...and the content of every regular file.
contents() {
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
}
diff <(listing "$SRC") <(listing "$UNPACKED") || fail "metadata differs (< source, > unpacked)"
diff <(contents "$SRC") <(contents "$UNPACKED") || fail "file contents differ (< source, > unpacked)"
echo "identical: $(listing "$SRC" | wc -l) entries"

# Lazy mount: nydusd serves the image from the blob directory (the built-in local origin)
# and fetches only the chunks that are read, each verified against its digest.
NYDUSD=${NYDUSD:-$(dirname "$NYDUS_IMAGE")/nydusd}
if [[ $(id -u) != 0 || ! -c /dev/fuse || ! -x $NYDUSD ]]; then
    step "skipping the lazy mount (needs root, /dev/fuse and $NYDUSD)"
else
    MNT=$WORK/mnt CACHE=$WORK/cache SOCK=$WORK/api.sock
    mkdir -p "$MNT" "$CACHE"
    cat >"$WORK/nydusd.json" <<JSON
{"device": {"backend": {"type": "localfs", "config": {"dir": "$OUT/blobs"}},
            "cache": {"type": "blobcache", "config": {"work_dir": "$CACHE"}}},
 "mode": "direct", "enable_xattr": true}
JSON
    step "nydusd --bootstrap $OUT/image.boot --mountpoint $MNT --config nydusd.json --apisock api.sock"
    "$NYDUSD" --bootstrap "$OUT/image.boot" --mountpoint "$MNT" --config "$WORK/nydusd.json" \
        --apisock "$SOCK" --log-level warn &
    NYDUSD_PID=$!
    # SIGTERM: nydusd unmounts and exits by itself.
    unmount() { kill -TERM "$NYDUSD_PID" 2>/dev/null || true; wait "$NYDUSD_PID" 2>/dev/null || true; umount "$MNT" 2>/dev/null || true; }
    trap 'unmount; echo "demo.sh: FAILED at line $LINENO (work directory kept: $WORK)" >&2' ERR
    for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
    mountpoint -q "$MNT" || fail "nydusd did not mount $MNT"
    step "reading a few files through the lazy mount"
    ls -l "$MNT" "$MNT/usr"
    cat "$MNT/etc/motd"
    head -n 3 "$MNT/usr/share/doc/numbers.txt"
    cmp "$MNT/etc/motd" "$SRC/etc/motd" || fail "etc/motd differs through the mount"
    image_bytes=$(du -cb "$OUT/blobs" | tail -n 1 | cut -f1)
    if command -v curl >/dev/null; then
        fetched=$(curl -s --unix-socket "$SOCK" http://localhost/api/v1/metrics/backend |
            sed -n 's/.*"read_amount_total": *\([0-9]*\).*/\1/p')
    fi
    # Without curl: what the chunk cache holds is what was fetched.
    fetched=${fetched:-$(du -cB1 "$CACHE"/*.blob.data | tail -n 1 | cut -f1)}
    echo "fetched $fetched bytes of a $image_bytes-byte image ($((100 * fetched / image_bytes))%)"
    unmount
    trap 'echo "demo.sh: FAILED at line $LINENO (work directory kept: $WORK)" >&2' ERR
fi

if [[ ${KEEP:-0} == 1 ]]; then
    echo; echo "demo.sh: OK (kept $WORK)"
else
    rm -rf "$WORK"
    echo; echo "demo.sh: OK"
fi
