//! Exact sums of FHIR `Money`: decimal text in, decimal text out, never a
//! float (a bill that is off by a cent is wrong).

use std::collections::BTreeMap;

/// Fraction digits kept: FHIR decimals carry at most what was sent, and
/// currencies use at most 4 (e.g. CLF); more is refused, not rounded.
const SCALE: u32 = 4;

/// A running total per currency, in units of 10^-4.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    by_currency: BTreeMap<String, (i128, u32)>,
}

/// Why an amount could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount {0:?} is not a decimal with at most 4 fraction digits")]
    BadValue(String),
    #[error("currency {0:?} is not a 3-letter ISO 4217 code")]
    BadCurrency(String),
    #[error("the total overflows")]
    Overflow,
}

impl Totals {
    /// Adds `value` (decimal text, e.g. `"123.40"`) in `currency`.
    pub fn add(&mut self, value: &str, currency: &str) -> Result<(), MoneyError> {
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(MoneyError::BadCurrency(currency.to_string()));
        }
        let (units, digits) = parse(value).ok_or_else(|| MoneyError::BadValue(value.into()))?;
        let e = self
            .by_currency
            .entry(currency.to_string())
            .or_insert((0, 0));
        e.0 = e.0.checked_add(units).ok_or(MoneyError::Overflow)?;
        e.1 = e.1.max(digits);
        Ok(())
    }

    /// `(value, currency)` per currency, in currency order; each value has
    /// at least 2 fraction digits, more only when an amount had more.
    pub fn render(&self) -> Vec<(String, String)> {
        self.by_currency
            .iter()
            .map(|(c, (units, digits))| (format_units(*units, (*digits).max(2)), c.clone()))
            .collect()
    }
}

/// `-?digits(.digits)?` -> (units of 10^-SCALE, fraction digits written).
fn parse(s: &str) -> Option<(i128, u32)> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty()
        || int.len() > 20
        || !int.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > SCALE as usize
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (body.contains('.') && frac.is_empty())
    {
        return None;
    }
    let mut units: i128 = int.parse().ok()?;
    for i in 0..SCALE as usize {
        let d = frac.as_bytes().get(i).map_or(0, |b| i128::from(b - b'0'));
        units = units * 10 + d;
    }
    Some((if neg { -units } else { units }, frac.len() as u32))
}

fn format_units(units: i128, digits: u32) -> String {
    let sign = if units < 0 { "-" } else { "" };
    let abs = units.unsigned_abs();
    let scale = 10u128.pow(SCALE);
    let frac = format!("{:04}", abs % scale);
    format!("{sign}{}.{}", abs / scale, &frac[..digits as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sums_are_exact_and_keep_two_decimals() {
        let mut t = Totals::default();
        for v in ["0.10", "0.20", "80.00", "12.5"] {
            t.add(v, "EUR").unwrap();
        }
        t.add("3", "USD").unwrap();
        assert_eq!(
            t.render(),
            vec![
                ("92.80".into(), "EUR".into()),
                ("3.00".into(), "USD".into())
            ]
        );
    }

    #[test]
    fn more_fraction_digits_are_kept_not_rounded() {
        let mut t = Totals::default();
        t.add("1.2345", "CLF").unwrap();
        t.add("-0.0005", "CLF").unwrap();
        assert_eq!(t.render(), vec![("1.2340".into(), "CLF".into())]);
    }

    #[test]
    fn bad_amounts_and_currencies_are_refused() {
        let mut t = Totals::default();
        for v in ["", "1.", ".5", "1.23456", "1e3", "+1", "--1", "1,00", "NaN"] {
            assert_eq!(
                t.add(v, "EUR"),
                Err(MoneyError::BadValue(v.into())),
                "{v:?}"
            );
        }
        assert!(matches!(t.add("1", "eur"), Err(MoneyError::BadCurrency(_))));
        assert!(t.render().is_empty(), "nothing was added");
    }

    proptest! {
        #[test]
        fn adding_is_total(v in ".{0,30}", c in ".{0,4}") {
            let _ = Totals::default().add(&v, &c);
        }

        #[test]
        fn cents_sum_like_integers(cents in prop::collection::vec(-10_000_000i64..10_000_000, 0..50)) {
            let mut t = Totals::default();
            for c in &cents {
                let sign = if *c < 0 { "-" } else { "" };
                t.add(&format!("{sign}{}.{:02}", c.abs() / 100, c.abs() % 100), "EUR").unwrap();
            }
            let sum: i64 = cents.iter().sum();
            let expected = if cents.is_empty() { vec![] } else {
                let sign = if sum < 0 { "-" } else { "" };
                vec![(format!("{sign}{}.{:02}", sum.abs() / 100, sum.abs() % 100), "EUR".to_string())]
            };
            prop_assert_eq!(t.render(), expected);
        }
    }
}
