//! Accepting one DICOM instance, from C-STORE or STOW-RS alike: parse
//! (total: a corrupt or truncated file is refused with the parser's
//! reason), check, link to the trial's subject or quarantine, write the
//! file, index it with its series' analysis task and an audit record.
//!
//! What a caller gets back is either `Stored` or a [`Refusal`] with the
//! DICOM status it maps to; nothing of a refused instance is kept.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use clinflow_edc::TrialContext;
use clinflow_imaging::{Instance, InstanceMeta};
use clinflow_store::{now_millis, AuditRecord, DicomInstanceRecord, PutInstance, TaskSpec};

use super::files::{dataset_offset, sha256_hex};
use super::Imaging;

/// An instance as it arrived.
pub enum Input {
    /// A Part 10 file (STOW-RS).
    Part10(Vec<u8>),
    /// A bare dataset with its C-STORE command's identifiers.
    Dataset {
        dataset: Vec<u8>,
        transfer_syntax: String,
        sop_class_uid: String,
        sop_instance_uid: String,
    },
}

/// Who sends, once per association or request.
#[derive(Debug, Clone)]
pub struct Sender {
    /// Token name, or `dimse:CALLING_AE`.
    pub actor: String,
    pub role: String,
    pub client: Option<String>,
    /// `dimse` or `stow`.
    pub source: &'static str,
    /// A site user may store studies of its own site's subjects only.
    pub site_only: Option<String>,
    /// STOW-RS to `/studies/{study}`: every instance must be of it.
    pub study: Option<String>,
}

/// Why an instance was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a readable DICOM instance (the parser's reason and place).
    Corrupt(String),
    /// The SOP Instance UID was stored before with other content.
    Duplicate,
    /// The caller may not store this study.
    NotAuthorized(String),
    /// The instance contradicts what is stored or what was asked.
    Conflict(String),
    /// Storage failed (the disk, the database).
    Failed,
}

impl Refusal {
    /// The C-STORE status (PS3.4 B.2.3) and STOW-RS Failure Reason.
    pub fn status(&self) -> u16 {
        use clinflow_dimse::status;
        match self {
            Refusal::Corrupt(_) => status::CANNOT_UNDERSTAND,
            Refusal::Duplicate => status::DUPLICATE_SOP_INSTANCE,
            Refusal::NotAuthorized(_) => 0x0124,
            Refusal::Conflict(_) => status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            Refusal::Failed => status::PROCESSING_FAILURE,
        }
    }

    /// A reason for the sender. It never repeats patient data.
    pub fn comment(&self) -> String {
        match self {
            Refusal::Corrupt(r) => format!("not a readable DICOM instance: {r}"),
            Refusal::Duplicate => {
                "this SOP Instance UID was stored before with different content".into()
            }
            Refusal::NotAuthorized(r) | Refusal::Conflict(r) => r.clone(),
            Refusal::Failed => "the instance could not be stored; send it again".into(),
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Corrupt(_) => "corrupt",
            Refusal::Duplicate => "duplicate",
            Refusal::NotAuthorized(_) => "not_authorized",
            Refusal::Conflict(_) => "conflict",
            Refusal::Failed => "failed",
        }
    }
}

/// A stored instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// Sent before with the same content: nothing written this time.
    pub duplicate: bool,
    pub quarantined: bool,
}

/// What one association or request has stored so far, and what it read
/// once for all its instances.
#[derive(Default)]
pub struct Session {
    /// The trial's subjects, read at the first instance.
    trial: Option<Option<Arc<TrialContext>>>,
    /// Study UID -> its PatientID, as stored or checked.
    studies: HashMap<String, String>,
    /// Studies and series stored to (their ImagingStudy to write and tasks
    /// to release at the end).
    pub touched_studies: BTreeSet<String>,
    pub touched_series: BTreeSet<String>,
}

/// Where a study goes: to its subject's Patient, or quarantine.
enum Placement {
    Linked { patient: String, site: String },
    Quarantine(String),
}

