#!/usr/bin/env bash
# qdedup serve --dedup against qemu-nbd on 4 KiB-cluster qcow2 images, one run, same machine:
#  1. fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=16 --size=SIZE --runtime=RUNTIME --dedupe_percentage=30
#  2. nbdcopy of a SIZE random raw file into the export, then out of it (MB/s): ROUNDS (default 5) rounds,
#     the servers alternating, medians
# Prints IOPS and throughput of both and the ratios (goals: IOPS >= 1.5x qemu-nbd's, nbdcopy >= qemu-nbd's).
# Environment: BENCH_DIR (default /tmp/qdedup-bench), SIZE (default 1G), RUNTIME (default 30), QDEDUP.
set -euo pipefail
root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/qdedup-bench}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-30}
QDEDUP=${QDEDUP:-$root/bin/qdedup}
mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
log() { echo "nbd-bench: $*" >&2; }
"$QDEDUP" --version >/dev/null
bytes=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
[ -s "nbd-src-$SIZE.raw" ] || head -c "$bytes" /dev/urandom > "nbd-src-$SIZE.raw"
sock="$BENCH_DIR/nbd-bench.sock"

start_server() { # tool image
  rm -f "$sock"
  if [ "$1" = qemu ]; then
    qemu-nbd -t --cache=writeback --aio=threads --discard=unmap -f qcow2 --socket="$sock" "$2" </dev/null >/dev/null & pid=$!
  else
    "$QDEDUP" serve --dedup --socket "$sock" "$2" </dev/null >/dev/null & pid=$!
  fi
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
}
stop_server() { kill -TERM "$pid"; wait "$pid" || true; }
trap 'kill -TERM "${pid:-}" 2>/dev/null || true' EXIT
fresh() { rm -f "$1" "$1.qdedup-index"; qemu-img create -q -f qcow2 -o cluster_size=4k "$1" "$SIZE"; }
uri="nbd+unix:///?socket=$sock"

declare -A iops
for tool in qemu qdedup; do
  img="nbd-$tool.qcow2"
  fresh "$img"; start_server "$tool" "$img"
  out=$(fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 --size="$SIZE" \
        --runtime="$RUNTIME" --time_based=0 --dedupe_percentage=30 --randseed=11 --output-format=json)
  # fio's nbd engine prints a line before the JSON
  iops[$tool]=$(python3 -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['write']['iops']))" <<<"$out")
  stop_server
  log "$tool: fio randwrite ${iops[$tool]} IOPS"
done

# nbdcopy in and out, ROUNDS rounds, the two servers alternating (which goes first alternates too): medians.
ROUNDS=${ROUNDS:-5}
declare -A ins outs
for round in $(seq "$ROUNDS"); do
  order="qemu qdedup"; [ $((round % 2)) = 0 ] && order="qdedup qemu"
  for tool in $order; do
    img="nbd-$tool.qcow2"
    fresh "$img"; start_server "$tool" "$img"
    t0=$(date +%s.%N); nbdcopy "nbd-src-$SIZE.raw" "$uri"; t1=$(date +%s.%N)
    rm -f "nbd-out.raw"; nbdcopy "$uri" "nbd-out.raw"; t2=$(date +%s.%N)
    stop_server
    cmp -s "nbd-src-$SIZE.raw" nbd-out.raw || { log "$tool: data read back differs"; exit 1; }
    qemu-img check -q "$img" || { log "$tool: qemu-img check failed"; exit 1; }
    i=$(python3 -c "print(round($bytes/1e6/($t1-$t0)))"); o=$(python3 -c "print(round($bytes/1e6/($t2-$t1)))")
    ins[$tool]="${ins[$tool]:-} $i"; outs[$tool]="${outs[$tool]:-} $o"
    log "round $round $tool: nbdcopy in $i MB/s, out $o MB/s"
  done
done
rm -f nbd-out.raw "$sock"
median() { python3 -c "import statistics,sys; print(round(statistics.median(map(float, sys.argv[1:]))))" $1; }
printf '%-28s %12s %12s %8s\n' measure qemu-nbd qdedup ratio
printf '%-28s %12s %12s %8s\n' "fio randwrite 4k IOPS" "${iops[qemu]}" "${iops[qdedup]}" "$(python3 -c "print('%.2f' % (${iops[qdedup]}/${iops[qemu]}))")"
for m in in out; do
  if [ $m = in ]; then q=$(median "${ins[qemu]}"); d=$(median "${ins[qdedup]}"); else q=$(median "${outs[qemu]}"); d=$(median "${outs[qdedup]}"); fi
  printf '%-28s %12s %12s %8s\n' "nbdcopy $m MB/s (median of $ROUNDS)" "$q" "$d" "$(python3 -c "print('%.2f' % ($d/$q))")"
done
