#!/usr/bin/env bash
# Times `bin/qdedup convert -O raw SRC DST` against `qemu-img convert -O raw SRC DST`
# on the same qcow2 images, cold page cache, alternating order, medians over RUNS runs.
#
# Usage: bench/convert-raw.sh            (see bench/README.md)
# Environment:
#   BENCH_DIR  work dir for cached images and outputs (default /tmp/qdedup-bench)
#   RUNS       timed runs per image (default 5)
#   SIZE_MB    virtual size of the images in MiB (default 1024)
#   IMAGES     which images, space separated, from: c64k c4k z64k (default all three)
#   SEED       layout seed of the generated source (default 42)
#   SETTLE     seconds to wait after dropping the page cache before each timed run (default 3): on a VM with free page
#              reporting (virtio-balloon) the pages drop_caches frees stay backed by the host for ~2 s, then go back
#              to it; a run started inside that window is faster than a real cold start, one started as the pages
#              go back is slowed at an arbitrary point (see bench/README.md). 0 times right after the drop.
#   QEMU_IMG   qemu-img binary (default qemu-img)
#   QDEDUP     qdedup launcher (default: a frozen copy of <repo>/bin/qdedup and its jar, see SNAPSHOT)
#   SNAPSHOT   1 (default): time a copy of bin/ + target/qdedup.jar + target/lib made after the build, so edits
#              under src/ during the runs cannot rebuild or replace the jar mid-benchmark; 0: bin/qdedup
set -euo pipefail

root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/qdedup-bench}
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-1024}
IMAGES=${IMAGES:-"c64k c4k z64k"}
SEED=${SEED:-42}
SETTLE=${SETTLE:-3}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QDEDUP_SET=${QDEDUP:-}
QDEDUP=${QDEDUP:-$root/bin/qdedup}