impl Imaging {
    /// Accepts one instance (see the module documentation).
    pub async fn accept(
        &self,
        input: Input,
        sender: &Sender,
        session: &mut Session,
    ) -> Result<Stored, Refusal> {
        let parsed = tokio::task::spawn_blocking(move || parse(input))
            .await
            .map_err(|_| Refusal::Corrupt("the parser failed".into()))??;
        let meta = &parsed.instance.meta;
        check_uids(meta)?;
        if let Some(study) = &sender.study {
            if *study != meta.study_uid {
                return Err(Refusal::Conflict(
                    "the instance belongs to another study than the one in the request path".into(),
                ));
            }
        }
        self.check_study_patient(meta, session).await?;
        let placement = self.place(meta, session).await?;
        if let (Some(own), Placement::Linked { site, .. }) = (&sender.site_only, &placement) {
            if own != site {
                return Err(Refusal::NotAuthorized(
                    "the study's subject is enrolled at another site".into(),
                ));
            }
        }
        if let Some(prev) = self
            .store
            .dicom_instance(&meta.sop_instance_uid)
            .await
            .map_err(|e| self.failed(e))?
        {
            return self.duplicate(prev.sha256 == parsed.sha256, meta, &placement);
        }
        let (files, sha) = (self.files.clone(), parsed.sha256.clone());
        let file = parsed.file;
        let size = file.len() as i64;
        let path = tokio::task::spawn_blocking(move || files.put_object(&sha, &file))
            .await
            .map_err(|e| self.failed(e.into()))?
            .map_err(|e| self.failed(e.into()))?;
        let now = now_millis();
        let attrs = serde_json::json!({
            "meta": serde_json::to_value(meta).unwrap_or_default(),
            "dicom": parsed.dicom_json,
        });
        let (subject, site, quarantine) = match &placement {
            Placement::Linked { patient, site } => {
                (Some(patient.clone()), Some(site.clone()), None)
            }
            Placement::Quarantine(r) => (None, None, Some(r.clone())),
        };
        let rec = DicomInstanceRecord {
            sop_instance_uid: meta.sop_instance_uid.clone(),
            series_uid: meta.series_uid.clone(),
            study_uid: meta.study_uid.clone(),
            patient_id: meta.patient_id.clone(),
            subject,
            site,
            study_date: meta.study_date.clone(),
            accession: meta.accession.clone(),
            modality: meta.modality.clone(),
            series_number: meta.series_number,
            sop_class_uid: meta.sop_class_uid.clone(),
            transfer_syntax: meta.transfer_syntax.clone(),
            instance_number: meta.instance_number,
            path,
            size,
            sha256: parsed.sha256.clone(),
            attrs: attrs.to_string(),
            source: sender.source.to_string(),
            received_at: now,
        };
        let audit = vec![AuditRecord {
            time: now,
            actor: sender.actor.clone(),
            role: sender.role.clone(),
            action: "dicom-store".into(),
            resource_type: Some("ImagingStudy".into()),
            resource_id: Some(clinflow_imaging::imaging_study_id(&meta.study_uid)),
            outcome: if quarantine.is_some() {
                "quarantined".into()
            } else {
                "success".into()
            },
            client: sender.client.clone(),
            detail: Some(format!("source={}", sender.source)),
            ..Default::default()
        }];
        let put = match quarantine.clone() {
            Some(reason) => {
                self.store
                    .put_quarantined_dicom_instance(rec, reason, audit)
                    .await
            }
            None => {
                let task = TaskSpec {
                    settle_until: now + self.config.settle.as_millis() as i64,
                    max_attempts: self.config.max_attempts,
                };
                self.store.put_dicom_instance(rec, task, audit).await
            }
        }
        .map_err(|e| self.failed(e))?;
        if let PutInstance::Duplicate { same_content } = put {
            // Another sender got in between the check and the write.
            return self.duplicate(same_content, meta, &placement);
        }
        session.touched_studies.insert(meta.study_uid.clone());
        if quarantine.is_none() {
            session.touched_series.insert(meta.series_uid.clone());
        }
        self.metrics.received(
            sender.source,
            if quarantine.is_some() {
                "quarantined"
            } else {
                "stored"
            },
        );
        Ok(Stored {
            study_uid: meta.study_uid.clone(),
            series_uid: meta.series_uid.clone(),
            sop_class_uid: meta.sop_class_uid.clone(),
            sop_instance_uid: meta.sop_instance_uid.clone(),
            duplicate: false,
            quarantined: quarantine.is_some(),
        })
    }

    fn duplicate(
        &self,
        same_content: bool,
        meta: &InstanceMeta,
        placement: &Placement,
    ) -> Result<Stored, Refusal> {
        if !same_content {
            return Err(Refusal::Duplicate);
        }
        Ok(Stored {
            study_uid: meta.study_uid.clone(),
            series_uid: meta.series_uid.clone(),
            sop_class_uid: meta.sop_class_uid.clone(),
            sop_instance_uid: meta.sop_instance_uid.clone(),
            duplicate: true,
            quarantined: matches!(placement, Placement::Quarantine(_)),
        })
    }

    fn failed(&self, e: anyhow::Error) -> Refusal {
        tracing::error!(error = %e, "storing a DICOM instance failed");
        Refusal::Failed
    }

