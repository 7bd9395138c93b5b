#!/usr/bin/env bash
# Compile time of fhirkit against own serde models (docs/decisions/0001-fhirkit.md).
#
# Builds in its own target directory (target/compile-bench) so that it
# neither waits for nor invalidates other builds in target/. Each figure is
# the median of REPS (default 3) timings, wall clock and CPU, with the load
# average printed beside each run: on a shared 2-core machine other builds
# move the wall-clock figure more than anything measured here.
#
#   fhirkit + clinflow-fhir   cargo clean -p fhirkit, then build clinflow-fhir
#   clinflow-fhir alone       cargo clean -p clinflow-fhir, then build it
#   serde models alone        the 20 types of crates/fhir/examples/serde_obs/model.rs
#                             as a crate with a serde_json entry point, with serde
#                             and serde_json already built
#   serde models from scratch the same crate with serde, serde_derive, syn,
#                             serde_json... built too (fhirkit has no dependencies)
#
# Release profile by default; PROFILE=dev for the profile `cargo test` and
# clippy use (the workspace builds dependencies at opt-level 1 there).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
reps=${REPS:-3}
profile=${PROFILE:-release}
out=$root/target/compile-bench
ws_target=$out/ws
models=$out/serde-obs-models
mkdir -p "$out"

profile_flag=(--profile "$profile")
[[ $profile == dev ]] && profile_dir=debug || profile_dir=$profile

load() { cut -d' ' -f1 /proc/loadavg; }

# Times "$@" REPS times, each after running the preparation command $prep.
# Prints the medians of wall-clock and CPU (user + system) seconds, then
# every run with the 1-minute load average before it. CPU time is the steadier
# figure when other builds share the machine; wall time is what one waits.
measure() {
    local label=$1 prep=$2
    shift 2
    local walls=() cpus=() notes=()
    for _ in $(seq "$reps"); do
        eval "$prep"
        local l wall user sys
        l=$(load)
        read -r wall user sys < <(/usr/bin/time -f '%e %U %S' "$@" 2>&1 >/dev/null | tail -1)
        walls+=("$wall")
        cpus+=("$(echo "$user + $sys" | bc)")
        notes+=("$(printf '%.1f/%.1fs@load%s' "$wall" "${cpus[-1]}" "$l")")
    done
    printf '%-28s wall %6.1f s  cpu %6.1f s   (wall/cpu: %s)\n' "$label" \
        "$(median "${walls[@]}")" "$(median "${cpus[@]}")" "${notes[*]}"
}

median() { printf '%s\n' "$@" | sort -n | sed -n "$((($# + 1) / 2))p"; }

# The serde models as a crate outside the workspace, with the workspace's
# profile settings and locked versions.
mkdir -p "$models/src"
cat >"$models/Cargo.toml" <<EOF
[package]
name = "serde-obs-models"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"

[profile.release]
debug = 1
codegen-units = 16

[profile.dev.package."*"]
opt-level = 1

[workspace]
EOF
# serde's Deserialize impls are generic: their machine code is generated
# where a deserializer is named. `parse` names serde_json's, so that cost
# is counted here rather than in whichever crate would call it.
cat >"$models/src/lib.rs" <<EOF
#[path = "$root/crates/fhir/examples/serde_obs/model.rs"]
pub mod model;

pub fn parse(text: &str) -> Result<model::Observation, serde_json::Error> {
    serde_json::from_str(text)
}
EOF
cp "$root/Cargo.lock" "$models/Cargo.lock"

echo "== $profile profile, $reps runs each, $(nproc) cores, rustc $(rustc --version | cut -d' ' -f2)"
echo "== warming: dependencies built once"
CARGO_TARGET_DIR=$ws_target cargo build "${profile_flag[@]}" -p clinflow-fhir >/dev/null 2>&1
(cd "$models" && cargo build "${profile_flag[@]}" >/dev/null 2>&1)

export CARGO_TARGET_DIR=$ws_target
measure "fhirkit + clinflow-fhir" \
    'cargo clean "${profile_flag[@]}" -p fhirkit >/dev/null 2>&1' \
    cargo build "${profile_flag[@]}" -p clinflow-fhir
measure "clinflow-fhir alone" \
    'cargo clean "${profile_flag[@]}" -p clinflow-fhir >/dev/null 2>&1' \
    cargo build "${profile_flag[@]}" -p clinflow-fhir
unset CARGO_TARGET_DIR

cd "$models"
measure "serde models alone" \
    'cargo clean "${profile_flag[@]}" -p serde-obs-models >/dev/null 2>&1' \
    cargo build "${profile_flag[@]}"
measure "serde models from scratch" \
    'rm -rf target/$profile_dir' \
    cargo build "${profile_flag[@]}"
