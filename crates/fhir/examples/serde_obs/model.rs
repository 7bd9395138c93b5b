//! Hand-written serde models of R4 `Observation` and the datatypes it uses:
//! the "own typed models" option of decision 0001 (`docs/decisions/0001-fhirkit.md`).
//!
//! Written the way a team would write them to validate what it stores:
//! every element of R4 Observation (4.0.1), `deny_unknown_fields` on every
//! struct, required elements as non-`Option` fields, required code bindings as
//! enums, choice types (`value[x]`, `effective[x]`) as one field per variant
//! (serde's `flatten` cannot be combined with `deny_unknown_fields`), checked
//! for "at most one" after decoding by the example.
//!
//! Deliberate gaps, each measured or discussed in the decision record:
//! decimals are `f64` (`7.40` reads as 7.4), primitive extensions (`_status`)
//! are not modelled so they are rejected as unknown fields, `Extension`
//! carries 11 of R4's 50 `value[x]` types, `contained` resources and
//! `effectiveTiming` are left undecoded, and `null`, `[]` and `""` (all
//! invalid in FHIR JSON) are accepted.
//!
//! No dependency on clinflow: `bench/fhir-compile-time.sh` compiles this file
//! alone as a crate to measure what such models cost to build.

// Fields exist to be decoded (and so validated); most are never read.
#![allow(dead_code)]

use serde::Deserialize;

/// `Observation.status`, required binding `ObservationStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObservationStatus {
    Registered,
    Preliminary,
    Final,
    Amended,
    Corrected,
    Cancelled,
    EnteredInError,
    Unknown,
}

/// `Narrative.status`, required binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NarrativeStatus {
    Generated,
    Extensions,
    Additional,
    Empty,
}

/// `Quantity.comparator`, required binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum QuantityComparator {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = ">")]
    Gt,
}

/// `Identifier.use`, required binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentifierUse {
    Usual,
    Official,
    Temp,
    Secondary,
    Old,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Observation {
    /// Must be `"Observation"`; checked after decoding.
    pub resource_type: String,
    pub id: Option<String>,
    pub meta: Option<Meta>,
    pub implicit_rules: Option<String>,
    pub language: Option<String>,
    pub text: Option<Narrative>,
    /// Any resource type: not modelled (it would take all 146).
    #[serde(default)]
    pub contained: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    #[serde(default)]
    pub modifier_extension: Vec<Extension>,
    #[serde(default)]
    pub identifier: Vec<Identifier>,
    #[serde(default)]
    pub based_on: Vec<Reference>,
    #[serde(default)]
    pub part_of: Vec<Reference>,
    pub status: ObservationStatus,
    #[serde(default)]
    pub category: Vec<CodeableConcept>,
    pub code: CodeableConcept,
    pub subject: Option<Reference>,
    #[serde(default)]
    pub focus: Vec<Reference>,
    pub encounter: Option<Reference>,
    pub effective_date_time: Option<String>,
    pub effective_period: Option<Period>,
    /// `Timing` is not modelled; accepted undecoded.
    pub effective_timing: Option<serde::de::IgnoredAny>,
    pub effective_instant: Option<String>,
    pub issued: Option<String>,
    #[serde(default)]
    pub performer: Vec<Reference>,
    pub value_quantity: Option<Quantity>,
    pub value_codeable_concept: Option<CodeableConcept>,
    pub value_string: Option<String>,
    pub value_boolean: Option<bool>,
    pub value_integer: Option<i32>,
    pub value_range: Option<Range>,
    pub value_ratio: Option<Ratio>,
    pub value_sampled_data: Option<SampledData>,
    pub value_time: Option<String>,
    pub value_date_time: Option<String>,
    pub value_period: Option<Period>,
    pub data_absent_reason: Option<CodeableConcept>,
    #[serde(default)]
    pub interpretation: Vec<CodeableConcept>,
    #[serde(default)]
    pub note: Vec<Annotation>,
    pub body_site: Option<CodeableConcept>,
    pub method: Option<CodeableConcept>,
    pub specimen: Option<Reference>,
    pub device: Option<Reference>,
    #[serde(default)]
    pub reference_range: Vec<ReferenceRange>,
    #[serde(default)]
    pub has_member: Vec<Reference>,
    #[serde(default)]
    pub derived_from: Vec<Reference>,
    #[serde(default)]
    pub component: Vec<Component>,
}

