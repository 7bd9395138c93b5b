#!/usr/bin/env bash
# Issue 3, benchmark 4: a burst of 10x the sustainable ingest rate for 30 s.
#
#   bench/ingest-burst.sh [--sustainable MSGS_PER_S] [--seconds 30] [--factor 10]
#
# 1. Measures the sustainable rate (closed loop, bench/ingest-load.py, 8
#    clients) unless --sustainable gives it, in messages/s.
# 2. On a fresh server, sends posts of 100 ORU^R01 messages open-loop at
#    factor x that rate for --seconds (ingest-load.py --rate): what the
#    queue cannot take is answered 429 and counted as refused.
# 3. Reports the server's peak RSS (VmHWM) and checks that every message of
#    every accepted post is stored exactly once: the batches' stored counts
#    sum to the accepted messages, and the store holds 10 Observations each.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
trap cleanup EXIT

SUSTAINABLE=
SECONDS_BURST=30
FACTOR=10
while (($#)); do
    case $1 in
    --sustainable) SUSTAINABLE=${2:?}; shift ;;
    --seconds) SECONDS_BURST=${2:?}; shift ;;
    --factor) FACTOR=${2:?}; shift ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
CF_PORT=${BENCH_CLINFLOW_PORT:-18115}
PER_POST=100

build_release
if [[ -z ${BENCH_NO_BUILD:-} ]]; then
    (cd "$ROOT" && cargo build --release -q -p clinflow-hl7v2 --example parse_bench) \
        || die "building parse_bench failed"
fi

if [[ -z $SUSTAINABLE ]]; then
    "$ROOT/target/release/examples/parse_bench" --count 5000 --write "$WORK/warm.hl7" >/dev/null
    start_clinflow "sqlite://$WORK/sustain.db" "$CF_PORT" "$WORK/sustain.log"
    python3 "$ROOT/bench/ingest-load.py" "http://127.0.0.1:$CF_PORT" "$WORK/warm.hl7" \
        --token "$TOKEN" >"$WORK/sustain.json" || die "the sustainable-rate run failed"
    stop_pid "${STARTED_PIDS[-1]}"
    SUSTAINABLE=$(python3 -c "import json; d=json.load(open('$WORK/sustain.json')); print(int(d['stored'] / d['done_seconds']))")
    log "sustainable: $SUSTAINABLE messages/s ($(cat "$WORK/sustain.json"))"
fi
RATE=$(python3 -c "print($SUSTAINABLE * $FACTOR / $PER_POST)")
COUNT=$(python3 -c "print(int($SUSTAINABLE * $FACTOR * $SECONDS_BURST))")
"$ROOT/target/release/examples/parse_bench" --count "$COUNT" --write "$WORK/burst.hl7" >/dev/null
log "burst: $COUNT messages at $RATE posts/s of $PER_POST for $SECONDS_BURST s (load $(loadavg))"
start_clinflow "sqlite://$WORK/burst.db" "$CF_PORT" "$WORK/burst.log"
pid=${STARTED_PIDS[-1]}
before=$(count_observations "$CF_PORT")
python3 "$ROOT/bench/ingest-load.py" "http://127.0.0.1:$CF_PORT" "$WORK/burst.hl7" --token "$TOKEN" \
    --per-post "$PER_POST" --rate "$RATE" >"$WORK/burst.json" || die "the burst failed"
after=$(count_observations "$CF_PORT")
peak=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
python3 - "$WORK/burst.json" "$((after - before))" "$peak" "$SUSTAINABLE" "$FACTOR" <<'PY'
import json, sys
path, stored_obs, peak, sustainable, factor = sys.argv[1:6]
r = json.load(open(path))
print(f"\nburst: {factor}x the sustainable {sustainable} messages/s for the posts' duration "
      f"({r['posts']} posts of 100 messages, sent in {r['accepted_seconds']} s)")
print(f"  accepted {r['batches']} posts ({r['accepted_messages']} messages), refused with 429: {r['refused_429']}, "
      f"errors: {r['errors']} {r['first_errors']}")
print(f"  all accepted batches done after {r['done_seconds']} s; post p50 {r['post_p50_ms']} ms, p99 {r['post_p99_ms']} ms")
print(f"  peak RSS {int(peak) // 1024} MiB")
print(f"  stored {r['stored']} messages, {r['duplicates']} duplicates, {r['rejected']} rejected; {stored_obs} Observations")
ok = r["errors"] == 0 and r["stored"] == r["accepted_messages"] and int(stored_obs) == 10 * r["accepted_messages"]
print(f"  every acknowledged message stored once: {'yes' if ok else 'NO'}")
if not ok:
    raise SystemExit(1)
PY
