#!/usr/bin/env python3
"""Loads a FHIR server with N Observations for the read and search benchmark.

usage: load-observations.py BASE_URL --count 100000 --ids-out FILE [--token T]
           [--patients ID,ID,...] [--seed 7] [--clients 4] [--per-bundle 100]

The data is the same on every server for the same seed: LOINC codes from a
small set (8480-6 among them), effective dates spread over 2026, subjects
spread over the given Patients; posted as transaction Bundles. Writes the
ids the server assigned, one a line, to --ids-out; fails on any error.
"""
import argparse, http.client, json, random, sys, threading, time, urllib.parse, uuid

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("--count", type=int, default=100_000)
ap.add_argument("--ids-out", required=True)
ap.add_argument("--token")
ap.add_argument("--patients", default=",".join(f"CARDIO-01-{i:04d}" for i in range(1, 7)))
ap.add_argument("--seed", type=int, default=7)
ap.add_argument("--clients", type=int, default=4)
ap.add_argument("--per-bundle", type=int, default=100)
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
path = u.path.rstrip("/") or "/"
patients = a.patients.split(",")

# code, display, unit, low, high
CODES = [
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 100, 160),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 60, 100),
    ("8867-4", "Heart rate", "/min", 50, 110),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 160),
    ("29463-7", "Body weight", "kg", 50, 110),
    ("8310-5", "Body temperature", "Cel", 36, 39),
]


def observation(rng, n):
    code, display, unit, lo, hi = rng.choice(CODES)
    start = 1767225600  # 2026-01-01T00:00:00Z
    t = time.gmtime(start + rng.randrange(365 * 86400))
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patients[n % len(patients)]}"},
        "effectiveDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", t),
        "valueQuantity": {"value": round(rng.uniform(lo, hi), 1), "unit": unit,
                          "system": "http://unitsofmeasure.org", "code": unit},
        "device": {"display": f"watch-{n % 97}"},
    }


rng = random.Random(a.seed)
bundles = []
for start in range(0, a.count, a.per_bundle):
    entries = [{"fullUrl": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}",
                "request": {"method": "POST", "url": "Observation"},
                "resource": observation(rng, n)}
               for n in range(start, min(start + a.per_bundle, a.count))]
    bundles.append(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))

ids = [None] * len(bundles)
errors = []
next_bundle = iter(range(len(bundles)))
lock = threading.Lock()


def location_id(entry):
    loc = entry.get("response", {}).get("location", "")
    parts = loc.split("/")
    i = parts.index("Observation") if "Observation" in parts else -1
    if i < 0 or i + 1 >= len(parts):
        raise ValueError(f"no Observation id in response location {loc!r}")
    return parts[i + 1]


def client():
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    hdr = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if a.token:
        hdr["Authorization"] = f"Bearer {a.token}"
    while not errors:
        with lock:
            k = next(next_bundle, None)
        if k is None:
            return
        try:
            c.request("POST", path, bundles[k], hdr)
            r = c.getresponse()
            body = r.read()
            if not 200 <= r.status < 300:
                raise RuntimeError(f"HTTP {r.status}: {body[:300]!r}")
            ids[k] = [location_id(e) for e in json.loads(body)["entry"]]
        except Exception as e:  # noqa: BLE001 - reported and fatal
            errors.append(f"bundle {k}: {e}")


t0 = time.time()
ts = [threading.Thread(target=client) for _ in range(a.clients)]
[t.start() for t in ts]
[t.join() for t in ts]
if errors:
    sys.exit(f"load failed: {errors[0]}")
with open(a.ids_out, "w") as f:
    for b in ids:
        f.writelines(i + "\n" for i in b)
n = sum(len(b) for b in ids)
el = time.time() - t0
print(json.dumps({"loaded": n, "seconds": round(el, 1), "per_s": round(n / el)}))