/// `Observation.component`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Component {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    #[serde(default)]
    pub modifier_extension: Vec<Extension>,
    pub code: CodeableConcept,
    pub value_quantity: Option<Quantity>,
    pub value_codeable_concept: Option<CodeableConcept>,
    pub value_string: Option<String>,
    pub value_boolean: Option<bool>,
    pub value_integer: Option<i32>,
    pub value_range: Option<Range>,
    pub value_ratio: Option<Ratio>,
    pub value_sampled_data: Option<SampledData>,
    pub value_time: Option<String>,
    pub value_date_time: Option<String>,
    pub value_period: Option<Period>,
    pub data_absent_reason: Option<CodeableConcept>,
    #[serde(default)]
    pub interpretation: Vec<CodeableConcept>,
    #[serde(default)]
    pub reference_range: Vec<ReferenceRange>,
}

/// `Observation.referenceRange`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReferenceRange {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    #[serde(default)]
    pub modifier_extension: Vec<Extension>,
    pub low: Option<Quantity>,
    pub high: Option<Quantity>,
    #[serde(rename = "type")]
    pub kind: Option<CodeableConcept>,
    #[serde(default)]
    pub applies_to: Vec<CodeableConcept>,
    pub age: Option<Range>,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Meta {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    pub source: Option<String>,
    #[serde(default)]
    pub profile: Vec<String>,
    #[serde(default)]
    pub security: Vec<Coding>,
    #[serde(default)]
    pub tag: Vec<Coding>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Narrative {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub status: NarrativeStatus,
    pub div: String,
}

/// `Extension`, with 11 of R4's 50 `value[x]` types.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Extension {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub url: String,
    pub value_string: Option<String>,
    pub value_code: Option<String>,
    pub value_boolean: Option<bool>,
    pub value_integer: Option<i32>,
    pub value_decimal: Option<f64>,
    pub value_uri: Option<String>,
    pub value_date_time: Option<String>,
    pub value_coding: Option<Coding>,
    pub value_codeable_concept: Option<CodeableConcept>,
    pub value_quantity: Option<Quantity>,
    pub value_reference: Option<Reference>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Coding {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub system: Option<String>,
    pub version: Option<String>,
    pub code: Option<String>,
    pub display: Option<String>,
    pub user_selected: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeableConcept {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    #[serde(default)]
    pub coding: Vec<Coding>,
    pub text: Option<String>,
}

/// `Quantity` (also `SimpleQuantity`, `Age`, `Duration`...). `value` is an
/// `f64`: `7.40` reads as 7.4 and cannot be written back as sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantity {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub value: Option<f64>,
    pub comparator: Option<QuantityComparator>,
    pub unit: Option<String>,
    pub system: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub reference: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub identifier: Option<Box<Identifier>>,
    pub display: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identifier {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    #[serde(rename = "use")]
    pub use_: Option<IdentifierUse>,
    #[serde(rename = "type")]
    pub kind: Option<CodeableConcept>,
    pub system: Option<String>,
    pub value: Option<String>,
    pub period: Option<Period>,
    pub assigner: Option<Box<Reference>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Period {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub start: Option<String>,
    pub end: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub low: Option<Quantity>,
    pub high: Option<Quantity>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ratio {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub numerator: Option<Quantity>,
    pub denominator: Option<Quantity>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SampledData {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub origin: Quantity,
    pub period: f64,
    pub factor: Option<f64>,
    pub lower_limit: Option<f64>,
    pub upper_limit: Option<f64>,
    pub dimensions: u32,
    pub data: Option<String>,
}

/// `Annotation`; `author[x]` as its two variants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Annotation {
    pub id: Option<String>,
    #[serde(default)]
    pub extension: Vec<Extension>,
    pub author_reference: Option<Reference>,
    pub author_string: Option<String>,
    pub time: Option<String>,
    pub text: String,
}
