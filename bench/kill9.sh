#!/usr/bin/env bash
# kill -9 of `qdedup serve --dedup` in the middle of a dedup workload, restart on the same image, verify.
#
# Each round: serve the image; run fio (--ioengine=nbd, --dedupe_percentage=70, iodepth 8) on [0, 32M) and a
# verifying writer (qemu-io, FUA writes of one-byte patterns into 64 KiB slots of [32M, 40M), one at a time: each
# "wrote" line is a durable write) on its own connection; kill -9 the server after a random 0.5..3 s; start it
# again (the dirty image is repaired at open); check that every slot holds its last durable pattern (clusters of
# the one write in flight may hold its pattern instead); stop the server (SIGTERM); qemu-img check must be clean.
#
#   ROUNDS=200 bench/kill9.sh          # default 20 rounds; WORK=DIR keeps the files there
#   KEEP=1: also keeps the image after each kill and after each verified round (WORK/crashed.N, verified.N)
set -euo pipefail
root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
qdedup="$root/bin/qdedup"
ROUNDS=${ROUNDS:-20}
work=${WORK:-$(mktemp -d /tmp/kill9.XXXXXX)}
mkdir -p "$work"
img=$work/k.qcow2
sock=$work/k.sock
uri="nbd+unix:///?socket=$sock"
SLOTS=128
SLOT=65536
BASE=$((32 << 20))
pid=

cleanup() {
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
}
trap cleanup EXIT

start_server() {
  rm -f "$sock" "$work/serve.out"
  "$qdedup" serve --socket "$sock" "$img" >"$work/serve.out" 2>>"$work/serve.err" &
  pid=$!
  for _ in $(seq 300); do
    if grep -q "^qdedup: serving" "$work/serve.out" 2>/dev/null; then
      return
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "kill9: the server did not start:" >&2
  cat "$work/serve.err" >&2
  exit 1
}

# holds PATTERN OFFSET LENGTH: whether the export holds that pattern there (exit 0), does not (1); dies on errors.
holds() {
  local out
  out=$(qemu-io -f raw -c "read -P $1 $2 $3" "$uri" 2>&1) || true
  if printf '%s\n' "$out" | grep -q "^Pattern verification failed"; then
    return 1
  fi
  if ! printf '%s\n' "$out" | grep -q "^read $3/$3 bytes at offset $2"; then
    echo "kill9: reading $3 bytes at $2 failed: $out" >&2
    exit 1
  fi
}

# Command n of round r writes pattern pat(n) into slot slot(n).
slot_of() { echo $(( ($1 * 37 + $2 * 11) % SLOTS )); }
pat_of() { echo $(( ($1 + $2 * 7) % 255 + 1 )); }

"$qdedup" create --dedup "$img" 64M >/dev/null
declare -a expect
for ((i = 0; i < SLOTS; i++)); do expect[i]=0; done
verified=0
writes=0
for ((round = 0; round < ROUNDS; round++)); do
  start_server
  fio --name=kill9 --thread --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --size=32M --iodepth=8 \
    --dedupe_percentage=70 --randseed=$((round + 1)) --time_based --runtime=60 --output=/dev/null >/dev/null 2>&1 &
  fio_pid=$!
  awk -v r="$round" -v S="$SLOTS" -v B="$BASE" -v L="$SLOT" 'BEGIN {
    for (n = 0; n < 200000; n++) printf "write -f -P %d %d %d\n", (n + r * 7) % 255 + 1, B + ((n * 37 + r * 11) % S) * L, L }' \
    >"$work/cmds"
  stdbuf -oL qemu-io -f raw "$uri" <"$work/cmds" >"$work/writer.log" 2>&1 &
  writer_pid=$!
  sleep "$(awk -v s=$RANDOM 'BEGIN { printf "%.2f", 0.5 + (s % 250) / 100 }')"
  kill -9 "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
  wait "$fio_pid" 2>/dev/null || true
  wait "$writer_pid" 2>/dev/null || true
  done_writes=$(grep -c "^.*wrote $SLOT/$SLOT bytes at offset" "$work/writer.log" || true)
  if [ -n "${KEEP:-}" ]; then
    cp "$img" "$work/crashed.$round.qcow2" # the state the kill left, for a post-mortem
  fi
  writes=$((writes + done_writes))
  # Acknowledged (FUA) writes are durable; the next one was in flight.
  declare -a alt
  for ((i = 0; i < SLOTS; i++)); do alt[i]=-1; done
  for ((n = 0; n < done_writes; n++)); do
    expect[$(slot_of $n $round)]=$(pat_of $n $round)
  done
  alt[$(slot_of $done_writes $round)]=$(pat_of $done_writes $round)
  start_server
  args=()
  for ((i = 0; i < SLOTS; i++)); do
    for ((k = 0; k < SLOT; k += 4096)); do
      args+=(-c "read -P ${expect[i]} $((BASE + i * SLOT + k)) 4k")
    done
  done
  out=$(qemu-io -f raw "${args[@]}" "$uri" 2>&1 || true)
  # A cluster that fails its durable pattern must hold the pattern of the write in flight.
  for off in $(printf '%s\n' "$out" | sed -n 's/^Pattern verification failed at offset \([0-9]*\),.*/\1/p'); do
    i=$(((off - BASE) / SLOT))
    if [ "${alt[i]}" -lt 0 ]; then
      echo "kill9: round $round: slot $i at offset $off lost its durable pattern ${expect[i]}" >&2
      exit 1
    fi
    if ! holds "${alt[i]}" "$off" 4096; then
      echo "kill9: round $round: slot $i at offset $off holds neither ${expect[i]} nor ${alt[i]}" >&2
      exit 1
    fi
  done
  if printf '%s\n' "$out" | grep -qv -e '^read ' -e 'ops;' -e '^Pattern verification failed'; then
    echo "kill9: round $round: verification read failed:" >&2
    printf '%s\n' "$out" | grep -v -e '^read ' -e 'ops;' | head -5 >&2
    exit 1
  fi
  # The in-flight write's slot now holds a mix: take what is there as the durable state of each cluster.
  if [ "${alt[$(slot_of $done_writes $round)]}" -ge 0 ]; then
    s=$(slot_of $done_writes $round)
    if ! holds "${alt[s]}" $((BASE + s * SLOT)) $SLOT; then
      if ! holds "${expect[s]}" $((BASE + s * SLOT)) $SLOT; then
        qemu-io -f raw -c "write -f -P ${expect[s]} $((BASE + s * SLOT)) $SLOT" "$uri" >/dev/null # make it uniform
      fi
    else
      expect[s]=${alt[s]}
    fi
  fi
  verified=$((verified + SLOTS * SLOT / 4096))
  kill -TERM "$pid"
  wait "$pid"
  pid=
  if ! qemu-img check "$img" >"$work/check.out" 2>&1; then
    echo "kill9: round $round: qemu-img check is not clean:" >&2
    cat "$work/check.out" >&2
    exit 1
  fi
  if [ -n "${KEEP:-}" ]; then
    cp "$img" "$work/verified.$round.qcow2"
  fi
  echo "round $round: killed after $done_writes durable writes; $((SLOTS * SLOT / 4096)) clusters verified; check clean"
done
echo "kill9: $ROUNDS rounds, $writes durable writes, $verified clusters verified: corruptions 0, flushed bytes lost 0"
