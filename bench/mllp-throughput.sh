#!/usr/bin/env bash
# Issue 3, benchmark 3: MLLP with 8 connections, each waiting for its ACK.
#
#   bench/mllp-throughput.sh [--messages N] [--connections N]
#
# `clinflow serve --demo --mllp-listen` on a fresh SQLite database;
# bench/mllp-load.py sends parse_bench's ORU^R01 messages (10 OBX each, each
# with its own MSH-10), one at a time per connection, and reports messages/s
# and the ACK latency (an AA is sent only once the message is stored). Then
# checks that every AA'd message is stored: the Observations counted in the
# store equal 10 per acknowledged message. The issue sets no peer for this
# one: the figures are reported as they are.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
trap cleanup EXIT

MESSAGES=5000
CONNECTIONS=8
while (($#)); do
    case $1 in
    --messages) MESSAGES=${2:?}; shift ;;
    --connections) CONNECTIONS=${2:?}; shift ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
CF_PORT=${BENCH_CLINFLOW_PORT:-18113}
MLLP_PORT=${BENCH_MLLP_PORT:-18114}

build_release
if [[ -z ${BENCH_NO_BUILD:-} ]]; then
    (cd "$ROOT" && cargo build --release -q -p clinflow-hl7v2 --example parse_bench) \
        || die "building parse_bench failed"
fi
MSGS=$WORK/messages.hl7
"$ROOT/target/release/examples/parse_bench" --count "$MESSAGES" --write "$MSGS" \
    || die "writing the messages failed"

SERVE_EXTRA=(--mllp-listen "127.0.0.1:$MLLP_PORT")
log "[sqlite] clinflow with MLLP on $MLLP_PORT (load $(loadavg))"
start_clinflow "sqlite://$WORK/clinflow.db" "$CF_PORT" "$WORK/clinflow.log"
pid=${STARTED_PIDS[-1]}
before=$(count_observations "$CF_PORT")
out=$WORK/mllp.json
python3 "$ROOT/bench/mllp-load.py" 127.0.0.1 "$MLLP_PORT" "$MSGS" --connections "$CONNECTIONS" >"$out" \
    || die "the MLLP load failed"
after=$(count_observations "$CF_PORT")
peak=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
python3 - "$out" "$((after - before))" "$peak" "$CONNECTIONS" "$(loadavg)" <<'PY'
import json, sys
path, stored, peak, conns, load = sys.argv[1:6]
r = json.load(open(path))
aa = r["acks"].get("AA", 0)
print(f"\nMLLP: {r['messages']} ORU^R01 messages (10 OBX each), {conns} connections, each waiting for its ACK")
print(f"  {r['messages_per_s']:.0f} messages/s ({r['messages_per_s'] * 10:.0f} Observations/s), "
      f"ACK p50 {r['ack_p50_ms']} ms, p99 {r['ack_p99_ms']} ms, max {r['ack_max_ms']} ms")
print(f"  ACKs {r['acks']}, {r['failures']} connections closed without an ACK, peak RSS {int(peak)//1024} MiB, load {load}")
print(f"  stored: {stored} Observations for {aa} AA'd messages")
if int(stored) != 10 * aa:
    raise SystemExit(f"error: {aa} messages acknowledged AA but {stored} Observations stored (expected {10 * aa})")
PY
