#!/usr/bin/env python3
"""Closed-loop load on /ingest/hl7v2, and with --wearable on /ingest/wearable
too (issue 3, benchmark 2).

Reads HL7 v2 messages, one a line (as `parse_bench --write` writes them),
splits them into bodies of --per-post messages, and posts them from
--clients threads (each waits for its 202 before the next post). A 429 or
503 is retried after its Retry-After. When everything is accepted, polls
every batch until it is done. Prints one JSON object: messages and
Observations accepted, seconds from the first post to the last batch done,
post latencies (p50/p99), and the batch counts summed (items: messages and
CSV rows). With --wearable FILE, the file's rows are posted too, as CSV
bodies of --rows-per-post rows under its header, interleaved with the lab
bodies.

With --rate R (posts per second), the load is open-loop instead: post i is
sent at i/R seconds from the start (up to 64 in flight), a 429/503 is
counted as refused and not retried (a burst beyond what the server takes),
and only the accepted posts are waited for. "accepted_messages" then says
how many items (messages and CSV rows) were acknowledged.

Standard library only.
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse


def request(conn, method, path, token, body=None, ctype=None):
    headers = {"Authorization": f"Bearer {token}"}
    if ctype:
        headers["Content-Type"] = ctype
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, r.getheader("Retry-After"), data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("messages")
    ap.add_argument("--token", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-post", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--rate", type=float, default=0, help="open loop: posts per second")
    ap.add_argument("--wearable", help="also post this wearable CSV (header + rows) to /ingest/wearable")
    ap.add_argument("--rows-per-post", type=int, default=1000, help="CSV rows per wearable post")
    a = ap.parse_args()

    with open(a.messages, "rb") as f:
        msgs = [line for line in f.read().split(b"\n") if line.strip()]
    hl7 = ("/ingest/hl7v2", "application/hl7-v2")
    bodies = [(hl7, b"\n".join(msgs[i:i + a.per_post]) + b"\n", len(msgs[i:i + a.per_post]))
              for i in range(0, len(msgs), a.per_post)]
    if a.wearable:
        # Interleaved with the lab messages: both kinds arrive at once.
        with open(a.wearable, "rb") as f:
            header, *rows = [line for line in f.read().split(b"\n") if line.strip()]
        csv = ("/ingest/wearable", "text/csv")
        chunks = [(csv, b"\n".join([header] + rows[i:i + a.rows_per_post]) + b"\n", len(rows[i:i + a.rows_per_post]))
                  for i in range(0, len(rows), a.rows_per_post)]
        every = max(1, len(bodies) // max(1, len(chunks)))
        mixed = []
        for i, b in enumerate(bodies):
            mixed.append(b)
            if i % every == every - 1 and chunks:
                mixed.append(chunks.pop(0))
        bodies = mixed + chunks
    u = urllib.parse.urlparse(a.base)
    lock = threading.Lock()
    next_body = [0]
    batches, latencies, retries, errors = [], [], [0], []

    def client():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while True:
            with lock:
                i = next_body[0]
                next_body[0] += 1
            if i >= len(bodies):
                return
            while True:
                t0 = time.perf_counter()
                try:
                    (path, ctype), body, _ = bodies[i]
                    status, retry_after, data = request(conn, "POST", path, a.token, body, ctype)
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                    with lock:
                        errors.append(str(e))
                    continue
                if status in (429, 503):
                    with lock:
                        retries[0] += 1
                    time.sleep(min(float(retry_after or 1), 5) / 10)
                    continue
                if status != 202:
                    with lock:
                        errors.append(f"{status}: {data[:200]!r}")
                    break
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    batches.append(json.loads(data)["batch"])
                break

    refused = [0]
    accepted_messages = [0]

    def post_once(i):
        local = getattr(threading.current_thread(), "conn", None)
        if local is None:
            local = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            threading.current_thread().conn = local
        t0 = time.perf_counter()
        try:
            (path, ctype), body, _ = bodies[i]
            status, _, data = request(local, "POST", path, a.token, body, ctype)
        except (OSError, http.client.HTTPException) as e:
            local.close()
            threading.current_thread().conn = None
            with lock:
                errors.append(str(e))
            return
        with lock:
            if status in (429, 503):
                refused[0] += 1
            elif status == 202:
                latencies.append((time.perf_counter() - t0) * 1000)
                batches.append(json.loads(data)["batch"])
                accepted_messages[0] += bodies[i][2]
            else:
                errors.append(f"{status}: {data[:200]!r}")

    start = time.perf_counter()
    if a.rate > 0:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=64) as pool:
            for i in range(len(bodies)):
                delay = start + i / a.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(post_once, i)
    else:
        accepted_messages[0] = sum(n for _, _, n in bodies)
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    accepted_s = time.perf_counter() - start

    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    totals = {"received": 0, "stored": 0, "rejected": 0, "duplicates": 0}
    deadline = time.perf_counter() + a.timeout
    for b in batches:
        while True:
            status, _, data = request(conn, "GET", f"/ingest/batches/{b}", a.token)
            j = json.loads(data)
            if status == 200 and j["status"] == "done":
                for k in totals:
                    totals[k] += j[k]
                break
            if time.perf_counter() > deadline:
                raise SystemExit(f"batch {b} not done in {a.timeout} s")
            time.sleep(0.05)
    done_s = time.perf_counter() - start
    latencies.sort()
    pct = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1) if latencies else None
    print(json.dumps({
        "messages": len(msgs), "items": sum(n for _, _, n in bodies), "posts": len(bodies), "batches": len(batches),
        "retries_429": retries[0], "refused_429": refused[0], "accepted_messages": accepted_messages[0],
        "errors": len(errors), "first_errors": errors[:3],
        "accepted_seconds": round(accepted_s, 2), "done_seconds": round(done_s, 2),
        "post_p50_ms": pct(0.50), "post_p99_ms": pct(0.99), **totals,
    }))


if __name__ == "__main__":
    main()
