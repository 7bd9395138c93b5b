#!/usr/bin/env bash
# Runs clinflow's whole test suite: the README's second command, and what
# .ci/run calls. Idempotent: installs or starts what the tests need, and
# fails loudly (never skips) when something cannot be had.
#
# Needs: PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`; each test
# uses its own schema), npm (for the R4 examples corpus, CC0).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '==> %s\n' "$*" >&2; }

# 1. PostgreSQL: the storage and API suites run on it as well as on SQLite.
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    say "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && break; sleep 1; done
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "error: PostgreSQL is not reachable on 127.0.0.1:5432; the test suite runs on it too" >&2
    exit 1
  fi
fi
export CLINFLOW_TEST_PG="${CLINFLOW_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}"

# 2. The official R4 examples (npm package hl7.fhir.r4.examples, CC0) for the
#    conformance test.
corpus="target/r4-examples/node_modules/hl7.fhir.r4.examples"
if [ ! -f "$corpus/package.json" ]; then
  say "installing the R4 examples corpus (npm hl7.fhir.r4.examples@4.0.1)"
  mkdir -p target/r4-examples
  npm install --no-audit --no-fund --silent --prefix target/r4-examples hl7.fhir.r4.examples@4.0.1
fi
export CLINFLOW_R4_EXAMPLES="$root/$corpus"

# 3. The tests: unit, property and integration tests of every crate, on both
#    engines.
say "running the test suite"
cargo test --workspace --locked "$@"
