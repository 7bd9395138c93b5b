#!/usr/bin/env bash
# Issue 7: imaging.
#
#   bench/imaging.sh [store|parse|analysis|all] [--series N] [--per-series N]
#                    [--associations N] [--backlog N]
#
# 1. store: C-STORE ingest. The same instances (pydicom's CT_small.dcm made
#    into N series of M instances by tests/dicom/prepare.py, PatientID a demo
#    subject) sent by dcmtk's storescu over K associations at once (K
#    processes, whole series per association), into `clinflow serve --demo
#    --dicom-listen` (SQLite, analysis workers off: ingest only) and into
#    Orthanc (Debian package orthanc, its default SQLite index, storage in
#    the work folder), one after the other. Instances/s = instances / wall
#    time of the K senders; every instance must be stored (counted back).
# 2. parse: the same files plus pydicom's own samples parsed by
#    clinflow-imaging (`crates/imaging/examples/parse_bench.rs`) and by
#    pydicom.dcmread (`bench/dicom-parse.py`), files/s.
# 3. analysis: a backlog of B single-instance series (CT_small and MR_small,
#    alternating) ingested with workers
#    off, then `serve --imaging-workers 1` (and again, on a second copy, 2)
#    drains it: tasks/s from the first task done to the last; peak RSS of
#    the draining server (VmHWM), against the pixel-memory cap.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
trap cleanup EXIT

WHAT=all
SERIES=40
PER_SERIES=25
ASSOCIATIONS=4
BACKLOG=1000
while (($#)); do
    case $1 in
    store | parse | analysis | all) WHAT=$1 ;;
    --series) SERIES=${2:?}; shift ;;
    --per-series) PER_SERIES=${2:?}; shift ;;
    --associations) ASSOCIATIONS=${2:?}; shift ;;
    --backlog) BACKLOG=${2:?}; shift ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
CF_PORT=${BENCH_CLINFLOW_PORT:-18120}
CF_DICOM=${BENCH_CLINFLOW_DICOM_PORT:-18121}
OR_HTTP=${BENCH_ORTHANC_HTTP_PORT:-18122}
OR_DICOM=${BENCH_ORTHANC_DICOM_PORT:-18123}
PY=${BENCH_PYTHON:-$ROOT/target/test-venv/bin/python}
ORTHANC=${ORTHANC_BIN:-$(command -v Orthanc || echo /usr/sbin/Orthanc)}
SUBJECT=CARDIO-01-0001

command -v storescu >/dev/null || die "storescu is missing (Debian package dcmtk)"
"$PY" -c 'import pydicom' 2>/dev/null || die "$PY has no pydicom (scripts/test.sh makes target/test-venv)"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

build_release clinflow
if [[ -z ${BENCH_NO_BUILD:-} && ($WHAT == parse || $WHAT == all) ]]; then
    (cd "$ROOT" && cargo build --release -q -p clinflow-imaging --example parse_bench) \
        || die "building parse_bench failed"
fi

# prepare DIR SPECS...: prepare.py's manifest in DIR/manifest.json.
prepare() {
    local dir=$1
    shift
    "$PY" "$ROOT/tests/dicom/prepare.py" "$dir" "$@" >"$dir.manifest.json" \
        || die "prepare.py failed"
}

# send_all HOST PORT AE LISTS...: one storescu per list file, at once;
# prints the wall seconds. Fails if any storescu reports a failed store.
send_all() {
    local port=$1 ae=$2
    shift 2
    local start end pids=() i=0 f
    start=$(date +%s.%N)
    for f in "$@"; do
        storescu -aet BENCH -aec "$ae" 127.0.0.1 "$port" $(cat "$f") \
            >"$f.log" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || die "storescu failed (see $WORK)"; done
    end=$(date +%s.%N)
    for f in "$@"; do
        ! grep -qE "Store Failed|^E: " "$f.log" || { head -20 "$f.log" >&2; die "storescu reported failures"; }
    done
    python3 -c "print(f'{$end - $start:.3f}')"
}

start_orthanc() {
    local dir=$WORK/orthanc
    mkdir -p "$dir"
    cat >"$dir/orthanc.json" <<EOF
{
  "Name": "bench",
  "StorageDirectory": "$dir/storage",
  "IndexDirectory": "$dir/index",
  "HttpPort": $OR_HTTP,
  "DicomPort": $OR_DICOM,
  "DicomAet": "ORTHANC",
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomCheckCalledAet": false,
  "Plugins": []
}
EOF
    port_free "$OR_HTTP" || die "port $OR_HTTP is in use"
    "$ORTHANC" "$dir/orthanc.json" >"$dir/log" 2>&1 &
    STARTED_PIDS+=($!)
    local deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null "http://127.0.0.1:$OR_HTTP/system" 2>/dev/null; do
        ((SECONDS < deadline)) || { tail -20 "$dir/log" >&2; die "Orthanc did not start"; }
        sleep 0.2
    done
    ORTHANC_PID=${STARTED_PIDS[-1]}
}

