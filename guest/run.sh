#!/usr/bin/env bash
# A real Linux guest on an NBD export: boots Debian's kernel under qemu-system-x86_64 (TCG, no KVM needed) with
# the export as a virtio-blk disk; guest/init then makes ext4, writes, overwrites, deletes, fstrims and verifies
# (see that file) and prints one result line. docs/guest.md tells more.
#
#   guest/run.sh [--server qdedup|qemu-nbd] [--dir DIR] [--size SIZE] [--scale N] [--timeout SECONDS]
#       makes a fresh 4 KiB-cluster qcow2 in DIR (default: a temporary one), serves it (qdedup serve --dedup, or
#       qemu-nbd), boots the guest on it, stops the server, runs qemu-img check and counts the clusters stored
#       and the distinct non-zero 4 KiB clusters of the disk. With qdedup both must be equal.
#   guest/run.sh --uri NBD-URI [--dir DIR] [--scale N] [--timeout SECONDS]
#       boots the guest on an export served by someone else (it is overwritten).
# DIR keeps the image, the server's log and the guest's console (console.log). --scale N makes the guest's files N
# times larger (29 MiB of files at 1; the disk must hold them: --size 1G for --scale 8).
#
# Prints the guest's line "QDEDUP-GUEST: PASS ..." (or FAIL) and, with --server, one line
# "guest-result: server=... pass=yes check=clean seconds=... guest-seconds=... stored-clusters=N distinct-nonzero-clusters=M".
# Exit 0 when all of it holds. The kernel, busybox and e2fsprogs come from Debian's packages (apt-get download),
# unpacked, never installed, into ${QDEDUP_GUEST_CACHE:-$HOME/.cache/qdedup-guest}. Environment: QDEDUP (the
# qdedup command, default bin/qdedup), QDEDUP_GUEST_KERNEL (a linux-image-6.1.* package name, default the one
# linux-image-amd64 depends on).
set -euo pipefail
here=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
root=$(dirname "$here")
QDEDUP=${QDEDUP:-$root/bin/qdedup}
cache=${QDEDUP_GUEST_CACHE:-${HOME:-/tmp}/.cache/qdedup-guest}
server=qdedup uri="" dir="" size=256M timeout=900 scale=1
log() { echo "guest: $*" >&2; }
die() { log "$*"; exit 1; }
while [ $# -gt 0 ]; do
  case $1 in
    --server) server=$2; shift 2 ;;
    --uri) uri=$2; server=""; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case $server in qdedup|qemu-nbd|"") ;; *) die "--server takes qdedup or qemu-nbd, not $server" ;; esac
[[ $scale =~ ^[1-9][0-9]*$ ]] || die "--scale takes a whole number >= 1, not $scale"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: apt-get install -y --no-install-recommends qemu-system-x86"

