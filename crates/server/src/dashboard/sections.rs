//! The dashboard's numbers, computed from parsed rows: no I/O here, so each
//! section is a pure function of the trial's resources and "today".
//!
//! Days are UTC day numbers (days since 1970-01-01); instants are
//! milliseconds since the epoch.

use std::collections::{BTreeMap, HashMap};

use clinflow_protocol::Protocol;
use serde_json::{json, Value};
use time::Date;

const DAY_MS: i64 = 86_400_000;
/// Entries listed per visit state (the counts cover all of them).
pub const LIST_LIMIT: usize = 200;

/// The UTC day number of a date.
pub fn day_of(d: Date) -> i64 {
    i64::from(d.to_julian_day()) - 2_440_588
}

/// The date of a UTC day number.
pub fn date_of(day: i64) -> String {
    Date::from_julian_day((day + 2_440_588) as i32)
        .map(clinflow_protocol::types::format_date)
        .unwrap_or_default()
}

/// The UTC day of an instant.
pub fn day_of_ms(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// A `ResearchSubject` of the trial.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectRow {
    pub subject: String,
    pub patient: String,
    pub site: String,
    pub arm: String,
    pub enrolled: i64,
    pub status: String,
}

/// An `AdverseEvent` of a subject.
#[derive(Debug, Clone, PartialEq)]
pub struct AeRow {
    pub id: String,
    pub patient: String,
    /// When it happened (ms).
    pub date: Option<i64>,
    /// When it was recorded (`recordedDate`, else when it was stored).
    pub recorded: i64,
    pub severity: Option<String>,
    pub serious: Option<bool>,
}

/// An `Appointment` of a subject.
#[derive(Debug, Clone, PartialEq)]
pub struct AppointmentRow {
    pub patient: String,
    pub start: i64,
    pub status: String,
}

/// Enrolment per site and arm, and cumulative by week against the plan.
/// `sites` are the (id, name) pairs to report; `with_target` is false for a
/// caller who sees one site only (the plan is the trial's).
pub fn enrolment(
    p: &Protocol,
    sites: &[(String, String)],
    subjects: &[SubjectRow],
    today: i64,
    with_target: bool,
) -> Value {
    let mut by_arm: BTreeMap<&str, u64> = p.arms.iter().map(|a| (a.as_str(), 0)).collect();
    let mut by_site = Vec::new();
    for (id, name) in sites {
        let mut arms: BTreeMap<&str, u64> = p.arms.iter().map(|a| (a.as_str(), 0)).collect();
        let mut total = 0;
        for s in subjects.iter().filter(|s| &s.site == id) {
            *arms.entry(s.arm.as_str()).or_default() += 1;
            total += 1;
        }
        by_site.push(json!({"site": id, "name": name, "total": total, "by_arm": arms}));
    }
    for s in subjects {
        *by_arm.entry(s.arm.as_str()).or_default() += 1;
    }
    let start = day_of(p.period.start);
    let end = day_of(p.period.end).min(today);
    let plan = p.enrolment.filter(|_| with_target);
    let planned = |day: i64| -> Option<f64> {
        let plan = plan?;
        let by = day_of(plan.by.unwrap_or(p.period.end));
        let span = (by - start).max(1) as f64;
        let f = ((day - start) as f64 / span).clamp(0.0, 1.0);
        Some((f64::from(plan.target) * f * 10.0).round() / 10.0)
    };
    // Weeks start on Mondays (day 0, 1970-01-01, was a Thursday).
    let monday = |day: i64| day - (day + 3).rem_euclid(7);
    let mut enrolled_by_week: BTreeMap<i64, u64> = BTreeMap::new();
    for s in subjects {
        *enrolled_by_week.entry(monday(s.enrolled)).or_default() += 1;
    }
    let mut weekly = Vec::new();
    let mut cumulative = 0u64;
    // Enrolled before the period's first week (not expected) still counts.
    cumulative += enrolled_by_week
        .range(..monday(start))
        .map(|(_, n)| n)
        .sum::<u64>();
    let mut week = monday(start);
    while week <= end {
        let n = enrolled_by_week.get(&week).copied().unwrap_or(0);
        cumulative += n;
        weekly.push(json!({
            "week": date_of(week),
            "enrolled": n,
            "cumulative": cumulative,
            "target": planned(week + 6),
        }));
        week += 7;
    }
    json!({
        "total": subjects.len(),
        "target": plan.map(|p| p.target),
        "by_site": by_site,
        "by_arm": by_arm,
        "weekly": weekly,
    })
}