# clinflow_instances: instances clinflow indexed (QIDO-RS study counts).
clinflow_instances() {
    curl -fsS -H "Authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$CF_PORT/dicomweb/studies?limit=1000" \
        | python3 -c 'import json,sys; print(sum(s["00201208"]["Value"][0] for s in json.load(sys.stdin)))'
}

bench_store() {
    local dir=$WORK/store specs=() i
    for ((i = 0; i < SERIES; i++)); do
        specs+=("CT_small.dcm:$SUBJECT:study$((i % 10)):$PER_SERIES")
    done
    log "preparing $((SERIES * PER_SERIES)) instances ($SERIES series)..."
    prepare "$dir" "${specs[@]}"
    # Whole series per association, round robin.
    python3 - "$dir.manifest.json" "$ASSOCIATIONS" "$WORK/list" <<'EOF'
import json, sys
manifest, k, prefix = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
series = sorted({m["series"] for m in manifest})
lists = [[] for _ in range(k)]
for m in manifest:
    lists[series.index(m["series"]) % k].append(m["file"])
for i, l in enumerate(lists):
    open(f"{prefix}.{i}", "w").write("\n".join(l))
EOF
    local lists=() total
    for ((i = 0; i < ASSOCIATIONS; i++)); do lists+=("$WORK/list.$i"); done
    total=$((SERIES * PER_SERIES))

    SERVE_EXTRA=(--dicom-listen "127.0.0.1:$CF_DICOM" --imaging-workers 0)
    log "[store] clinflow (load $(loadavg))"
    start_clinflow "sqlite://$WORK/store-clinflow.db" "$CF_PORT" "$WORK/clinflow-store.log"
    local cf_s cf_n
    cf_s=$(send_all "$CF_DICOM" CLINFLOW "${lists[@]}")
    cf_n=$(clinflow_instances)
    ((cf_n == total)) || die "clinflow stored $cf_n of $total instances"
    stop_pid "${STARTED_PIDS[-1]}"

    log "[store] Orthanc (load $(loadavg))"
    start_orthanc
    local or_s or_n
    or_s=$(send_all "$OR_DICOM" ORTHANC "${lists[@]}")
    or_n=$(curl -fsS "http://127.0.0.1:$OR_HTTP/statistics" | json_get CountInstances)
    ((or_n == total)) || die "Orthanc stored $or_n of $total instances"
    stop_pid "$ORTHANC_PID"
    python3 - "$total" "$cf_s" "$or_s" "$ASSOCIATIONS" "$(loadavg)" >>"$RESULTS" <<'EOF'
import json, sys
n, cf, orth, k, load = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
print(json.dumps({"bench": "c-store", "instances": n, "associations": int(k),
                  "clinflow_per_s": round(n / cf, 1), "orthanc_per_s": round(n / orth, 1),
                  "ratio": round((n / cf) / (n / orth), 2), "target": 2.0, "load": load}))
EOF
}