# --- the guest kit: kernel and initramfs, from Debian packages kept in the cache -------------------------------
as_root_apt=()
[ "$(id -u)" = 0 ] && as_root_apt=(-o APT::Sandbox::User=root) # the cache may be where _apt cannot write
kernel_package() {
  [ -n "${QDEDUP_GUEST_KERNEL:-}" ] && { echo "$QDEDUP_GUEST_KERNEL"; return; }
  apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\./ { print $2; exit }'
}
kpkg=$(kernel_package)
if [ -z "$kpkg" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >&2 || true
  kpkg=$(kernel_package)
fi
if [ -z "$kpkg" ]; then # offline, no package lists: the newest kit already in the cache
  kpkg=$(ls -d "$cache"/linux-image-6.1.*/tree 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname | xargs -r basename)
fi
[ -n "$kpkg" ] || die "cannot tell which kernel to use: no package lists (apt-get update) and nothing in $cache"
kit=$cache/$kpkg
tree=$kit/tree
# GNU dd for the O_DIRECT writes: busybox dd silently drops O_DIRECT when its buffer is below a page (malloc'ed,
# unaligned), so its bs=512 oflag=direct writes go through the page cache
pkgs=("$kpkg" busybox-static e2fsprogs libext2fs2 libcom-err2 libblkid1 libuuid1 coreutils libc6)
# Debian builds these as modules; crc32c first: ext4 and jbd2 ask the crypto API for it (a softdep, which insmod
# does not follow)
modules=(crc32c_generic virtio_pci virtio_blk ext4)
recipe="${pkgs[*]} / ${modules[*]}"
if [ "$(cat "$kit/.complete" 2>/dev/null)" != "$recipe" ]; then
  log "fetching ${pkgs[*]} into $kit"
  rm -rf "$kit"; mkdir -p "$kit/debs" "$kit/modules" "$tree"
  fetch() { (cd "$kit/debs" && apt-get -q download "${as_root_apt[@]}" "${pkgs[@]}" >&2); }
  fetch || { [ "$(id -u)" = 0 ] && apt-get update -qq >&2 && fetch; } ||
    die "apt-get download ${pkgs[*]} failed (apt-get update first?)"
  for deb in "$kit"/debs/*.deb; do dpkg-deb -x "$deb" "$tree"; done
  kver=$(ls "$tree/lib/modules")
  moddir=$tree/lib/modules/$kver
  "$tree/bin/busybox" depmod -b "$tree" "$kver" # modules.dep is made at install time, which this is not
  order=()
  load_order() { # MODULE-PATH (as in modules.dep): its dependencies first, each module once
    local m=$1 d
    for d in "${order[@]}"; do [ "$d" = "$m" ] && return; done
    for d in $(awk -v m="$m:" '$1 == m { $1 = ""; print }' "$moddir/modules.dep"); do load_order "$d"; done
    order+=("$m")
  }
  for name in "${modules[@]}"; do
    path=$(awk -F: -v n="$name" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko(\.xz)?$/, "", f); if (f == n) { print $1; exit } }' "$moddir/modules.dep")
    [ -n "$path" ] || die "kernel $kver has no module $name (built in? see $tree/boot/config-$kver)"
    load_order "$path"
  done
  for m in "${order[@]}"; do # plain .ko: busybox insmod may not read compressed ones
    base=$(basename "$m" .xz)
    case $m in *.xz) "$tree/bin/busybox" xz -dc "$moddir/$m" >"$kit/modules/$base" ;; *) cp "$moddir/$m" "$kit/modules/$base" ;; esac
    echo "$base" >>"$kit/modules/modules.list"
  done
  echo "$kver" >"$kit/kernel-version"
  rm -rf "$kit/debs" "$tree/lib/modules" "$tree/usr/share" # 500 MB unpacked, of which the guest needs 20
  echo "$recipe" >"$kit/.complete"
fi
kver=$(cat "$kit/kernel-version")
vmlinuz=$tree/boot/vmlinuz-$kver
bb=$tree/bin/busybox

# initramfs: busybox, /init, mke2fs, e2fsck and GNU dd (in /sbin) with the libraries ldd names, the modules in load
# order (/modules.list)
work=$(mktemp -d "${TMPDIR:-/tmp}/qdedup-guest.XXXXXX")
cleanup() {
  [ -n "${qpid:-}" ] && kill -KILL "$qpid" 2>/dev/null
  [ -n "${spid:-}" ] && kill -TERM "$spid" 2>/dev/null && wait "$spid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
ird=$work/initramfs
mkdir -p "$ird"/{bin,sbin,etc,lib,lib64,lib/x86_64-linux-gnu}
cp "$bb" "$ird/bin/busybox"
cp "$here/init" "$ird/init"
chmod 755 "$ird/init"
cp "$tree/etc/mke2fs.conf" "$ird/etc/"
for prog in sbin/mke2fs sbin/e2fsck bin/dd; do
  cp "$tree/$prog" "$ird/sbin/"
  for so in $(ldd "$tree/$prog" | awk '/=>/ { print $1 } /ld-linux/ && !/=>/ { print $1 }'); do
    name=$(basename "$so")
    src=$(find "$tree/lib" "$tree/usr/lib" "$tree/lib64" -name "$name" 2>/dev/null | head -n 1)
    [ -n "$src" ] || die "$prog needs $name, which none of the fetched packages has"
    if [[ $name == ld-linux* ]]; then cp -L "$src" "$ird/lib64/$name"; else cp -L "$src" "$ird/lib/x86_64-linux-gnu/$name"; fi
  done
done
cp -r "$kit/modules" "$ird/lib/modules"
mv "$ird/lib/modules/modules.list" "$ird/modules.list"
(cd "$ird" && find . | sort | "$bb" cpio -o -H newc 2>/dev/null) >"$work/initrd.cpio"

# --- the server ------------------------------------------------------------------------------------------------
t0=$(date +%s)
[ -z "$dir" ] || mkdir -p "$dir"
if [ -n "$server" ]; then
  dir=${dir:-$work}
  img=$dir/disk.qcow2
  sock=$dir/nbd.sock
  rm -f "$img" "$img.qdedup-index" "$sock"
  if [ "$server" = qdedup ]; then
    "$QDEDUP" create --dedup "$img" "$size" >/dev/null
    "$QDEDUP" serve --dedup --socket "$sock" --metrics "$dir/metrics.json" "$img" </dev/null >"$dir/server.log" 2>&1 & spid=$!
  else
    qemu-img create -q -f qcow2 -o cluster_size=4k "$img" "$size"
    qemu-nbd -t --cache=writeback --aio=threads --discard=unmap -f qcow2 --socket="$sock" "$img" </dev/null >"$dir/server.log" 2>&1 & spid=$!
  fi
  for _ in $(seq 600); do
    kill -0 "$spid" 2>/dev/null || { cat "$dir/server.log" >&2; die "$server exited before serving"; }
    if [ -S "$sock" ] && { [ "$server" = qemu-nbd ] || grep -q '^qdedup: serving ' "$dir/server.log"; }; then break; fi
    sleep 0.1
  done
  [ -S "$sock" ] || die "$server not serving after 60 s"
  uri="nbd+unix:///?socket=$sock"
fi

# --- the guest -------------------------------------------------------------------------------------------------
console=${dir:-$work}/console.log # kept with --dir
: >"$console"
log "booting $kver under TCG on $uri (at most $timeout s)"
tg=$(date +%s)
set +e
# RAM: the reference files live in it (rootfs), 29 MiB per unit of scale
timeout -k 10 "$timeout" qemu-system-x86_64 -accel tcg -smp 2 -m $((448 + 64 * scale)) -nodefaults -display none -no-reboot \
  -kernel "$vmlinuz" -initrd "$work/initrd.cpio" -append "console=ttyS0 panic=-1 quiet loglevel=1 qdedup.scale=$scale" \
  -serial "file:$console" \
  -drive "file=$uri,format=raw,if=virtio,cache=none,discard=unmap" </dev/null >"$work/qemu.log" 2>&1 & qpid=$!
wait "$qpid"; qrc=$?
set -e
qpid=""
guest_seconds=$(($(date +%s) - tg))
mapfile -t results < <(tr -d '\r' <"$console" | grep -a '^QDEDUP-GUEST: ')
show_console() { log "qemu exit $qrc; qemu said:"; cat "$work/qemu.log" >&2; log "console:"; tr -d '\r' <"$console" | tail -n 40 >&2; }
if [ ${#results[@]} -ne 1 ]; then
  show_console; die "expected one QDEDUP-GUEST line from the guest, got ${#results[@]} (qemu exit $qrc; 124: timed out)"
fi
tr -d '\r' <"$console" | grep -a '^guest: ' >&2 || true # what the guest saw: its disk, the requests it sent
echo "${results[0]}"
[[ ${results[0]} =~ ^QDEDUP-GUEST:\ PASS\  ]] || { show_console; die "the guest failed"; }
[ "$qrc" = 0 ] || { show_console; die "qemu exited $qrc"; }
[ -n "$server" ] || exit 0

# --- after the guest: the image --------------------------------------------------------------------------------
kill -TERM "$spid"
src=0; wait "$spid" || src=$?
spid=""
[ "$src" = 0 ] || { cat "$dir/server.log" >&2; die "$server exited $src after SIGTERM"; }
qemu-img check -q "$img" || die "qemu-img check $img is not clean"
if [ "$server" = qdedup ]; then
  log "qdedup counters: $(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(" ".join("%s=%s" % (k, m[k]) for k in
    ("reads", "writes", "flushes", "trims", "zero-writes", "dedup-hits", "dedup-misses", "unaligned-rmw", "shared-clusters")))' "$dir/metrics.json")"
fi
qemu-img convert -f qcow2 -O raw "$img" "$work/disk.raw"
read -r stored distinct < <(python3 - "$img" "$work/disk.raw" <<'EOF'
import hashlib, json, subprocess, sys
cs = 4096
img, raw = sys.argv[1], sys.argv[2]
stored = set()
for e in json.loads(subprocess.run(["qemu-img", "map", "--output=json", img], check=True, capture_output=True).stdout):
    if e["data"] and "offset" in e:
        stored.update(range(e["offset"] // cs, (e["offset"] + e["length"] + cs - 1) // cs))
distinct = set()
with open(raw, "rb") as f:
    while block := f.read(cs):
        if block.strip(b"\0"):
            distinct.add(hashlib.sha256(block).digest())
print(len(stored), len(distinct))
EOF
)
rm -f "$work/disk.raw"
echo "guest-result: server=$server pass=yes check=clean seconds=$(($(date +%s) - t0)) guest-seconds=$guest_seconds stored-clusters=$stored distinct-nonzero-clusters=$distinct"
if [ "$server" = qdedup ] && [ "$stored" != "$distinct" ]; then
  die "qdedup stores $stored clusters for $distinct distinct non-zero ones"
fi
