#!/usr/bin/env bash
# Times `bin/qdedup convert -O qcow2` against `qemu-img convert -O qcow2` (same -t, same cluster size) on
# 1 GiB of random data and on a real-data disk image (ext4 made by mke2fs -d over directory trees, sparse).
# Cold page cache per run, alternating order, medians; prints qdedup/qemu ratios (goal <= 1.0).
#
# Environment: BENCH_DIR (default /tmp/qdedup-bench), RUNS (default 5), SIZE_MB (default 1024),
#   CLUSTERS (default "65536 4096"), CACHE (-t for both tools, default writeback), SOURCES (default "random ext4"),
#   DEDUP=1: qdedup converts with --dedup (qemu-img as before, same cluster size; CLUSTERS defaults to 4096),
#   SETTLE (seconds after each cache drop before the timed run, default 3: see convert-raw.sh and bench/README.md)
set -euo pipefail
root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/qdedup-bench}
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-1024}
DEDUP=${DEDUP:-0}
if [ "$DEDUP" = 1 ]; then CLUSTERS=${CLUSTERS:-4096}; else CLUSTERS=${CLUSTERS:-"65536 4096"}; fi
dedup_flag=(); [ "$DEDUP" = 1 ] && dedup_flag=(--dedup)
CACHE=${CACHE:-writeback}
SETTLE=${SETTLE:-3}
[[ $SETTLE =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "convert-qcow2: SETTLE must be a number of seconds (got '$SETTLE')" >&2; exit 1; }
SOURCES=${SOURCES:-"random ext4"}
QDEDUP=${QDEDUP:-$root/bin/qdedup}
mkdir -p "$BENCH_DIR"
log() { echo "convert-qcow2: $*" >&2; }

src_path() { echo "$BENCH_DIR/$1-${SIZE_MB}M.raw"; }
make_src() {
  local out; out=$(src_path "$1")
  [ -s "$out" ] && return 0
  case $1 in
    random)
      log "generating $out from /dev/urandom"
      head -c $((SIZE_MB << 20)) /dev/urandom >"$out.tmp" ;;
    ext4)
      command -v mke2fs >/dev/null || { log "mke2fs missing: apt-get install -y e2fsprogs"; exit 1; }
      local tree="$BENCH_DIR/ext4-tree"
      rm -rf "$tree"; mkdir -p "$tree"
      # Real files, some trees twice (the way disks hold copies of the same things).
      cp -a /usr/include "$tree/include" 2>/dev/null || true
      cp -a /usr/share/doc "$tree/doc" 2>/dev/null || true
      cp -a /usr/include "$tree/include-copy" 2>/dev/null || true
      cp -a /usr/lib/python3* "$tree/" 2>/dev/null || true
      log "generating $out: ext4 over $(du -sh "$tree" | cut -f1) of files"
      rm -f "$out.tmp"
      mke2fs -q -t ext4 -d "$tree" "$out.tmp" "${SIZE_MB}M"
      rm -rf "$tree" ;;
  esac
  mv "$out.tmp" "$out"
}
for s in $SOURCES; do make_src "$s"; done
"$QDEDUP" --version >/dev/null

cold=1
drop() {
  sync
  if [ "$cold" = 1 ]; then
    if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then sleep "$SETTLE"; else cold=0; log "WARNING: warm cache (cannot drop caches)"; fi
  fi
}
run() { # tool src dst cluster -> seconds
  local tool=$1 src=$2 dst=$3 cs=$4 t0 t1
  rm -f "$dst"; drop
  t0=$(date +%s.%N)
  if [ "$tool" = qemu ]; then
    qemu-img convert -t "$CACHE" -f raw -O qcow2 -o cluster_size="$cs" "$src" "$dst"
  else
    "$QDEDUP" convert "${dedup_flag[@]}" -t "$CACHE" -f raw -O qcow2 -o cluster_size="$cs" "$src" "$dst"
  fi
  t1=$(date +%s.%N)
  python3 -c "import sys; print('%.3f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$t1"
}
median() { python3 -c "import sys, statistics; print('%.3f' % statistics.median(map(float, sys.argv[1:])))" "$@"; }

echo "cold cache, settle ${SETTLE} s, -t $CACHE, $RUNS runs, medians"
printf '%-10s %8s %12s %12s %8s\n' source cluster qemu-img_s qdedup_s ratio
for s in $SOURCES; do
  src=$(src_path "$s")
  for cs in $CLUSTERS; do
    q=(); d=()
    for i in $(seq 1 "$RUNS"); do
      if [ $((i % 2)) = 1 ]; then
        q+=("$(run qemu "$src" "$BENCH_DIR/out-q.qcow2" "$cs")"); d+=("$(run qdedup "$src" "$BENCH_DIR/out-d.qcow2" "$cs")")
      else
        d+=("$(run qdedup "$src" "$BENCH_DIR/out-d.qcow2" "$cs")"); q+=("$(run qemu "$src" "$BENCH_DIR/out-q.qcow2" "$cs")")
      fi
    done
    qemu-img check -q "$BENCH_DIR/out-d.qcow2" || { log "qemu-img check failed on our output"; exit 1; }
    qemu-img compare -q "$BENCH_DIR/out-d.qcow2" "$src" || { log "our output differs from the source"; exit 1; }
    mq=$(median "${q[@]}"); md=$(median "${d[@]}")
    printf '%-10s %8s %12s %12s %8s\n' "$s" "$cs" "$mq" "$md" "$(python3 -c "print('%.2f' % ($md / $mq))")"
    rm -f "$BENCH_DIR/out-q.qcow2" "$BENCH_DIR/out-d.qcow2"
  done
done