/// Adverse events by severity and seriousness; serious ones recorded later
/// than the protocol's `serious_report_hours` after they happened.
pub fn adverse_events(
    p: &Protocol,
    events: &[AeRow],
    subject_of: &HashMap<String, (String, String)>,
) -> Value {
    let mut by_severity: BTreeMap<String, u64> = ["mild", "moderate", "severe"]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    let (mut serious, mut non_serious, mut unknown) = (0u64, 0u64, 0u64);
    let limit_ms = i64::from(p.adverse_events.serious_report_hours) * 3_600_000;
    let mut late = Vec::new();
    for e in events {
        *by_severity
            .entry(e.severity.clone().unwrap_or_else(|| "unknown".into()))
            .or_default() += 1;
        match e.serious {
            Some(true) => serious += 1,
            Some(false) => non_serious += 1,
            None => unknown += 1,
        }
        if e.serious == Some(true) {
            if let Some(date) = e.date {
                let delay = e.recorded - date;
                if delay > limit_ms {
                    let (subject, site) = subject_of.get(&e.patient).cloned().unwrap_or_default();
                    late.push((
                        delay,
                        json!({
                            "id": e.id,
                            "subject": subject,
                            "site": site,
                            "date": clinflow_fhir::datetime::format_instant(date),
                            "recorded": clinflow_fhir::datetime::format_instant(e.recorded),
                            "hours": (delay as f64 / 360_000.0).round() / 10.0,
                        }),
                    ));
                }
            }
        }
    }
    late.sort_by_key(|l| std::cmp::Reverse(l.0));
    let late_total = late.len();
    late.truncate(LIST_LIMIT);
    let mut by_seriousness = json!({"serious": serious, "non-serious": non_serious});
    if unknown > 0 {
        by_seriousness["unknown"] = json!(unknown);
    }
    json!({
        "total": events.len(),
        "by_severity": by_severity,
        "by_seriousness": by_seriousness,
        "serious_report_hours": p.adverse_events.serious_report_hours,
        "serious_late_total": late_total,
        "serious_late": late.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}

/// `ResearchSubject.status` codes of a subject with no visits to come (they
/// count as enrolled, but not in the visit schedule).
fn left_the_study(status: &str) -> bool {
    matches!(
        status,
        "withdrawn" | "ineligible" | "not-registered" | "off-study"
    )
}

/// Appointment statuses that mean the visit took place.
fn attended(status: &str) -> bool {
    matches!(status, "fulfilled" | "arrived" | "checked-in")
}

/// Appointment statuses of a visit still planned.
fn planned(status: &str) -> bool {
    matches!(status, "booked" | "pending" | "proposed" | "waitlist")
}

/// The visit schedule: each subject's protocol visits (enrolment + day,
/// with its window), done when an attended appointment falls in the
/// window; otherwise missed once the window has closed, overdue once the
/// target day has passed, upcoming when due within `horizon` days.
pub fn visits(
    p: &Protocol,
    subjects: &[SubjectRow],
    appointments: &[AppointmentRow],
    today: i64,
    horizon: i64,
) -> Value {
    let mut by_patient: HashMap<&str, Vec<&AppointmentRow>> = HashMap::new();
    for a in appointments {
        by_patient.entry(a.patient.as_str()).or_default().push(a);
    }
    let mut by_visit: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    let (mut upcoming, mut overdue, mut missed) = (Vec::new(), Vec::new(), Vec::new());
    for s in subjects.iter().filter(|s| !left_the_study(&s.status)) {
        let appts = by_patient
            .get(s.patient.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for v in &p.visits {
            let due = s.enrolled + i64::from(v.day);
            let (low, high) = v.window_days();
            let (from, to) = (s.enrolled + low, s.enrolled + high);
            let in_window = |a: &&&AppointmentRow| {
                let d = day_of_ms(a.start);
                from <= d && d <= to
            };
            let done = appts.iter().filter(in_window).any(|a| attended(&a.status));
            let state = if done {
                "completed"
            } else if to < today {
                "missed"
            } else if due < today {
                "overdue"
            } else if due <= today + horizon {
                "upcoming"
            } else {
                "scheduled"
            };
            *by_visit
                .entry(v.id.as_str())
                .or_default()
                .entry(state)
                .or_default() += 1;
            let list = match state {
                "upcoming" => &mut upcoming,
                "overdue" => &mut overdue,
                "missed" => &mut missed,
                _ => continue,
            };
            let booked = appts
                .iter()
                .filter(in_window)
                .filter(|a| planned(&a.status))
                .map(|a| a.start)
                .min();
            list.push((
                due,
                json!({
                    "subject": s.subject,
                    "site": s.site,
                    "visit": v.id,
                    "due": date_of(due),
                    "window": [date_of(from), date_of(to)],
                    "appointment": booked.map(clinflow_fhir::datetime::format_instant),
                }),
            ));
        }
    }
    let totals =
        json!({"upcoming": upcoming.len(), "overdue": overdue.len(), "missed": missed.len()});
    // Soonest first for what is coming, latest first for what is late.
    upcoming.sort_by_key(|(d, _)| *d);
    overdue.sort_by_key(|(d, _)| -*d);
    missed.sort_by_key(|(d, _)| -*d);
    let cut = |l: Vec<(i64, Value)>| {
        l.into_iter()
            .take(LIST_LIMIT)
            .map(|(_, v)| v)
            .collect::<Vec<_>>()
    };
    let by_visit: BTreeMap<&str, Value> = p
        .visits
        .iter()
        .map(|v| {
            let c = by_visit.get(v.id.as_str());
            let n = |k: &str| c.and_then(|c| c.get(k)).copied().unwrap_or(0);
            (
                v.id.as_str(),
                json!({
                    "completed": n("completed"), "upcoming": n("upcoming"), "overdue": n("overdue"),
                    "missed": n("missed"), "scheduled": n("scheduled"),
                }),
            )
        })
        .collect();
    json!({
        "today": date_of(today),
        "horizon_days": horizon,
        "totals": totals,
        "upcoming": cut(upcoming),
        "overdue": cut(overdue),
        "missed": cut(missed),
        "by_visit": by_visit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protocol() -> Protocol {
        clinflow_protocol::parse_yaml(include_str!("../../../../reference-trial/protocol.yaml"))
            .expect("the reference protocol")
    }

    fn subject(n: u32, site: &str, arm: &str, enrolled: i64) -> SubjectRow {
        SubjectRow {
            subject: format!("S{n}"),
            patient: format!("P{n}"),
            site: site.into(),
            arm: arm.into(),
            enrolled,
            status: "on-study".into(),
        }
    }

    #[test]
    fn day_numbers_round_trip() {
        let d = clinflow_protocol::types::parse_date("2026-03-02").unwrap();
        assert_eq!(date_of(day_of(d)), "2026-03-02");
        assert_eq!(day_of_ms(day_of(d) * DAY_MS + 5), day_of(d));
        assert_eq!(day_of_ms(-1), -1);
    }

    #[test]
    fn enrolment_adds_up_by_site_arm_and_week() {
        let p = protocol();
        let start = day_of(p.period.start);
        let subjects = vec![
            subject(1, "a", "drug-x", start + 10),
            subject(2, "a", "placebo", start + 11),
            subject(3, "b", "drug-x", start + 30),
        ];
        let sites = vec![
            ("a".to_string(), "A".to_string()),
            ("b".to_string(), "B".to_string()),
        ];
        let v = enrolment(&p, &sites, &subjects, start + 60, true);
        assert_eq!(v["total"], 3);
        assert_eq!(v["by_site"][0]["total"], 2);
        assert_eq!(v["by_site"][0]["by_arm"]["placebo"], 1);
        assert_eq!(v["by_arm"]["drug-x"], 2);
        let weekly = v["weekly"].as_array().unwrap();
        let sum: u64 = weekly.iter().map(|w| w["enrolled"].as_u64().unwrap()).sum();
        assert_eq!(sum, 3);
        assert_eq!(weekly.last().unwrap()["cumulative"], 3);
        // Cumulative never decreases.
        assert!(weekly
            .windows(2)
            .all(|w| w[0]["cumulative"].as_u64() <= w[1]["cumulative"].as_u64()));
        // No plan in the reference protocol: no target.
        assert!(v["target"].is_null() && weekly[0]["target"].is_null());
        let mut planned = p.clone();
        planned.enrolment = Some(clinflow_protocol::EnrolmentPlan {
            target: 100,
            by: None,
        });
        let v = enrolment(&planned, &sites, &subjects, start + 60, true);
        assert_eq!(v["target"], 100);
        let t: Vec<f64> = v["weekly"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["target"].as_f64().unwrap())
            .collect();
        assert!(t.windows(2).all(|w| w[0] <= w[1]) && t[0] >= 0.0 && *t.last().unwrap() < 100.0);
        assert!(enrolment(&planned, &sites, &subjects, start + 60, false)["target"].is_null());
    }

    #[test]
    fn late_serious_events_are_the_ones_past_the_reporting_limit() {
        let p = protocol();
        let h = i64::from(p.adverse_events.serious_report_hours) * 3_600_000;
        let ae = |id: &str, serious: Option<bool>, delay: i64, sev: Option<&str>| AeRow {
            id: id.into(),
            patient: "P1".into(),
            date: Some(1_000_000),
            recorded: 1_000_000 + delay,
            severity: sev.map(str::to_string),
            serious,
        };
        let events = vec![
            ae("on-time", Some(true), h, Some("severe")),
            ae("late", Some(true), h + 1, Some("moderate")),
            ae(
                "mild-late-but-not-serious",
                Some(false),
                10 * h,
                Some("mild"),
            ),
            ae("unknown", None, 0, None),
        ];
        let subjects = HashMap::from([("P1".to_string(), ("S1".to_string(), "a".to_string()))]);
        let v = adverse_events(&p, &events, &subjects);
        assert_eq!(v["total"], 4);
        assert_eq!(v["by_severity"]["severe"], 1);
        assert_eq!(v["by_severity"]["unknown"], 1);
        assert_eq!(v["by_seriousness"]["serious"], 2);
        assert_eq!(v["by_seriousness"]["unknown"], 1);
        let late = v["serious_late"].as_array().unwrap();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0]["id"], "late");
        assert_eq!(late[0]["subject"], "S1");
    }

    #[test]
    fn each_visit_is_in_exactly_one_state() {
        let p = protocol();
        let today = day_of(p.period.start) + 100;
        // Enrolled 90 days ago: week-4 (day 28) is past its window.
        let s = subject(1, "a", "drug-x", today - 90);
        let appt = |day: i64, status: &str| AppointmentRow {
            patient: "P1".into(),
            start: day * DAY_MS + 9 * 3_600_000,
            status: status.into(),
        };
        let week4 = p.visits.iter().find(|v| v.id == "week-4").unwrap();
        let week12 = p.visits.iter().find(|v| v.id == "week-12").unwrap();
        let none = visits(&p, std::slice::from_ref(&s), &[], today, 14);
        assert_eq!(none["by_visit"]["week-4"]["missed"], 1);
        // week-12 is due at day 84, 6 days ago, its window still open.
        assert_eq!(none["by_visit"]["week-12"]["overdue"], 1);
        let done = visits(
            &p,
            std::slice::from_ref(&s),
            &[
                appt(s.enrolled + i64::from(week4.day), "fulfilled"),
                appt(s.enrolled + i64::from(week12.day) + 1, "booked"),
            ],
            today,
            14,
        );
        assert_eq!(done["by_visit"]["week-4"]["completed"], 1);
        assert_eq!(done["by_visit"]["week-12"]["overdue"], 1);
        assert!(done["overdue"][0]["appointment"].is_string());
        let total: u64 = done["by_visit"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|c| c.as_object().unwrap().values())
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(total, p.visits.len() as u64);
        // Enrolled today: baseline is today, upcoming; week-4 is further off.
        let new = subject(2, "a", "placebo", today);
        let mut gone = new.clone();
        gone.status = "withdrawn".into();
        let v = visits(&p, std::slice::from_ref(&gone), &[], today, 14);
        assert_eq!(
            v["totals"]["upcoming"], 0,
            "a withdrawn subject has no visits to come"
        );
        let v = visits(&p, &[new], &[], today, 14);
        assert_eq!(v["by_visit"]["baseline"]["upcoming"], 1);
        assert_eq!(v["by_visit"]["week-4"]["scheduled"], 1);
        assert_eq!(v["upcoming"][0]["due"], date_of(today));
    }
}