bench_parse() {
    local dir=$WORK/parse samples
    samples=$("$PY" -c 'import os,pydicom; print(os.path.join(os.path.dirname(pydicom.__file__),"data","test_files"))')
    mkdir -p "$dir"
    # The image samples both parsers read (those pydicom reads without
    # extra handlers), and a hundred prepared CT instances.
    local f
    for f in CT_small.dcm MR_small.dcm MR_small_RLE.dcm MR_small_jp2klossless.dcm \
        MR_small_deflate.dcm JPEG2000.dcm SC_rgb.dcm emri_small.dcm rtplan.dcm \
        MR_small_bigendian.dcm MR_small_implicit.dcm SC_rgb_rle.dcm; do
        [[ -f $samples/$f ]] && cp "$samples/$f" "$dir/"
    done
    prepare "$WORK/parse-ct" "CT_small.dcm:$SUBJECT:p:100"
    cp "$WORK"/parse-ct/* "$dir/"
    log "[parse] clinflow-imaging (load $(loadavg))"
    local cf py
    cf=$("$ROOT/target/release/examples/parse_bench" "$dir" --rounds "${ROUNDS:-20}") \
        || die "parse_bench failed"
    log "  $cf"
    log "[parse] pydicom.dcmread (load $(loadavg))"
    py=$("$PY" "$ROOT/bench/dicom-parse.py" "$dir" --rounds "${PY_ROUNDS:-5}") \
        || die "dicom-parse.py failed"
    log "  $py"
    python3 - "$cf" "$py" "$(loadavg)" >>"$RESULTS" <<'EOF'
import json, sys
cf, py, load = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
assert cf["files"] == py["files"], (cf, py)
print(json.dumps({"bench": "parse", "files": cf["files"], "clinflow_per_s": cf["per_s"],
                  "pydicom_per_s": py["per_s"], "ratio": round(cf["per_s"] / py["per_s"], 2),
                  "target": 10.0, "load": load}))
EOF
}

# drain WORKERS: a backlog of $BACKLOG series drained by WORKERS workers.
drain() {
    local workers=$1 db=$WORK/analysis-$1.db data=$WORK/analysis-data-$1
    SERVE_EXTRA=(--dicom-listen "127.0.0.1:$CF_DICOM" --imaging-workers 0)
    local save_work=$WORK
    start_clinflow "sqlite://$db" "$CF_PORT" "$WORK/clinflow-backlog-$workers.log"
    # start_clinflow's data dir is $WORK/data: keep one per run.
    send_all "$CF_DICOM" CLINFLOW "${BLISTS[@]}" >/dev/null
    stop_pid "${STARTED_PIDS[-1]}"
    mv "$WORK/data" "$data"
    ln -s "$data" "$WORK/data"
    log "[analysis] draining $BACKLOG series with $workers worker(s) (load $(loadavg))"
    # The same database again, without --demo (the trial is loaded).
    CLINFLOW_ADMIN_TOKEN=$TOKEN "$CLINFLOW" --database "sqlite://$db" --data-dir "$WORK/data" \
        serve --listen "127.0.0.1:$CF_PORT" --imaging-workers "$workers" \
        --imaging-pixel-memory-mib "${PIXEL_MIB:-64}" >"$WORK/clinflow-drain-$workers.log" 2>&1 &
    STARTED_PIDS+=($!)
    wait_http "http://127.0.0.1:$CF_PORT/healthz" 60 \
        || { tail -20 "$WORK/clinflow-drain-$workers.log" >&2; die "clinflow did not start"; }
    local pid=${STARTED_PIDS[-1]} start end done=0 first=""
    start=$(date +%s.%N)
    local deadline=$((SECONDS + 1800))
    while :; do
        done=$(curl -fsS -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$CF_PORT/metrics" \
            | awk '/^clinflow_imaging_tasks_total\{outcome="done"\}/ {print $2}')
        done=${done:-0}
        [[ -z $first && $done != 0 ]] && first=$(date +%s.%N)
        ((${done%.*} >= BACKLOG)) && break
        ((SECONDS < deadline)) || die "the backlog was not drained ($done of $BACKLOG)"
        sleep 0.2
    done
    end=$(date +%s.%N)
    local hwm
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    local dead
    dead=$(curl -fsS -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$CF_PORT/imaging/tasks?status=dead" \
        | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["items"]))')
    ((dead == 0)) || die "$dead task(s) dead"
    stop_pid "$pid"
    rm "$WORK/data"
    python3 -c "import json; print(json.dumps({'bench': 'analysis', 'workers': $workers, 'series': $BACKLOG, 'tasks_per_s': round($BACKLOG / ($end - $start), 1), 'peak_rss_mib': round($hwm / 1024, 1), 'pixel_cap_mib': ${PIXEL_MIB:-64}, 'load': '$(loadavg)'}))" >>"$RESULTS"
    : "$save_work"
}

bench_analysis() {
    local specs=() i
    for ((i = 0; i < BACKLOG; i++)); do
        # CT and MR series, uncompressed: dcmtk's storescu does not send
        # the compressed samples without transcoding (the tests send those
        # by STOW-RS).
        case $((i % 2)) in
        0) specs+=("CT_small.dcm:$SUBJECT:b$((i % 50))") ;;
        1) specs+=("MR_small.dcm:$SUBJECT:b$((i % 50))") ;;
        esac
    done
    log "preparing a backlog of $BACKLOG series..."
    prepare "$WORK/backlog" "${specs[@]}"
    python3 - "$WORK/backlog.manifest.json" "$ASSOCIATIONS" "$WORK/blist" <<'EOF'
import json, sys
manifest, k, prefix = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
lists = [[] for _ in range(k)]
for i, m in enumerate(manifest):
    lists[i % k].append(m["file"])
for i, l in enumerate(lists):
    open(f"{prefix}.{i}", "w").write("\n".join(l))
EOF
    BLISTS=()
    for ((i = 0; i < ASSOCIATIONS; i++)); do BLISTS+=("$WORK/blist.$i"); done
    drain 1
    drain 2
}

case $WHAT in
store) bench_store ;;
parse) bench_parse ;;
analysis) bench_analysis ;;
all) bench_store; bench_parse; bench_analysis ;;
esac

log ""
log "results:"
cat "$RESULTS"
python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
a = {r["workers"]: r for r in rows if r["bench"] == "analysis"}
if 1 in a and 2 in a:
    print(json.dumps({"bench": "analysis-scaling", "ratio_2_over_1": round(a[2]["tasks_per_s"] / a[1]["tasks_per_s"], 2)}))
EOF
