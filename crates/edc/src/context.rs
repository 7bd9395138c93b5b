//! The trial context an ingest runs in: the protocol and who is enrolled.
//!
//! The caller (the pipeline) builds it from what the store holds, the
//! protocol version in force and the enrolled subjects, and passes it by
//! reference; nothing here reads a database. Replacing the context (an
//! amendment, a new enrolment) is the caller's business: the context is an
//! immutable snapshot.

use std::collections::HashMap;

use clinflow_protocol::{Protocol, SiteId, Subject};
use time::Date;

/// What ingest needs to know of one enrolled subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// The logical id of the subject's `Patient` resource (what
    /// `Observation.subject` references: `Patient/{patient_id}`).
    pub patient_id: String,
    /// The enrolling site (data queries are opened for it).
    pub site: SiteId,
    /// The enrolment date: day 0 of the visit schedule.
    pub enrolled: Date,
}

/// The protocol plus a lookup of enrolled subjects by subject id.
#[derive(Debug, Clone)]
pub struct TrialContext {
    protocol: Protocol,
    subjects: HashMap<String, Enrolment>,
}

impl TrialContext {
    /// A context with no subjects yet; add them with [`TrialContext::enrol`].
    pub fn new(protocol: Protocol) -> TrialContext {
        TrialContext {
            protocol,
            subjects: HashMap::new(),
        }
    }

    /// A context from a parsed subjects file. The patient id is the subject
    /// id, as [`clinflow_protocol::fhir::patient`] makes it.
    pub fn from_subjects(protocol: Protocol, subjects: &[Subject]) -> TrialContext {
        let mut ctx = TrialContext::new(protocol);
        for s in subjects {
            ctx.enrol(
                s.id.as_str(),
                Enrolment {
                    patient_id: s.id.as_str().to_string(),
                    site: s.site.clone(),
                    enrolled: s.enrolled,
                },
            );
        }
        ctx
    }

    /// Adds (or replaces) the enrolment of `subject_id`.
    pub fn enrol(&mut self, subject_id: &str, enrolment: Enrolment) {
        self.subjects.insert(subject_id.to_string(), enrolment);
    }

    /// The protocol.
    pub fn protocol(&self) -> &Protocol {
        &self.protocol
    }

    /// The enrolment of `subject_id`, `None` when the subject is not enrolled.
    pub fn enrolment(&self, subject_id: &str) -> Option<&Enrolment> {
        self.subjects.get(subject_id)
    }
}
