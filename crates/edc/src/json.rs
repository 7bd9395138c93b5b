//! Builders for fhirkit's lossless JSON (numbers are kept as text, so a
//! decimal keeps the precision it was sent with) and decimal normalisation.

use clinflow_fhir::Json;

/// An object from `(key, value)` pairs, skipping `None` values.
pub(crate) fn obj<const N: usize>(members: [(&str, Option<Json>); N]) -> Json {
    Json::Object(
        members
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect(),
    )
}

/// A string value.
pub(crate) fn s(v: &str) -> Json {
    Json::String(v.to_string())
}

/// `Some(string)`.
pub(crate) fn ss(v: &str) -> Option<Json> {
    Some(s(v))
}

/// An array, `None` when empty (FHIR forbids empty arrays).
pub(crate) fn arr(items: Vec<Json>) -> Option<Json> {
    (!items.is_empty()).then_some(Json::Array(items))
}

/// A FHIR decimal from text already normalised by [`decimal_text`].
pub(crate) fn num(text: &str) -> Json {
    Json::Number(text.to_string())
}

/// An integer.
pub(crate) fn int(v: i64) -> Json {
    Json::Number(v.to_string())
}

/// The text of an HL7 NM / CSV / JSON number as a FHIR decimal (which is a
/// JSON number): optional sign, digits, optional fraction. A leading `+`
/// is dropped, `.5` becomes `0.5`, `5.` becomes `5`, leading zeros go.
/// Exponents, spaces, `NaN` and everything else are `None`. Returns the
/// text and its value.
pub(crate) fn decimal_text(raw: &str) -> Option<(String, f64)> {
    let t = raw.trim();
    let (neg, body) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (int_part, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if int_part.is_empty() && frac.is_empty() {
        return None;
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Very long numbers are not measurements; this also keeps f64 parsing
    // and the text bounded.
    if int_part.len() + frac.len() > 40 {
        return None;
    }
    let int_trim = int_part.trim_start_matches('0');
    let mut text = String::new();
    let zero = int_trim.is_empty() && frac.bytes().all(|b| b == b'0');
    if neg && !zero {
        text.push('-');
    }
    text.push_str(if int_trim.is_empty() { "0" } else { int_trim });
    if !frac.is_empty() {
        text.push('.');
        text.push_str(frac);
    }
    let value: f64 = text.parse().ok()?;
    value.is_finite().then_some((text, value))
}

/// A computed value (a unit conversion) as decimal text: at most six
/// decimals, trailing zeros trimmed, so `6.1 * 18.016` reads `109.8976`.
pub(crate) fn format_computed(v: f64) -> String {
    let mut t = format!("{v:.6}");
    if t.contains('.') {
        while t.ends_with('0') {
            t.pop();
        }
        if t.ends_with('.') {
            t.pop();
        }
    }
    if t == "-0" {
        t = "0".into();
    }
    t
}

/// A float as the shortest decimal text (for range bounds in messages).
pub(crate) fn fmt_f64(v: f64) -> String {
    format!("{v}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_normalised() {
        let t = |s: &str| decimal_text(s).map(|(t, _)| t);
        assert_eq!(t("112").as_deref(), Some("112"));
        assert_eq!(t("+7.40").as_deref(), Some("7.40"));
        assert_eq!(t(".5").as_deref(), Some("0.5"));
        assert_eq!(t("5.").as_deref(), Some("5"));
        assert_eq!(t("007").as_deref(), Some("7"));
        assert_eq!(t("-0").as_deref(), Some("0"));
        assert_eq!(t("-1.5").as_deref(), Some("-1.5"));
        for bad in ["", ".", "-", "1e3", "NaN", "1,5", "1.2.3", "abc", " - 1"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn computed_values_are_rounded_and_trimmed() {
        assert_eq!(format_computed(6.1 * 18.016), "109.8976");
        assert_eq!(format_computed(100.0), "100");
        assert_eq!(format_computed(-0.0000001), "0");
    }
}