die() { echo "convert-raw: $*" >&2; exit 1; }
log() { echo "convert-raw: $*" >&2; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer (got '$RUNS')"
[[ $SIZE_MB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB must be a positive integer (got '$SIZE_MB')"
[[ $SETTLE =~ ^[0-9]+([.][0-9]+)?$ ]] || die "SETTLE must be a number of seconds (got '$SETTLE')"
command -v "$QEMU_IMG" >/dev/null || die "qemu-img not found"
command -v python3 >/dev/null || die "python3 not found"
[ -x "$QDEDUP" ] || die "$QDEDUP is not executable"
mkdir -p "$BENCH_DIR"

# ---------------------------------------------------------------- source images
gen=v1                                   # bump when the generator changes
raw="$BENCH_DIR/src-${SIZE_MB}M-s${SEED}-$gen.raw"

make_raw() {
  local tarsrc="$BENCH_DIR/tree-$gen.tar"
  if [ ! -s "$tarsrc" ]; then
    log "building text corpus $tarsrc (tar of /usr/include, /usr/share/doc, capped at 128 MiB)"
    tar -cf - /usr/include /usr/share/doc /usr/lib/python3* 2>/dev/null | head -c $((128 << 20)) >"$tarsrc.tmp" || true
    mv "$tarsrc.tmp" "$tarsrc"
  fi
  log "generating $raw ($SIZE_MB MiB)"
  python3 - "$raw.tmp" "$SIZE_MB" "$SEED" "$tarsrc" <<'PY'
import base64, os, random, sys
path, size_mb, seed, tarsrc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
size = size_mb << 20
rng = random.Random(seed)
try:
    tar = open(tarsrc, 'rb').read()
except OSError:
    tar = b''
if len(tar) < (1 << 20):            # no usable corpus: fall back to base64 text
    tar = base64.encodebytes(os.urandom(16 << 20))
G = 4096
def rnd(n): return os.urandom(n)
def b64(n):                          # text-like, ~75% of entropy, lines of 76 chars
    return base64.encodebytes(os.urandom(n * 3 // 4 + 64))[:n]
def tarslice(n):                     # real files: source headers, docs, python, some .gz
    off = rng.randrange(0, max(1, len(tar) - n)) & ~511
    d = tar[off:off + n]
    while len(d) < n: d += tar[:n - len(d)]
    return d
def logs(n):                         # very repetitive log lines
    out, i = [], rng.randrange(1 << 20)
    while sum(map(len, out)) < n:
        i += 1
        out.append(b'2024-05-%02d 12:%02d:%02d host%d kernel: eth0: link up, %d Mbps, seq=%d\n'
                   % (i % 28 + 1, i % 60, (i * 7) % 60, i % 3, 1000, i))
    return b''.join(out)[:n]
def mixed(n):                        # 4 KiB granules: data and zeros interleaved
    out = bytearray(n)
    for g in range(0, n, G):
        r = rng.random()
        if r < 0.45: continue
        out[g:g + G] = (rnd if r < 0.7 else tarslice)(min(G, n - g))
    return bytes(out)
def partial(n):                      # data followed by zero tail inside each 64 KiB
    out = bytearray(n)
    for c in range(0, n, 65536):
        k = rng.randrange(1, 16) * G
        out[c:c + min(k, n - c)] = b64(min(k, n - c))
    return bytes(out)
kinds = [('zero', 0.28), ('random', 0.25), ('tar', 0.20), ('b64', 0.09),
         ('logs', 0.06), ('mixed', 0.08), ('partial', 0.04)]
fill = {'random': rnd, 'tar': tarslice, 'b64': b64, 'logs': logs, 'mixed': mixed, 'partial': partial}
names, weights = zip(*kinds)
stats = dict.fromkeys(names, 0)
with open(path, 'wb') as f:
    f.truncate(size)
    pos = 0
    while pos < size:
        k = rng.choices(names, weights)[0]
        # segment length: 4 KiB .. 8 MiB, log-uniform, 4 KiB aligned; some start unaligned to 64 KiB
        n = min(size - pos, max(G, int(2 ** rng.uniform(12, 23)) & ~(G - 1)))
        stats[k] += n
        if k != 'zero':
            f.seek(pos)
            CH = 1 << 20
            for o in range(0, n, CH):
                f.write(fill[k](min(CH, n - o)))
        pos += n
print('  layout: ' + ', '.join('%s %.0f%%' % (k, 100 * v / size) for k, v in stats.items()), file=sys.stderr)
PY
  mv "$raw.tmp" "$raw"
}

img_path() { echo "$BENCH_DIR/img-${SIZE_MB}M-s${SEED}-$gen-$1.qcow2"; }
img_desc() {
  case $1 in
    c64k) echo "qcow2 64k" ;;
    c4k)  echo "qcow2 4k" ;;
    z64k) echo "qcow2 64k compressed" ;;
    *) die "unknown image '$1' (c64k c4k z64k)" ;;
  esac
}
make_img() {
  local id=$1 out; out=$(img_path "$id")
  [ -s "$out" ] && return 0
  [ -s "$raw" ] || make_raw
  log "creating $out"
  case $id in
    c64k) "$QEMU_IMG" convert -f raw -O qcow2 -o cluster_size=65536 "$raw" "$out.tmp" ;;
    c4k)  "$QEMU_IMG" convert -f raw -O qcow2 -o cluster_size=4096 "$raw" "$out.tmp" ;;
    z64k) "$QEMU_IMG" convert -c -f raw -O qcow2 -o cluster_size=65536 "$raw" "$out.tmp" ;;
  esac
  mv "$out.tmp" "$out"
}

for id in $IMAGES; do img_desc "$id" >/dev/null; make_img "$id"; done

# ---------------------------------------------------------------- timing
log "building qdedup (bin/qdedup --version)"
"$QDEDUP" --version >/dev/null || die "bin/qdedup --version failed"

# Freeze the build: run the same launcher from a copy holding only bin/, pom.xml, the jar and target/lib, so an edit
# under src/ during the benchmark can neither trigger a rebuild inside a timed run nor swap the jar.
if [ "${SNAPSHOT:-1}" = 1 ] && [ -z "${QDEDUP_SET:-}" ]; then
  snap="$BENCH_DIR/snapshot"
  rm -rf "$snap"; mkdir -p "$snap/target"
  cp -p "$root/pom.xml" "$snap/"; cp -pr "$root/bin" "$snap/"
  cp -p "$root/target/qdedup.jar" "$snap/target/"
  [ -d "$root/target/lib" ] && cp -pr "$root/target/lib" "$snap/target/"
  touch -r "$root/target/qdedup.jar" "$snap/target/qdedup.jar"
  QDEDUP="$snap/bin/qdedup"
  "$QDEDUP" --version >/dev/null || die "snapshot launcher $QDEDUP failed"
  log "timing a frozen copy of the jar: $QDEDUP ($(stat -c %y "$snap/target/qdedup.jar" | cut -d. -f1))"
