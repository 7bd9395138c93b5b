"""Issue 7, benchmark 2, the peer: pydicom.dcmread over every file in DIR.

usage: dicom-parse.py DIR [--rounds N]
Reads each file's bytes once (not timed), then parses every file ROUNDS
times from memory with pydicom.dcmread (the whole dataset, pixel data as
bytes, as clinflow-imaging's parse_part10 does) and prints
{"files", "rounds", "seconds", "per_s"}.
"""
import io
import json
import os
import sys
import time

import pydicom


def main():
    d = sys.argv[1]
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    blobs = []
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            blobs.append(f.read())
    start = time.perf_counter()
    for _ in range(rounds):
        for b in blobs:
            ds = pydicom.dcmread(io.BytesIO(b))
            # Touch every element: pydicom decodes values lazily.
            for _elem in ds.iterall():
                pass
    seconds = time.perf_counter() - start
    n = len(blobs) * rounds
    print(json.dumps({"files": len(blobs), "rounds": rounds, "seconds": round(seconds, 4),
                      "per_s": round(n / seconds, 1)}))


if __name__ == "__main__":
    main()
