#!/usr/bin/env python3
"""A stand-in for the clinflow server, for developing and testing the dashboard.

Serves crates/server/ui/ at /ui/ and canned, self-consistent JSON for the API
the dashboard reads (GET /trials, /trials/{id}/dashboard, /sites,
/trials/{id}/subjects, /trials/{id}/subjects/{subject}). Every API route wants
`Authorization: Bearer <token>` (--token, default "monitor-token") and answers
401 with problem+json otherwise, like the real server.

    python3 tests/ui/mock-server.py --port 8765            # all sections ok
    python3 tests/ui/mock-server.py --port 8765 --partial  # two sections unavailable
    python3 tests/ui/mock-server.py --port 8765 --drift    # every dashboard differs (the test must fail)

Only for local use: it binds to 127.0.0.1 and stops on Ctrl-C or SIGTERM.
"""

import argparse
import datetime as dt
import json
import random
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

ROOT = Path(__file__).resolve().parents[2]
UI_DIR = ROOT / "crates" / "server" / "ui"
UI_FILES = {
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/index.html": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

TRIAL = "CARDIO-01"
SITES = [
    {"id": "site-001", "name": "Massachusetts General Research Unit", "country": "US", "city": "Boston", "timezone": "America/New_York"},
    {"id": "site-002", "name": "Charite Clinical Research Center", "country": "DE", "city": "Berlin", "timezone": "Europe/Berlin"},
    {"id": "site-003", "name": "Peking Union Medical College Hospital", "country": "CN", "city": "Beijing", "timezone": "Asia/Shanghai"},
]
ARMS = ["drug-x", "placebo"]
VISITS = [
    {"id": "screening", "day": -14, "window": {"before": 14, "after": 0}},
    {"id": "baseline", "day": 0, "window": {"before": 0, "after": 1}},
    {"id": "week-4", "day": 28, "window": {"before": 3, "after": 3}},
    {"id": "week-12", "day": 84, "window": {"before": 7, "after": 7}},
]
MEASUREMENTS = [
    ("systolic-bp", "Systolic blood pressure", "mm[Hg]", (90, 180), (95, 200)),
    ("diastolic-bp", "Diastolic blood pressure", "mm[Hg]", (50, 110), (55, 120)),
    ("heart-rate", "Heart rate", "/min", (40, 140), (50, 150)),
    ("glucose", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", (70, 250), (60, 280)),
    ("hba1c", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", (4, 12), (5, 13)),
    ("steps", "Number of steps", "{steps}", None, (500, 14000)),
]
TODAY = dt.date(2026, 12, 2)
FIRST_WEEK = dt.date(2026, 1, 5)
TARGET = 450


def iso(d):
    return d.isoformat()


def build(partial):
    rnd = random.Random(20260101)
    weeks = (TODAY - FIRST_WEEK).days // 7 + 1  # 48
    # Subjects: 420 of them, spread over the weeks and the three sites.
    subjects = []
    for i in range(420):
        week = min(weeks - 1, int((i / 420) ** 0.9 * weeks))
        enrolled = FIRST_WEEK + dt.timedelta(days=7 * week + rnd.randrange(5))
        site = SITES[i % 3]["id"] if i % 7 else SITES[0]["id"]
        subjects.append({
            "subject": f"{TRIAL}-{i + 1:04d}",
            "patient": f"pat-{rnd.getrandbits(48):012x}",
            "site": site,
            "arm": ARMS[i % 2],
            "enrolled": iso(enrolled),
            "status": rnd.choice(["on-study"] * 8 + ["completed", "withdrawn"]),
        })
    subjects.sort(key=lambda s: s["subject"])

    weekly, cum = [], 0
    for w in range(weeks):
        start = FIRST_WEEK + dt.timedelta(days=7 * w)
        n = sum(1 for s in subjects if start <= dt.date.fromisoformat(s["enrolled"]) < start + dt.timedelta(days=7))
        cum += n
        # The plan: a straight line to the target over 52 weeks, none set for the first two.
        target = None if w < 2 else round(TARGET * (w + 1) / 52, 1)
        weekly.append({"week": iso(start), "enrolled": n, "cumulative": cum, "target": target})

    by_site = []
    for site in SITES:
        mine = [s for s in subjects if s["site"] == site["id"]]
        by_site.append({
            "site": site["id"], "name": site["name"], "total": len(mine),
            "by_arm": {a: sum(1 for s in mine if s["arm"] == a) for a in ARMS},
        })
    enrolment = {
        "status": "ok", "total": len(subjects), "target": TARGET, "by_site": by_site,
        "by_arm": {a: sum(1 for s in subjects if s["arm"] == a) for a in ARMS}, "weekly": weekly,
    }

    adverse_events = {
        "status": "ok", "total": 130, "by_severity": {"mild": 80, "moderate": 40, "severe": 10},
        "by_seriousness": {"serious": 12, "non-serious": 118}, "serious_report_hours": 24,
        "serious_late": [
            {"id": "ae-7f3a", "subject": f"{TRIAL}-0006", "site": "site-003", "date": "2026-03-02T14:30:00Z", "recorded": "2026-03-04T09:00:00Z", "hours": 42.5},
            {"id": "ae-81c2", "subject": f"{TRIAL}-0117", "site": "site-002", "date": "2026-07-19T22:10:00Z", "recorded": "2026-07-21T08:40:00Z", "hours": 34.5},
        ],
    }

    upcoming, overdue, missed = [], [], []
    for k, s in enumerate(subjects[300:360]):
        due = TODAY + dt.timedelta(days=k % 16 - 1)
        item = {"subject": s["subject"], "site": s["site"], "visit": "week-12" if k % 3 else "week-4",
                "due": iso(due), "window": [iso(due - dt.timedelta(days=7)), iso(due + dt.timedelta(days=7))]}
        item["appointment"] = f"{iso(due)}T{9 + k % 8:02d}:{'30' if k % 2 else '00'}:00Z" if k % 4 else None
        upcoming.append(item)
    for k, s in enumerate(subjects[200:203]):
        due = TODAY - dt.timedelta(days=5 + k)
        overdue.append({"subject": s["subject"], "site": s["site"], "visit": "week-12", "due": iso(due),
                        "window": [iso(due - dt.timedelta(days=7)), iso(due + dt.timedelta(days=7))], "appointment": None})
    for k, s in enumerate(subjects[100:110]):
        due = dt.date(2026, 6, 1) + dt.timedelta(days=9 * k)
        missed.append({"subject": s["subject"], "site": s["site"], "visit": "week-4", "due": iso(due),
                       "window": [iso(due - dt.timedelta(days=3)), iso(due + dt.timedelta(days=3))], "appointment": None})
    visits = {
        "status": "ok", "today": iso(TODAY), "horizon_days": 14,
        "upcoming": upcoming, "overdue": overdue, "missed": missed,
        "by_visit": {
            "week-12": {"completed": 210, "upcoming": 40, "overdue": 3, "missed": 0},
            "week-4": {"completed": 300, "upcoming": 20, "overdue": 0, "missed": 10},
            "baseline": {"completed": 420, "upcoming": 0, "overdue": 0, "missed": 0},
        },
    }

    data_quality = {
        "status": "ok", "open_queries": 17,
        "open_queries_by_site": [{"site": "site-001", "open": 5}, {"site": "site-002", "open": 9}, {"site": "site-003", "open": 3}],
        "rejected_items_24h": 3,
    }
    ingest = {"status": "ok", "stages": [
        {"stage": "parse", "queue_depth": 0, "busy": 0, "workers": 2, "items_total": 18231, "items_per_second": 1.25},
        {"stage": "map", "queue_depth": 4, "busy": 1, "workers": 2, "items_total": 18227, "items_per_second": 1.2},
        {"stage": "validate", "queue_depth": 0, "busy": 0, "workers": 2, "items_total": 18227, "items_per_second": 1.2},
        {"stage": "store", "queue_depth": 0, "busy": 0, "workers": 1, "items_total": 18224, "items_per_second": 0.0},
    ]}

    sections = {"enrolment": enrolment, "adverse_events": adverse_events, "visits": visits,
                "data_quality": data_quality, "ingest": ingest}
    if partial:
        sections["adverse_events"] = {"status": "unavailable", "reason": "timed out after 2s"}
        sections["ingest"] = {"status": "unavailable", "reason": "the ingest pipeline is not running"}

    def subject_values(s):
        r = random.Random(s["subject"])
        out = []
        start = dt.datetime.fromisoformat(s["enrolled"] + "T08:00:00+00:00")
        for visit in range(3):
            t = start + dt.timedelta(days=28 * visit, minutes=r.randrange(90))
            for mid, display, unit, soft, typical in MEASUREMENTS:
                lo, hi = typical
                value = round(r.uniform(lo, hi), 1 if unit != "{steps}" else 0)
                if unit == "{steps}":
                    value = float(int(value))
                oor = bool(soft) and not (soft[0] <= value <= soft[1])
                out.append({"measurement": mid, "display": display, "value": value, "unit": unit,
                            "time": t.strftime("%Y-%m-%dT%H:%M:%SZ"), "soft": list(soft) if soft else None,
                            "out_of_range": oor})
        # The first subject always has one high and one low value.
        if s["subject"].endswith("-0001"):
            out[0].update(value=182.0, out_of_range=True)
            out[3].update(value=61.0, out_of_range=True)
        return out

    protocol = {
        "id": TRIAL, "version": 3,
        "title": "Drug X versus placebo on blood pressure and glucose in adults with type 2 diabetes",
        "phase": "phase-3", "period": {"start": "2026-01-01", "end": "2027-12-31"},
        "subject_identifier_system": "https://trials.example.org/CARDIO-01/subject",
        "sites": SITES, "arms": ARMS, "visits": VISITS, "measurements": [], "adverse_events": {"serious_report_hours": 24},
    }
    return {
        "trials": {"items": [{"id": TRIAL, "version": 3, "loaded_at": "2026-01-02T09:00:00Z", "protocol": protocol}], "next": None},
        "dashboard": {"trial": TRIAL, "generated_at": "2026-12-02T10:00:00Z", "partial": bool(partial), "sections": sections},
        "subjects": subjects,
        "values": subject_values,
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "clinflow-mock/1"
    data = None
    token = None
    drift = False
    served = 0
    site_page = 50

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("mock: " + fmt % args + "\n")

    def send_json(self, status, body, ctype="application/json"):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Cache-Control", "no-store")
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(raw)

    def problem(self, status, title, detail):
        self.send_json(status, {"type": "about:blank", "title": title, "status": status, "detail": detail}, "application/problem+json")

    def do_GET(self):
        url = urlsplit(self.path)
        path = url.path
        if path == "/ui":
            self.send_response(308)
            self.send_header("Location", "/ui/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in UI_FILES:
            name, ctype = UI_FILES[path]
            raw = (UI_DIR / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(raw)))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(raw)
            return
        if path == "/healthz":
            self.send_json(200, {"status": "ok"})
            return

        if self.headers.get("Authorization", "") != f"Bearer {self.token}":
            self.problem(401, "Unauthorized", "authentication is required: send Authorization: Bearer TOKEN")
            return

        q = parse_qs(url.query)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        d = self.data
        if parts == ["trials"]:
            self.send_json(200, d["trials"])
        elif len(parts) == 3 and parts[0] == "trials" and parts[2] == "dashboard":
            if parts[1] != TRIAL:
                self.problem(404, "Not Found", f"no trial {parts[1]!r}")
            elif self.drift:
                # A dashboard that never matches the previous one: checks the test's failure path.
                Handler.served += 1
                body = json.loads(json.dumps(d["dashboard"]))
                ae = body["sections"]["adverse_events"]
                if ae.get("status") == "ok":
                    ae["by_severity"]["mild"] += Handler.served
                    ae["total"] += Handler.served
                self.send_json(200, body)
            else:
                self.send_json(200, d["dashboard"])
        elif len(parts) == 3 and parts[0] == "trials" and parts[2] == "subjects":
            self.send_json(200, {"items": d["subjects"], "total": len(d["subjects"])})
        elif len(parts) == 4 and parts[0] == "trials" and parts[2] == "subjects":
            sub = next((s for s in d["subjects"] if s["subject"] == parts[3]), None)
            if sub is None:
                self.problem(404, "Not Found", f"no subject {parts[3]!r} in {parts[1]}")
            else:
                self.send_json(200, {**{k: sub[k] for k in ("subject", "patient", "site", "arm", "enrolled")}, "values": d["values"](sub)})
        elif parts == ["sites"]:
            trial = q.get("trial", [""])[0]
            text = q.get("q", [""])[0].strip().lower()
            items = [dict(s, active=True, trials=[TRIAL], version=1) for s in SITES if not trial or trial == TRIAL]
            if text:
                items = [s for s in items if any(text in str(s[k]).lower() for k in ("id", "name", "city"))]
            # Paged by id like the server: `limit`, `after` (the last id of the previous page), `next` a path.
            limit = int(q.get("limit", [self.site_page])[0])
            after = q.get("after", [None])[0]
            start = sum(1 for s in items if after is not None and s["id"] <= after)
            page = items[start:start + limit]
            nxt = None
            if start + limit < len(items):
                keep = {k: v[0] for k, v in q.items() if k in ("q", "trial", "limit")}
                nxt = "/sites?" + urlencode({**keep, "after": page[-1]["id"]})
            self.send_json(200, {"items": page, "total": len(items), "next": nxt})
        else:
            self.problem(404, "Not Found", f"no route {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--token", default="monitor-token")
    ap.add_argument("--partial", action="store_true", help="make adverse_events and ingest unavailable")
    ap.add_argument("--drift", action="store_true", help="change the AE counts on every dashboard request")
    ap.add_argument("--site-page", type=int, default=50, help="page size of GET /sites (the server's default is 50)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    Handler.data = build(args.partial)
    Handler.token = args.token
    Handler.drift = args.drift
    Handler.site_page = args.site_page
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.verbose = args.verbose
    signal.signal(signal.SIGTERM, lambda *_: (srv.server_close(), sys.exit(0)))
    print(f"mock clinflow on http://127.0.0.1:{srv.server_address[1]} (token {args.token!r})", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
