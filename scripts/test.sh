#!/usr/bin/env bash
# Runs clinflow's whole test suite: the README's second command, and what
# .ci/run calls. Idempotent: installs or starts what the tests need, and
# fails loudly (never skips) when something cannot be had.
#
# Needs: PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`; each test
# uses its own schema), npm (for the R4 examples corpus, CC0, and
# playwright-core), python3 with venv (for python-hl7's mllp_send, the MLLP
# tests' client, and aiosmtpd, the campaign tests' SMTP server; pydicom, the
# imaging tests' samples), dcmtk (storescu), NATS with JetStream on
# 127.0.0.1:4222 (the imaging queue tests), Debian's chromium (the web page's test; installed when
# missing and running as root).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '==> %s\n' "$*" >&2; }

# 1. PostgreSQL: the storage and API suites run on it as well as on SQLite.
#    CI has it running; on a fresh Debian machine it is installed, started
#    with trust auth on 127.0.0.1 and given a database `test`.
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing PostgreSQL (Debian package postgresql)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    ver="$(ls /etc/postgresql | sort -n | tail -n1)"
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    if [ -w "$hba" ] && ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      say "PostgreSQL $ver: trust auth on 127.0.0.1 (a test database only)"
      sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    say "starting PostgreSQL $ver"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || true
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  if ! pg_up; then
    echo "error: PostgreSQL is not reachable on 127.0.0.1:5432; the test suite runs on it too" >&2
    exit 1
  fi
fi
if command -v psql >/dev/null 2>&1 && ! psql -h 127.0.0.1 -U postgres -d test -Atc "SELECT 1" >/dev/null 2>&1; then
  say "creating database test"
  psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE test' || {
    echo "error: cannot reach or create database test on 127.0.0.1:5432 as postgres (trust auth)" >&2
    exit 1
  }
fi
export CLINFLOW_TEST_PG="${CLINFLOW_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}"

# 2. The official R4 examples (npm package hl7.fhir.r4.examples, CC0) for the
#    conformance test.
corpus="target/r4-examples/node_modules/hl7.fhir.r4.examples"
if [ ! -f "$corpus/package.json" ]; then
  if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing npm (Debian package npm)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  say "installing the R4 examples corpus (npm hl7.fhir.r4.examples@4.0.1)"
  mkdir -p target/r4-examples
  npm install --no-audit --no-fund --silent --prefix target/r4-examples hl7.fhir.r4.examples@4.0.1
fi
export CLINFLOW_R4_EXAMPLES="$root/$corpus"

# 3. Python parts nobody here wrote, in a venv of their own: python-hl7's
#    mllp_send (PyPI hl7, BSD), the MLLP listener's client, and aiosmtpd
#    (PyPI, Apache-2.0), the real SMTP server the campaign tests send to
#    (tests/smtp/server.py).
venv="target/test-venv"
venv_ok() { [ -x "$venv/bin/mllp_send" ] && "$venv/bin/python" -c 'import aiosmtpd, pydicom' 2>/dev/null; }
if ! venv_ok; then
  if ! command -v python3 >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing python3 (Debian packages python3, python3-venv)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  say "installing python-hl7 (PyPI hl7>=0.4,<0.5) and aiosmtpd (>=1.4,<2) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'hl7>=0.4,<0.5' 'aiosmtpd>=1.4,<2' 'pydicom>=3,<4'
fi
if [ ! -x "$venv/bin/mllp_send" ]; then
  echo "error: $venv/bin/mllp_send is missing; the MLLP tests need it" >&2
  exit 1
fi
if ! "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
  echo "error: aiosmtpd is missing from $venv; the campaign tests need a real SMTP server" >&2
  exit 1
fi
export CLINFLOW_MLLP_SEND="$root/$venv/bin/mllp_send"
export CLINFLOW_TEST_PYTHON="$root/$venv/bin/python"

# 3b. dcmtk (Debian package dcmtk): echoscu and storescu, the real DICOM
#     clients of the DIMSE tests; pydicom (PyPI, MIT) above ships their sample files.
if ! command -v storescu >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing dcmtk (Debian package dcmtk)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
  fi
fi
if ! command -v storescu >/dev/null 2>&1 || ! command -v echoscu >/dev/null 2>&1; then
  echo "error: dcmtk's storescu/echoscu are missing; the DIMSE tests need them (Debian package dcmtk)" >&2
  exit 1
fi

# 3c. NATS with JetStream on 127.0.0.1:4222 (CI runs it): the imaging queue
#     tests run on it as well as on the embedded queue.
nats_url="${CLINFLOW_TEST_NATS:-nats://127.0.0.1:4222}"
nats_hostport="${nats_url#nats://}"
if ! (exec 3<>"/dev/tcp/${nats_hostport%:*}/${nats_hostport##*:}") 2>/dev/null; then
  echo "error: NATS is not reachable at $nats_url; the JetStream queue tests need it (nats-server -js)" >&2
  exit 1
fi
export CLINFLOW_TEST_NATS="$nats_url"

# 4. A real browser for the web page's test: Debian's chromium, driven by
#    playwright-core (npm, pinned in tests/ui/package-lock.json).
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing Chromium (Debian package chromium)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "error: /usr/bin/chromium is missing; the web page's test needs it (Debian package chromium)" >&2
  exit 1
fi
if [ ! -f tests/ui/node_modules/playwright-core/package.json ]; then
  say "installing playwright-core for the web page's test (npm ci --prefix tests/ui)"
  npm ci --no-audit --no-fund --silent --prefix tests/ui
fi

# 5. The tests: unit, property and integration tests of every crate, on both
#    engines.
say "running the test suite"
cargo test --workspace --locked "$@"
