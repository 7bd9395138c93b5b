#!/usr/bin/env python3
"""Parse + validate throughput of R4 NDJSON with fhir.resources 8.x (the peer).

Each non-empty line is parsed with the pydantic model of its resourceType,
``get_fhir_model_class(rt).model_validate_json(line)``, which is how
fhir.resources validates JSON. fhir.resources 8.x ships R5 models at the top
level and R4B (4.3.0) and STU3 as subpackages; it has no plain R4 (4.0.1)
models, so the R4B subpackage is used: the closest to R4 that 8.x offers.

The file is read into memory before timing. Each process count in
``--processes`` (0 = one per core) gets one untimed warm-up pass (imports the
model modules, fills caches), then ``--rounds`` timed passes; the median is
reported. Several processes split the lines in chunks over a fork pool, as
the GIL allows no faster way in one process.

Prints one JSON object, shaped like clinflow's ``validate_ndjson`` example.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
import time

from fhir.resources import __version__ as FHIR_RESOURCES_VERSION
from fhir.resources.R4B import get_fhir_model_class

# Finding the type with a regex instead of json.loads keeps the peer from
# parsing each line twice; a line without it falls back to json.loads.
RESOURCE_TYPE = re.compile(r'"resourceType"\s*:\s*"([A-Za-z]+)"')
CHUNK = 64

LINES: list[str] = []  # set before the pool forks, so workers share it


def resource_type(line: str) -> str:
    m = RESOURCE_TYPE.search(line)
    if m:
        return m.group(1)
    try:
        return str(json.loads(line).get("resourceType", "?"))
    except (ValueError, AttributeError):
        return "?"


def check(line: str) -> str | None:
    """None when the line is a valid resource, else why it is not."""
    rt = resource_type(line)
    try:
        cls = get_fhir_model_class(rt)
    except Exception as e:  # unknown type: KeyError/ValueError depending on version
        return f"{rt}: no model ({type(e).__name__}: {e})"
    try:
        cls.model_validate_json(line)
    except Exception as e:  # pydantic.ValidationError, or anything else it raises
        return f"{rt}: {e}"
    return None


def count_range(bounds: tuple[int, int]) -> tuple[int, int]:
    valid = invalid = 0
    for line in LINES[bounds[0] : bounds[1]]:
        if check(line) is None:
            valid += 1
        else:
            invalid += 1
    return valid, invalid


def run(pool, chunks) -> tuple[int, int]:
    if pool is None:
        return count_range((0, len(LINES)))
    valid = invalid = 0
    for v, i in pool.imap_unordered(count_range, chunks):
        valid += v
        invalid += i
    return valid, invalid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", default="1", help="comma-separated, 0 = one per core")
    p.add_argument("--show-rejects", type=int, default=5)
    a = p.parse_args()

    with open(a.file, encoding="utf-8") as f:
        text = f.read()
    LINES.extend(line for line in text.splitlines() if line.strip())
    if not LINES:
        print(f"{a.file} has no resources", file=sys.stderr)
        return 1

    # Untimed pass: warm-up, and what was rejected and why.
    by_type: dict[str, int] = {}
    examples = []
    valid = 0
    for n, line in enumerate(LINES, 1):
        why = check(line)
        if why is None:
            valid += 1
            continue
        rt = resource_type(line)
        by_type[rt] = by_type.get(rt, 0) + 1
        if len(examples) < a.show_rejects:
            examples.append({"line": n, "resourceType": rt, "issues": why.splitlines()[:8]})
    expected = (valid, len(LINES) - valid)

    cores = os.cpu_count() or 1
    chunks = [(i, min(i + CHUNK, len(LINES))) for i in range(0, len(LINES), CHUNK)]
    runs = []
    for requested in (int(x) for x in a.processes.split(",")):
        procs = cores if requested == 0 else requested
        pool = multiprocessing.get_context("fork").Pool(procs) if procs > 1 else None
        try:
            if pool is not None:
                run(pool, chunks)  # warm the workers' imports and caches
            times = []
            for _ in range(max(1, a.rounds)):
                start = time.perf_counter()
                got = run(pool, chunks)
                times.append(time.perf_counter() - start)
                if got != expected:
                    print(f"passes disagree: {got} != {expected}", file=sys.stderr)
                    return 1
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        median = statistics.median(times)
        runs.append(
            {
                "processes": procs,
                "rounds_ms": [round(t * 1e3, 1) for t in times],
                "median_ms": round(median * 1e3, 1),
                "resources_per_s": round(len(LINES) / median),
                "mb_per_s": round(len(text.encode()) / median / 1e6, 2),
            }
        )

    print(
        json.dumps(
            {
                "tool": f"fhir.resources {FHIR_RESOURCES_VERSION} (R4B models)",
                "file": a.file,
                "bytes": len(text.encode()),
                "resources": len(LINES),
                "valid": expected[0],
                "rejected": expected[1],
                "cores": cores,
                "runs": runs,
                "rejected_by_type": by_type,
                "rejected_examples": examples,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
