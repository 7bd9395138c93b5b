//! Search parameters and the index entries a resource yields.
//!
//! The store writes one row per [`IndexEntry`] in the same transaction as the
//! resource version, and answers searches from those rows only.

use crate::resource::Resource;

/// The type of a search parameter, as FHIR defines them (the ones clinflow uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Date,
    Reference,
    Quantity,
}

/// A search parameter clinflow supports for a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamDef {
    /// `code`, `date`, `subject`, ...
    pub name: &'static str,
    pub kind: ParamKind,
}

/// The value of one index row.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// Coding, CodeableConcept, Identifier, code, boolean. `system` is `None`
    /// when the element has none.
    Token { system: Option<String>, code: String },
    /// Normalised for matching: lower case, accents and punctuation kept.
    String { value: String },
    /// The range of instants the value covers.
    Date { low: i64, high: i64 },
    /// A literal local reference `Type/id`.
    Reference { target_type: String, target_id: String },
    /// A Quantity's value with its system and code (UCUM for clinflow data).
    Quantity { value: f64, system: Option<String>, code: Option<String> },
}

/// One index row for one search parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub param: &'static str,
    pub value: IndexValue,
}

/// What the store keeps beside a resource version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Extracted {
    pub entries: Vec<IndexEntry>,
    /// The id of the Patient whose compartment the resource is in (the
    /// Patient itself, or the target of `subject`/`patient`/`individual`
    /// when it is `Patient/ID`). Site scoping and the `patient` role use it.
    pub patient: Option<String>,
    /// For a ResearchSubject: the site (Organization id) from clinflow's
    /// site extension [`SITE_EXTENSION`].
    pub subject_site: Option<String>,
    /// The value `_sort=date` orders by (low end of the `date` parameter).
    pub sort_date: Option<i64>,
}

/// The extension on ResearchSubject that names the trial site (valueReference
/// `Organization/SITE_ID`). R4's ResearchSubject has no site element.
pub const SITE_EXTENSION: &str = "https://clinflow.dev/fhir/StructureDefinition/research-subject-site";

/// The search parameters of `resource_type` (besides `_id` and `_lastUpdated`,
/// which every type has).
pub fn params(resource_type: &str) -> &'static [ParamDef] {
    todo!("{resource_type}")
}

/// The resource types clinflow indexes for search.
pub fn indexed_types() -> &'static [&'static str] {
    todo!()
}

/// Index entries, compartment and sort key of a resource.
pub fn extract(resource: &Resource) -> Extracted {
    todo!("{resource:?}")
}
