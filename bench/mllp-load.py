#!/usr/bin/env python3
"""MLLP load (issue 3, benchmark 3): --connections sockets, each sending one
framed message and waiting for its ACK before the next (per-connection
order, as a real interface engine does). Messages come from a file, one a
line (parse_bench --write). Prints one JSON object: messages acknowledged
by code, messages/s, ACK latency p50/p99/max in ms. Standard library only.
"""

import argparse
import json
import socket
import threading
import time

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("messages")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()
    with open(a.messages, "rb") as f:
        msgs = [m for m in f.read().split(b"\n") if m.strip()]
    lock = threading.Lock()
    latencies, codes, failures = [], {}, []

    def run(part):
        s = socket.create_connection((a.host, a.port), timeout=a.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for m in part:
            t0 = time.perf_counter()
            s.sendall(SB + m + EB + CR)
            while EB + CR not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    with lock:
                        failures.append("closed without an ACK")
                    return
                buf += chunk
            frame, buf = buf.split(EB + CR, 1)
            ms = (time.perf_counter() - t0) * 1000
            msa = next((seg for seg in frame.lstrip(SB).split(b"\r") if seg.startswith(b"MSA")), b"")
            code = msa.split(b"|")[1].decode() if b"|" in msa else "?"
            with lock:
                latencies.append(ms)
                codes[code] = codes.get(code, 0) + 1
        s.close()

    parts = [msgs[i::a.connections] for i in range(a.connections)]
    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - start
    latencies.sort()
    pct = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)
    print(json.dumps({
        "messages": len(msgs), "acks": codes, "failures": len(failures),
        "seconds": round(secs, 2), "messages_per_s": round(len(latencies) / secs, 1),
        "ack_p50_ms": pct(0.5), "ack_p99_ms": pct(0.99), "ack_max_ms": round(latencies[-1], 2),
    }))


if __name__ == "__main__":
    main()
