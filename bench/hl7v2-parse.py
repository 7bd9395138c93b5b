#!/usr/bin/env python3
"""python-hl7 side of the HL7 v2 parse benchmark (issue 3, benchmark 1).

    hl7v2-parse.py FILE [--rounds 3] [--limit N]

FILE holds one message a line (segments separated by \\r), as written by
`parse_bench --write` (the first N with --limit). Each mode is timed --rounds times after one untimed
pass, single-threaded, and the median is printed as one JSON object:
  parse       hl7.parse(message) for every message (an eager, full tree);
  parse_read  hl7.parse, then the same fields OruR01::read decodes (PID-3,
              PID-5, PID-7, PID-8, OBR-2/3/4/7/22/24/25, every OBX's 1-8, 11,
              14 and NTE-2/3), unescaped where clinflow decodes.
"""
import json
import statistics
import sys
import time

import hl7


def comp(field, rep, c):
    """Component c (from 1) of repetition rep (from 1) of a field, as text."""
    try:
        if isinstance(field, str):
            return field if (rep, c) == (1, 1) else ""
        r = field[rep - 1] if isinstance(field[0], hl7.containers.Repetition) else field
        v = r[c - 1]
        return v if isinstance(v, str) else str(v)
    except (IndexError, TypeError):
        return ""


def fld(seg, n):
    try:
        return seg[n]
    except IndexError:
        return ""


def read(msg):
    u = msg.unescape
    out = []
    for seg in msg:
        sid = str(seg[0])
        if sid == "PID":
            out += [u(comp(fld(seg, 3), 1, 1)), comp(fld(seg, 3), 1, 4), comp(fld(seg, 3), 1, 5),
                    u(comp(fld(seg, 5), 1, 1)), u(comp(fld(seg, 5), 1, 2)), str(fld(seg, 7)), str(fld(seg, 8))]
        elif sid == "OBR":
            out += [comp(fld(seg, 2), 1, 1), comp(fld(seg, 3), 1, 1)]
            out += [u(comp(fld(seg, 4), 1, i)) for i in (1, 2, 3, 4, 5, 6)]
            out += [str(fld(seg, n)) for n in (7, 22, 24, 25)]
        elif sid == "OBX":
            out += [str(fld(seg, 1)), str(fld(seg, 2))]
            out += [u(comp(fld(seg, 3), 1, i)) for i in (1, 2, 3, 4, 5, 6)]
            out += [str(fld(seg, 4)), u(str(fld(seg, 5)))]
            out += [u(comp(fld(seg, 6), 1, i)) for i in (1, 2, 3)]
            out += [u(str(fld(seg, 7))), str(fld(seg, 8)), str(fld(seg, 11)), str(fld(seg, 14))]
        elif sid == "NTE":
            out += [str(fld(seg, 2)), u(str(fld(seg, 3)))]
    return len(out)


def timed(rounds, msgs, f):
    def one():
        start = time.perf_counter()
        for m in msgs:
            f(m)
        return time.perf_counter() - start

    one()
    return statistics.median(one() for _ in range(rounds))


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    path, rounds, limit = args[0], 3, None
    if "--rounds" in args:
        rounds = max(1, int(args[args.index("--rounds") + 1]))
    if "--limit" in args:
        limit = max(1, int(args[args.index("--limit") + 1]))
    with open(path, "rb") as fh:
        msgs = [line.decode("utf-8") for line in fh.read().split(b"\n") if line.strip()]
    msgs = msgs[:limit]
    # Same messages must parse to 10 OBX each, or the figures mean nothing.
    assert all(len(hl7.parse(m).segments("OBX")) == 10 for m in msgs[:100])
    parse = timed(rounds, msgs, hl7.parse)
    parse_read = timed(rounds, msgs, lambda m: read(hl7.parse(m)))
    n = len(msgs)
    print(json.dumps({
        "messages": n,
        "rounds": rounds,
        "hl7_version": getattr(hl7, "__version__", "?"),
        "parse_msgs_per_s": round(n / parse),
        "parse_read_msgs_per_s": round(n / parse_read),
    }))


if __name__ == "__main__":
    main()
