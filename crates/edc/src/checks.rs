//! The protocol's edit checks that every format shares: the measurement's
//! unit (equal, or convertible by the protocol's `convert`), the hard range
//! (reject) and the soft range (store and open a query), the trial period
//! and the visit window. Format modules find the measurement and the date;
//! these functions decide.

use clinflow_fhir::Json;
use clinflow_protocol::{Measurement, Protocol, Range};
use time::Date;

use crate::context::Enrolment;
use crate::json::{fmt_f64, format_computed, num, obj, ss};
use crate::outcome::{DataQuery, Reason};
use crate::provenance::{CANONICAL_QUANTITY_URL, UNSCHEDULED};

/// UCUM's code system.
pub const UCUM_SYSTEM: &str = "http://unitsofmeasure.org";

/// A value that passed the unit and hard-range checks.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedValue {
    /// The value in the canonical unit.
    pub canonical: f64,
    /// Its decimal text, when the value was converted (else the value as
    /// sent is already canonical).
    pub converted_text: Option<String>,
    /// The soft range, when the value is outside it (a query is due).
    pub outside_soft: Option<Range>,
}

impl CheckedValue {
    /// The canonical value as text: the converted text, or `sent`.
    pub fn canonical_text<'a>(&'a self, sent: &'a str) -> &'a str {
        self.converted_text.as_deref().unwrap_or(sent)
    }
}

/// Checks `value` (sent in `unit`) against measurement `m`: the unit must
/// be the canonical one or one of `convert`, and the value in the
/// canonical unit inside `hard`. Outside `soft` is not an error: it is
/// reported in [`CheckedValue::outside_soft`].
pub fn check_value(m: &Measurement, value: f64, unit: &str) -> Result<CheckedValue, Reason> {
    let canonical = m.convert_to_canonical(value, unit).ok_or_else(|| {
        let mut expected = vec![m.unit.as_str().to_string()];
        expected.extend(m.convert.iter().map(|c| c.unit.as_str().to_string()));
        Reason::WrongUnit {
            unit: unit.to_string(),
            measurement: m.id.clone(),
            expected: expected.join(", "),
        }
    })?;
    let converted_text = (unit != m.unit.as_str()).then(|| format_computed(canonical));
    if !m.hard.contains(canonical) {
        return Err(Reason::OutsideHardRange {
            measurement: m.id.clone(),
            value: converted_text.clone().unwrap_or_else(|| fmt_f64(canonical)),
            unit: m.unit.as_str().to_string(),
            low: fmt_f64(m.hard.low()),
            high: fmt_f64(m.hard.high()),
        });
    }
    let outside_soft = m.soft.filter(|r| !r.contains(canonical));
    Ok(CheckedValue {
        canonical,
        converted_text,
        outside_soft,
    })
}

/// Checks that `date` (the value's local date) is inside the trial period,
/// and gives the visit it belongs to by window, or [`UNSCHEDULED`].
pub fn check_date(
    protocol: &Protocol,
    enrolment: &Enrolment,
    date: Date,
) -> Result<String, Reason> {
    if !protocol.period.contains(date) {
        return Err(Reason::OutsidePeriod {
            date: iso(date),
            start: iso(protocol.period.start),
            end: iso(protocol.period.end),
        });
    }
    Ok(protocol
        .visit_for(enrolment.enrolled, date)
        .map_or_else(|| UNSCHEDULED.to_string(), |v| v.id.clone()))
}

/// `YYYY-MM-DD`.
pub(crate) fn iso(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// A UCUM `Quantity` from normalised decimal text; no unit elements when
/// `unit` is empty.
pub(crate) fn quantity(value_text: &str, unit: &str) -> Json {
    if unit.is_empty() {
        return obj([("value", Some(num(value_text)))]);
    }
    obj([
        ("value", Some(num(value_text))),
        ("unit", ss(unit)),
        ("system", ss(UCUM_SYSTEM)),
        ("code", ss(unit)),
    ])
}

/// The canonical-quantity extension of a converted value.
pub(crate) fn canonical_extension(m: &Measurement, checked: &CheckedValue) -> Option<Json> {
    let text = checked.converted_text.as_deref()?;
    Some(obj([
        ("url", ss(CANONICAL_QUANTITY_URL)),
        ("valueQuantity", Some(quantity(text, m.unit.as_str()))),
    ]))
}

/// The data query for a stored value outside the soft range, if it is.
/// `(index, resource)`: the item's index and the resource's in the item.
pub(crate) fn soft_query(
    (index, resource): (usize, usize),
    subject: &str,
    enrolment: &Enrolment,
    m: &Measurement,
    checked: &CheckedValue,
    sent_text: &str,
    location: &str,
) -> Option<DataQuery> {
    let soft = checked.outside_soft?;
    let value = checked.canonical_text(sent_text).to_string();
    Some(DataQuery {
        index,
        resource,
        subject: subject.to_string(),
        site: enrolment.site.clone(),
        measurement: m.id.clone(),
        text: format!(
            "{} {} {} is outside the expected range [{}, {}]: please confirm",
            m.display,
            value,
            m.unit,
            fmt_f64(soft.low()),
            fmt_f64(soft.high())
        ),
        value,
        unit: m.unit.as_str().to_string(),
        soft,
        location: location.to_string(),
    })
}