fi

load_warn() {
  local l; l=$(cut -d' ' -f1 /proc/loadavg)
  if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 0.7 else 1)" "$l"; then
    log "WARNING: load average $l $1: something else is using the CPU, timings will be noisy"
  fi
}
load_warn "before the runs"

cold=1
sync
if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
  log "WARNING: cannot drop page caches (need root); timings are warm-cache"
  cold=0
fi
drop_caches() {
  sync
  if [ "$cold" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; sleep "$SETTLE"; fi
}

now() { date +%s.%N; }
# time_one TOOL SRC DST -> prints elapsed seconds; dies if the tool fails
time_one() {
  local tool=$1 src=$2 dst=$3 t0 t1 rc=0 err="$BENCH_DIR/stderr.txt" cpu="$BENCH_DIR/cpu.txt"
  rm -f "$dst"
  drop_caches
  t0=$(now)
  if [ "$tool" = qemu ]; then
    /usr/bin/time -f '%U %S' -o "$cpu" "$QEMU_IMG" convert -O raw "$src" "$dst" 2>"$err" || rc=$?
  else
    /usr/bin/time -f '%U %S' -o "$cpu" "$QDEDUP" convert -O raw "$src" "$dst" 2>"$err" || rc=$?
  fi
  t1=$(now)
  if [ "$rc" != 0 ]; then
    cat "$err" >&2
    die "FAILED: $tool convert -O raw $src $dst (exit $rc)"
  fi
  # "wall,cpu" where cpu = user + sys seconds (less sensitive than wall time to other load on the machine)
  python3 -c "import sys; u, s = map(float, open(sys.argv[3]).read().split()[-2:]); print('%.3f,%.2f' % (float(sys.argv[2]) - float(sys.argv[1]), u + s))" "$t0" "$t1" "$cpu"
}

results="$BENCH_DIR/results.txt"
: >"$results"
log "RUNS=$RUNS SIZE_MB=$SIZE_MB SETTLE=$SETTLE images: $IMAGES"
for id in $IMAGES; do
  src=$(img_path "$id")
  dq="$BENCH_DIR/out-qemu.raw"; dd="$BENCH_DIR/out-qdedup.raw"
  qs=(); ds=()
  for ((r = 1; r <= RUNS; r++)); do
    if ((r % 2)); then order="qemu qdedup"; else order="qdedup qemu"; fi
    for tool in $order; do
      if [ "$tool" = qemu ]; then t=$(time_one qemu "$src" "$dq"); qs+=("$t")
      else t=$(time_one qdedup "$src" "$dd"); ds+=("$t"); fi
    done
    log "$(img_desc "$id") run $r/$RUNS: wall,cpu seconds: qemu-img ${qs[-1]}, qdedup ${ds[-1]} (load $(cut -d" " -f1 /proc/loadavg))"
    if ((r == 1)); then
      if ! cmp "$dq" "$dd" >&2; then
        die "OUTPUTS DIFFER for $(img_desc "$id") ($src): kept $dq and $dd"
      fi
      log "$(img_desc "$id"): outputs byte-identical"
    fi
    rm -f "$dq" "$dd"
  done
  echo "$(img_desc "$id")|${qs[*]}|${ds[*]}" >>"$results"
done

python3 - "$results" "$cold" "$RUNS" "$SIZE_MB" "$SETTLE" <<'PY'
import statistics, sys
path, cold, runs, size, settle = sys.argv[1], sys.argv[2] == '1', sys.argv[3], sys.argv[4], sys.argv[5]
def med(field, i): return statistics.median(float(x.split(',')[i]) for x in field.split())
rows = []
for line in open(path):
    name, q, d = line.rstrip('\n').split('|')
    rows.append((name, med(q, 0), med(d, 0), med(q, 1), med(d, 1)))
print('convert -O raw, %s MiB virtual, %s runs, %s cache (settle %s s), medians' % (size, runs, 'cold' if cold else 'WARM', settle))
print('%-22s %11s %11s %7s  %11s %11s' % ('image', 'qemu-img s', 'qdedup s', 'ratio', 'qemu cpu s', 'qdedup cpu s'))
for n, mq, md, cq, cd in rows:
    r = md / mq if mq else float('inf')
    print('%-22s %11.3f %11.3f %7.2f  %11.2f %11.2f%s' % (n, mq, md, r, cq, cd, '' if r <= 1.0 else '   ratio > 1.0'))
PY