    /// A study UID already stored for another patient is refused: one of
    /// the two senders has the wrong patient, and merging them would file
    /// images under the wrong person.
    async fn check_study_patient(
        &self,
        meta: &InstanceMeta,
        session: &mut Session,
    ) -> Result<(), Refusal> {
        let known = match session.studies.get(&meta.study_uid) {
            Some(p) => Some(p.clone()),
            None => {
                let q = clinflow_store::DicomQuery {
                    study_uid: Some(meta.study_uid.clone()),
                    include_quarantined: true,
                    limit: 1,
                    ..Default::default()
                };
                let found = self
                    .store
                    .dicom_studies(q)
                    .await
                    .map_err(|e| self.failed(e))?;
                found.into_iter().next().map(|s| s.patient_id)
            }
        };
        match known {
            Some(p) if p != meta.patient_id => Err(Refusal::Conflict(
                "the study is stored with another PatientID".into(),
            )),
            _ => {
                session
                    .studies
                    .insert(meta.study_uid.clone(), meta.patient_id.clone());
                Ok(())
            }
        }
    }

    async fn place(
        &self,
        meta: &InstanceMeta,
        session: &mut Session,
    ) -> Result<Placement, Refusal> {
        if session.trial.is_none() {
            let ctx = crate::ingest::context::load(&self.store)
                .await
                .map_err(|e| self.failed(e))?;
            session.trial = Some(ctx.map(Arc::new));
        }
        let Some(Some(trial)) = &session.trial else {
            return Ok(Placement::Quarantine(
                "no trial is loaded: the PatientID cannot be linked to a subject".into(),
            ));
        };
        match trial.enrolment(&meta.patient_id) {
            Some(e) => Ok(Placement::Linked {
                patient: e.patient_id.clone(),
                site: e.site.as_str().to_string(),
            }),
            None => Ok(Placement::Quarantine(format!(
                "the PatientID is not a subject of trial {}",
                trial.protocol().id.as_str()
            ))),
        }
    }
}

/// A parsed instance with what is stored of it.
struct Parsed {
    instance: Instance,
    /// The Part 10 file kept.
    file: Vec<u8>,
    /// Of the dataset (not the file meta group, which differs between a
    /// C-STORE and a STOW-RS of the same instance).
    sha256: String,
    dicom_json: serde_json::Value,
}

fn parse(input: Input) -> Result<Parsed, Refusal> {
    let corrupt = |e: clinflow_imaging::ParseError| Refusal::Corrupt(e.to_string());
    let (instance, file, sha256) = match input {
        Input::Part10(bytes) => {
            let instance = clinflow_imaging::parse_part10(&bytes).map_err(corrupt)?;
            let sha = sha256_hex(&bytes[dataset_offset(&bytes).unwrap_or(0)..]);
            (instance, bytes, sha)
        }
        Input::Dataset {
            dataset,
            transfer_syntax,
            sop_class_uid,
            sop_instance_uid,
        } => {
            let instance = clinflow_imaging::parse_dataset(
                &dataset,
                &transfer_syntax,
                &sop_class_uid,
                &sop_instance_uid,
            )
            .map_err(corrupt)?;
            let sha = sha256_hex(&dataset);
            let file = clinflow_imaging::part10_from_dataset(
                &dataset,
                &transfer_syntax,
                &sop_class_uid,
                &sop_instance_uid,
            );
            (instance, file, sha)
        }
    };
    let dicom_json = instance.dicom_json(None);
    Ok(Parsed {
        instance,
        file,
        sha256,
        dicom_json,
    })
}

/// A UID is 1 to 64 characters of digits and dots (PS3.5 9.1).
pub fn valid_uid(uid: &str) -> bool {
    (1..=64).contains(&uid.len()) && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn check_uids(meta: &InstanceMeta) -> Result<(), Refusal> {
    for (name, uid) in [
        ("SOP Instance UID", &meta.sop_instance_uid),
        ("Series Instance UID", &meta.series_uid),
        ("Study Instance UID", &meta.study_uid),
        ("SOP Class UID", &meta.sop_class_uid),
    ] {
        if !valid_uid(uid) {
            return Err(Refusal::Corrupt(format!(
                "the {name} is not a valid UID (1 to 64 digits and dots)"
            )));
        }
    }
    if meta.patient_id.trim().is_empty() {
        return Err(Refusal::Corrupt("PatientID (0010,0020) is empty".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_digits_and_dots() {
        assert!(valid_uid("1.2.840.10008.5.1.4.1.1.2"));
        assert!(!valid_uid(""));
        assert!(!valid_uid("1.2.x"));
        assert!(!valid_uid("../etc"));
        assert!(!valid_uid(&"1".repeat(65)));
    }

    #[test]
    fn refusals_map_to_dicom_statuses() {
        assert_eq!(Refusal::Corrupt("x".into()).status(), 0xC000);
        assert_eq!(Refusal::Duplicate.status(), 0x0111);
        assert_eq!(Refusal::Failed.status(), 0x0110);
        assert!(Refusal::Corrupt("at byte 7".into())
            .comment()
            .contains("at byte 7"));
    }
}
