//! The ORU^R01 structure as a typed view: patients, their orders (OBR),
//! each order's observations (OBX) and the notes (NTE) of each level.
//! Still HL7, not FHIR: codes keep their HL7 coding systems (`LN`, `UCUM`)
//! and values are decoded text.
//!
//! Errors are split by what they spoil:
//! - [`OruR01::read`] fails (a message-level [`StructureError`]) only when
//!   nothing of the message can be used: not an ORU^R01, no PID before the
//!   results, or a PID without an identifier (PID-3).
//! - An order whose OBR is bad keeps its observations; [`Order::obr`] is
//!   the error.
//! - Each observation is an [`Observation`] whose `obx` is `Ok` or the
//!   error of that OBX (missing OBX-3, bad OBX-14, ...), so the pipeline
//!   stores the good values and rejects the bad ones, each with its OBX's
//!   location.
//! - Problems that belong to no OBX (an OBX before any OBR, a segment out
//!   of place, an invalid birth date) go to [`OruR01::issues`].
//!
//! Segments of the standard structure that clinflow does not read (SFT,
//! PD1, NK1, PV1, PV2, ORC, TQ1, TQ2, CTD, FT1, CTI, PRT, ROL, DSC) and
//! Z-segments are skipped. OBX segments inside an SPM group describe the
//! specimen: they are kept apart, in [`Order::specimen_observations`],
//! never mixed with the results nor dropped. Explicit nulls (`""`) read as
//! absent.

use std::borrow::Cow;

use crate::ack::{AckError, ErrorCode, ErrorLocation, Severity};
use crate::dtm::{parse_dtm, Dtm};
use crate::error::{ErrorKind, Location, ParseError, SegmentId};
use crate::header::Msh;
use crate::message::{Component, Field, Message, Repetition, Segment};

/// What is wrong with the structure or a value of an ORU^R01.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StructureErrorKind {
    /// MSH-9 is not ORU^R01.
    #[error("not an ORU^R01 message (MSH-9 is {found:?})")]
    NotOruR01 {
        /// MSH-9 as sent.
        found: String,
    },
    /// Results without a PID before them, or no PID at all.
    #[error("no PID segment before the results")]
    MissingPid,
    /// A required field is absent or empty.
    #[error("required field {field} is missing")]
    MissingField {
        /// The field, as `OBX-3`.
        field: &'static str,
    },
    /// An OBX with no OBR before it (in its patient).
    #[error("OBX before any OBR: the observation belongs to no order")]
    ObxBeforeObr,
    /// A segment where ORU^R01 has none.
    #[error("unexpected {id} segment")]
    UnexpectedSegment {
        /// Its id.
        id: SegmentId,
    },
    /// A value that does not fit its data type.
    #[error("invalid {field}: {reason}")]
    InvalidValue {
        /// The field, as `OBX-14`.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A value that does not decode (bytes invalid for the character set).
    #[error("{0}")]
    Decode(ErrorKind),
}

/// A structure error and where it is. Boxed so that results stay small.
#[derive(Clone, PartialEq, Eq)]
pub struct StructureError(Box<(StructureErrorKind, Location)>);

impl std::fmt::Debug for StructureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StructureError")
            .field("kind", self.kind())
            .field("location", self.location())
            .finish()
    }
}

impl std::fmt::Display for StructureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.kind(), self.location())
    }
}

impl std::error::Error for StructureError {}

impl StructureError {
    /// A new error.
    pub fn new(kind: StructureErrorKind, location: Location) -> StructureError {
        StructureError(Box::new((kind, location)))
    }

    /// What.
    pub fn kind(&self) -> &StructureErrorKind {
        &self.0 .0
    }

    /// Where.
    pub fn location(&self) -> &Location {
        &self.0 .1
    }

    /// The ERR for this error, with the given severity: codes 200/201 (not
    /// ORU^R01), 100 (segment order), 101 (missing field), 102 (bad value).
    pub fn ack_error(&self, severity: Severity) -> AckError {
        let code = match self.kind() {
            StructureErrorKind::NotOruR01 { found } if found.starts_with("ORU") => {
                ErrorCode::UnsupportedEventCode
            }
            StructureErrorKind::NotOruR01 { .. } => ErrorCode::UnsupportedMessageType,
            StructureErrorKind::MissingPid
            | StructureErrorKind::ObxBeforeObr
            | StructureErrorKind::UnexpectedSegment { .. } => ErrorCode::SegmentSequenceError,
            StructureErrorKind::MissingField { .. } => ErrorCode::RequiredFieldMissing,
            StructureErrorKind::InvalidValue { .. } | StructureErrorKind::Decode(_) => {
                ErrorCode::DataTypeError
            }
        };
        AckError {
            location: ErrorLocation::from_location(self.location()),
            code,
            severity,
            text: self.to_string(),
        }
    }
}

impl From<ParseError> for StructureError {
    fn from(e: ParseError) -> Self {
        StructureError::new(StructureErrorKind::Decode(e.kind().clone()), *e.location())
    }
}

/// A coding: one `code^text^system` triplet of a CE/CWE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Coding<'a> {
    /// The code (`2345-7`).
    pub code: Option<Cow<'a, str>>,
    /// The text.
    pub display: Option<Cow<'a, str>>,
    /// The HL7 coding system (`LN`, `UCUM`).
    pub system: Option<Cow<'a, str>>,
}

/// A CX identifier of PID-3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cx<'a> {
    /// CX.1, the id.
    pub id: Cow<'a, str>,
    /// CX.4.1, the assigning authority's namespace id.
    pub assigning_authority: Option<Cow<'a, str>>,
    /// CX.5, the identifier type (`MR`, `RI`).
    pub id_type: Option<Cow<'a, str>>,
}

/// The first XPN of PID-5.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PersonName<'a> {
    /// XPN.1.1, family name.
    pub family: Option<Cow<'a, str>>,
    /// XPN.2, given name.
    pub given: Option<Cow<'a, str>>,
    /// XPN.3, further given names or initials.
    pub middle: Option<Cow<'a, str>>,
    /// XPN.4, suffix.
    pub suffix: Option<Cow<'a, str>>,
    /// XPN.5, prefix.
    pub prefix: Option<Cow<'a, str>>,
}

/// The PID segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pid<'a> {
    /// PID-3, every repetition with an id; never empty.
    pub ids: Vec<Cx<'a>>,
    /// PID-5, first repetition.
    pub name: Option<PersonName<'a>>,
    /// PID-7 (an invalid one is an issue and reads as `None`).
    pub birth_date: Option<Dtm>,
    /// PID-8.
    pub sex: Option<Cow<'a, str>>,
}

/// An EI entity identifier (OBR-2, OBR-3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ei<'a> {
    /// EI.1.
    pub entity_id: Cow<'a, str>,
    /// EI.2.
    pub namespace_id: Option<Cow<'a, str>>,
}

/// The OBR segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obr<'a> {
    /// OBR-1.
    pub set_id: Option<u32>,
    /// OBR-2.
    pub placer_order_number: Option<Ei<'a>>,
    /// OBR-3.
    pub filler_order_number: Option<Ei<'a>>,
    /// OBR-4, its codings (first repetition); never empty.
    pub universal_service_id: Vec<Coding<'a>>,
    /// OBR-7.
    pub observation_datetime: Option<Dtm>,
    /// OBR-8.
    pub observation_end: Option<Dtm>,
    /// OBR-22, results reported / status changed.
    pub results_reported: Option<Dtm>,
    /// OBR-24.
    pub diagnostic_service_section: Option<Cow<'a, str>>,
    /// OBR-25.
    pub result_status: Option<Cow<'a, str>>,
}

/// One repetition of OBX-5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObxValue<'a> {
    /// The whole repetition decoded (component separators kept): the value
    /// of ST, TX, FT, NM, DT, DTM, TM.
    pub text: Cow<'a, str>,
    /// Each component decoded: for CE/CWE, SN (`>^100`), and the like.
    pub components: Vec<Cow<'a, str>>,
}

impl<'a> ObxValue<'a> {
    /// Component `n` (from 1), when present and not empty.
    pub fn component(&self, n: usize) -> Option<&str> {
        self.components
            .get(n.checked_sub(1)?)
            .map(|c| c.as_ref())
            .filter(|c| !c.is_empty())
    }
}

/// The OBX segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obx<'a> {
    /// OBX-1.
    pub set_id: Option<u32>,
    /// OBX-2 (`NM`, `ST`, `CWE`, ...); present whenever OBX-5 is.
    pub value_type: Option<Cow<'a, str>>,
    /// OBX-3: its codings (`code^text^system^altcode^alttext^altsystem`,
    /// plus CWE.10-12); at least one has a code.
    pub identifier: Vec<Coding<'a>>,
    /// OBX-4.
    pub sub_id: Option<Cow<'a, str>>,
    /// OBX-5, the non-empty repetitions.
    pub values: Vec<ObxValue<'a>>,
    /// OBX-6 (`code^text^system`).
    pub units: Option<Coding<'a>>,
    /// OBX-7.
    pub reference_range: Option<Cow<'a, str>>,
    /// OBX-8, each repetition.
    pub interpretation: Vec<Coding<'a>>,
    /// OBX-11.
    pub result_status: Cow<'a, str>,
    /// OBX-14.
    pub observation_datetime: Option<Dtm>,
}

/// An NTE: NTE-3's repetitions joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note<'a> {
    /// NTE-2, the source of the comment.
    pub source: Option<Cow<'a, str>>,
    /// NTE-3.
    pub text: Cow<'a, str>,
    /// The NTE segment.
    pub location: Location,
}

/// An OBX with its notes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation<'a> {
    /// The OBX, or why it cannot be used.
    pub obx: Result<Obx<'a>, StructureError>,
    /// The NTE segments after it.
    pub notes: Vec<Note<'a>>,
    /// The OBX segment (for rejections and ERR-2).
    pub location: Location,
}

/// An OBR with its notes and observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order<'a> {
    /// The OBR, or why it cannot be used.
    pub obr: Result<Obr<'a>, StructureError>,
    /// The NTE segments after the OBR.
    pub notes: Vec<Note<'a>>,
    /// The OBX groups.
    pub observations: Vec<Observation<'a>>,
    /// The OBX groups inside SPM groups (observations about the specimen).
    pub specimen_observations: Vec<Observation<'a>>,
    /// The OBR segment.
    pub location: Location,
}

/// A PID with its notes and orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patient<'a> {
    /// The PID.
    pub pid: Pid<'a>,
    /// The NTE segments after the PID.
    pub notes: Vec<Note<'a>>,
    /// The OBR groups.
    pub orders: Vec<Order<'a>>,
    /// The PID segment.
    pub location: Location,
}

/// An ORU^R01 message read as a structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OruR01<'a> {
    /// The header.
    pub msh: Msh<'a>,
    /// The patient groups, in order; never empty.
    pub patients: Vec<Patient<'a>>,
    /// Problems that belong to no OBX (see the module docs).
    pub issues: Vec<StructureError>,
}

const SKIPPED: &[&str] = &[
    "SFT", "PD1", "NK1", "PV1", "PV2", "ORC", "TQ1", "TQ2", "CTD", "FT1", "CTI", "PRT", "ROL",
    "DSC",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Top,
    Patient,
    Order,
    Observation,
    /// After an OBX with no OBR: its NTEs go with it.
    Orphan,
    /// Inside an SPM group.
    Specimen,
    /// After an OBX of an SPM group.
    SpecimenObservation,
}

impl<'a> OruR01<'a> {
    /// Reads `msg` as an ORU^R01 (see the module docs for what fails where).
    pub fn read(msg: &Message<'a>) -> Result<OruR01<'a>, StructureError> {
        let msh = msg.msh().clone();
        let mt = msh.message_type();
        let is_oru = mt.code == "ORU"
            && (mt.trigger == "R01" || (mt.trigger.is_empty() && mt.structure == "ORU_R01"));
        if !is_oru {
            let found = format!("{}^{}^{}", mt.code, mt.trigger, mt.structure);
            let location = msg
                .segment(1)
                .map(|s| s.field_location(9))
                .unwrap_or_else(|| Location::at(msg.origin().offset, msg.origin().line));
            return Err(StructureError::new(
                StructureErrorKind::NotOruR01 {
                    found: found.trim_end_matches('^').to_owned(),
                },
                location,
            ));
        }
        let mut patients: Vec<Patient<'a>> = Vec::new();
        let mut issues = Vec::new();
        let mut level = Level::Top;
        for seg in msg.segments().skip(1) {
            let id = seg.id();
            match id {
                "PID" => {
                    patients.push(Patient {
                        pid: read_pid(&seg, &mut issues)?,
                        notes: Vec::new(),
                        orders: Vec::new(),
                        location: seg.location(),
                    });
                    level = Level::Patient;
                }
                "OBR" => {
                    let Some(p) = patients.last_mut() else {
                        return Err(StructureError::new(
                            StructureErrorKind::MissingPid,
                            seg.location(),
                        ));
                    };
                    p.orders.push(Order {
                        obr: read_obr(&seg),
                        notes: Vec::new(),
                        observations: Vec::new(),
                        specimen_observations: Vec::new(),
                        location: seg.location(),
                    });
                    level = Level::Order;
                }
                "OBX" if matches!(level, Level::Specimen | Level::SpecimenObservation) => {
                    // Only reachable with an order: see "SPM".
                    if let Some(o) = patients.last_mut().and_then(|p| p.orders.last_mut()) {
                        o.specimen_observations.push(Observation {
                            obx: read_obx(&seg),
                            notes: Vec::new(),
                            location: seg.location(),
                        });
                    }
                    level = Level::SpecimenObservation;
                }
                "OBX" => {
                    let Some(p) = patients.last_mut() else {
                        return Err(StructureError::new(
                            StructureErrorKind::MissingPid,
                            seg.location(),
                        ));
                    };
                    match p.orders.last_mut() {
                        Some(o) => {
                            o.observations.push(Observation {
                                obx: read_obx(&seg),
                                notes: Vec::new(),
                                location: seg.location(),
                            });
                            level = Level::Observation;
                        }
                        None => {
                            issues.push(StructureError::new(
                                StructureErrorKind::ObxBeforeObr,
                                seg.location(),
                            ));
                            level = Level::Orphan;
                        }
                    }
                }
                "NTE" => {
                    let target = match level {
                        Level::Patient => patients.last_mut().map(|p| &mut p.notes),
                        Level::Order => patients
                            .last_mut()
                            .and_then(|p| p.orders.last_mut())
                            .map(|o| &mut o.notes),
                        Level::Observation => patients
                            .last_mut()
                            .and_then(|p| p.orders.last_mut())
                            .and_then(|o| o.observations.last_mut())
                            .map(|o| &mut o.notes),
                        Level::SpecimenObservation => patients
                            .last_mut()
                            .and_then(|p| p.orders.last_mut())
                            .and_then(|o| o.specimen_observations.last_mut())
                            .map(|o| &mut o.notes),
                        Level::Orphan => continue,
                        Level::Top | Level::Specimen => None,
                    };
                    match (target, read_nte(&seg)) {
                        (Some(notes), Ok(note)) => notes.push(note),
                        (None, _) => issues.push(StructureError::new(
                            StructureErrorKind::UnexpectedSegment {
                                id: seg.segment_id(),
                            },
                            seg.location(),
                        )),
                        (_, Err(e)) => issues.push(e),
                    }
                }
                "SPM" => {
                    let in_order = patients.last().is_some_and(|p| !p.orders.is_empty());
                    if in_order {
                        level = Level::Specimen;
                    } else {
                        issues.push(StructureError::new(
                            StructureErrorKind::UnexpectedSegment {
                                id: seg.segment_id(),
                            },
                            seg.location(),
                        ));
                        level = Level::Orphan;
                    }
                }
                _ if SKIPPED.contains(&id) || id.starts_with('Z') => {}
                _ => issues.push(StructureError::new(
                    StructureErrorKind::UnexpectedSegment {
                        id: seg.segment_id(),
                    },
                    seg.location(),
                )),
            }
        }
        if patients.is_empty() {
            let location = msg
                .segment(msg.segment_count())
                .map(|s| s.location())
                .unwrap_or_else(|| Location::at(msg.origin().offset, msg.origin().line));
            return Err(StructureError::new(
                StructureErrorKind::MissingPid,
                location,
            ));
        }
        Ok(OruR01 {
            msh,
            patients,
            issues,
        })
    }

    /// Every observation with its patient and order, in message order.
    pub fn observations(
        &self,
    ) -> impl Iterator<Item = (&Patient<'a>, &Order<'a>, &Observation<'a>)> {
        self.patients.iter().flat_map(|p| {
            p.orders
                .iter()
                .flat_map(move |o| o.observations.iter().map(move |x| (p, o, x)))
        })
    }
}

/// Text of a decoded value, `None` when empty or the explicit null `""`.
fn present(c: Cow<'_, str>) -> Option<Cow<'_, str>> {
    (!c.is_empty() && c != "\"\"").then_some(c)
}

/// A segment's fields, split once: lookups by number are then O(1)
/// instead of a scan of the segment each.
struct Fields<'a> {
    seg: Segment<'a>,
    list: Vec<Field<'a>>,
}

impl<'a> Fields<'a> {
    fn new(seg: &Segment<'a>) -> Fields<'a> {
        Fields {
            seg: *seg,
            list: seg.fields().collect(),
        }
    }

    fn get(&self, n: usize) -> Option<Field<'a>> {
        self.list.get(n.checked_sub(1)?).copied()
    }

    fn location(&self, n: usize) -> Location {
        match self.get(n) {
            Some(f) => f.location(),
            None => self.seg.field_location(n),
        }
    }

    fn first_rep(&self, n: usize) -> Option<Repetition<'a>> {
        self.get(n).and_then(|f| f.repetition(1))
    }

    /// Field `n`'s first repetition, whole.
    fn text(&self, n: usize) -> Result<Option<Cow<'a, str>>, StructureError> {
        match self.first_rep(n) {
            Some(r) => Ok(present(r.decoded()?)),
            None => Ok(None),
        }
    }

    fn required(&self, n: usize, name: &'static str) -> Result<Cow<'a, str>, StructureError> {
        self.text(n)?.ok_or_else(|| {
            StructureError::new(
                StructureErrorKind::MissingField { field: name },
                self.location(n),
            )
        })
    }

    fn set_id(&self, name: &'static str) -> Result<Option<u32>, StructureError> {
        match self.text(1)? {
            None => Ok(None),
            Some(t) => t.trim().parse::<u32>().map(Some).map_err(|_| {
                StructureError::new(
                    StructureErrorKind::InvalidValue {
                        field: name,
                        reason: format!(
                            "{:?} is not a sequence number",
                            t.chars().take(20).collect::<String>()
                        ),
                    },
                    self.location(1),
                )
            }),
        }
    }

    fn dtm(&self, n: usize, name: &'static str) -> Result<Option<Dtm>, StructureError> {
        let Some(c) = self.get(n).and_then(|f| f.component(1)) else {
            return Ok(None);
        };
        let Some(t) = present(c.decoded()?) else {
            return Ok(None);
        };
        parse_dtm(&t).map(Some).map_err(|e| {
            StructureError::new(
                StructureErrorKind::InvalidValue {
                    field: name,
                    reason: format!("{:?}: {e}", t.chars().take(32).collect::<String>()),
                },
                c.location(),
            )
        })
    }

    fn comps(&self, n: usize) -> Comps<'a> {
        Comps::new(self.first_rep(n).as_ref())
    }

    fn ei(&self, n: usize) -> Result<Option<Ei<'a>>, StructureError> {
        let c = self.comps(n);
        let Some(entity_id) = c.text(1)? else {
            return Ok(None);
        };
        Ok(Some(Ei {
            entity_id,
            namespace_id: c.text(2)?,
        }))
    }
}

/// A repetition's components, split once.
struct Comps<'a>(Vec<Component<'a>>);

impl<'a> Comps<'a> {
    fn new(rep: Option<&Repetition<'a>>) -> Comps<'a> {
        Comps(rep.map(|r| r.components().collect()).unwrap_or_default())
    }

    fn text(&self, n: usize) -> Result<Option<Cow<'a, str>>, StructureError> {
        match n.checked_sub(1).and_then(|i| self.0.get(i)) {
            Some(c) => Ok(present(c.decoded()?)),
            None => Ok(None),
        }
    }

    fn sub(&self, n: usize, s: usize) -> Result<Option<Cow<'a, str>>, StructureError> {
        let c = n.checked_sub(1).and_then(|i| self.0.get(i));
        match c.and_then(|c| c.subcomponent(s)) {
            Some(c) => Ok(present(c.decoded()?)),
            None => Ok(None),
        }
    }

    fn coding(
        &self,
        (c, d, s): (usize, usize, usize),
    ) -> Result<Option<Coding<'a>>, StructureError> {
        let code = self.text(c)?;
        let display = self.text(d)?;
        if code.is_none() && display.is_none() {
            return Ok(None);
        }
        Ok(Some(Coding {
            code,
            display,
            system: self.text(s)?,
        }))
    }

    /// Every triplet of a CE/CWE with a code or a text.
    fn codings(&self) -> Result<Vec<Coding<'a>>, StructureError> {
        let mut out = Vec::new();
        for t in TRIPLETS {
            out.extend(self.coding(t)?);
        }
        Ok(out)
    }
}

const TRIPLETS: [(usize, usize, usize); 3] = [(1, 2, 3), (4, 5, 6), (10, 11, 12)];

fn read_pid<'a>(
    seg: &Segment<'a>,
    issues: &mut Vec<StructureError>,
) -> Result<Pid<'a>, StructureError> {
    let f = Fields::new(seg);
    let mut ids = Vec::new();
    if let Some(field) = f.get(3) {
        for rep in field.repetitions() {
            let c = Comps::new(Some(&rep));
            if let Some(id) = c.text(1)? {
                ids.push(Cx {
                    id,
                    assigning_authority: c.sub(4, 1)?,
                    id_type: c.text(5)?,
                });
            }
        }
    }
    if ids.is_empty() {
        return Err(StructureError::new(
            StructureErrorKind::MissingField { field: "PID-3" },
            f.location(3),
        ));
    }
    let c = f.comps(5);
    let name = PersonName {
        family: c.sub(1, 1)?,
        given: c.text(2)?,
        middle: c.text(3)?,
        suffix: c.text(4)?,
        prefix: c.text(5)?,
    };
    let birth_date = f.dtm(7, "PID-7").unwrap_or_else(|e| {
        issues.push(e);
        None
    });
    Ok(Pid {
        ids,
        name: (name != PersonName::default()).then_some(name),
        birth_date,
        sex: f.text(8)?,
    })
}

fn read_obr<'a>(seg: &Segment<'a>) -> Result<Obr<'a>, StructureError> {
    let f = Fields::new(seg);
    let universal_service_id = f.comps(4).codings()?;
    if !universal_service_id.iter().any(|c| c.code.is_some()) {
        return Err(StructureError::new(
            StructureErrorKind::MissingField { field: "OBR-4" },
            f.location(4),
        ));
    }
    Ok(Obr {
        set_id: f.set_id("OBR-1")?,
        placer_order_number: f.ei(2)?,
        filler_order_number: f.ei(3)?,
        universal_service_id,
        observation_datetime: f.dtm(7, "OBR-7")?,
        observation_end: f.dtm(8, "OBR-8")?,
        results_reported: f.dtm(22, "OBR-22")?,
        diagnostic_service_section: f.text(24)?,
        result_status: f.text(25)?,
    })
}

fn values<'a>(f: Option<Field<'a>>) -> Result<Vec<ObxValue<'a>>, StructureError> {
    let Some(f) = f.filter(|f| !f.is_empty()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for rep in f.repetitions() {
        let Some(text) = present(rep.decoded()?) else {
            continue;
        };
        let components = rep
            .components()
            .map(|c| c.decoded())
            .collect::<Result<Vec<_>, _>>()?;
        out.push(ObxValue { text, components });
    }
    Ok(out)
}

fn read_obx<'a>(seg: &Segment<'a>) -> Result<Obx<'a>, StructureError> {
    let f = Fields::new(seg);
    let identifier = f.comps(3).codings()?;
    if !identifier.iter().any(|c| c.code.is_some()) {
        return Err(StructureError::new(
            StructureErrorKind::MissingField { field: "OBX-3" },
            f.location(3),
        ));
    }
    let values = values(f.get(5))?;
    let value_type = f.text(2)?;
    if value_type.is_none() && !values.is_empty() {
        return Err(StructureError::new(
            StructureErrorKind::MissingField { field: "OBX-2" },
            f.location(2),
        ));
    }
    let mut interpretation = Vec::new();
    if let Some(field) = f.get(8) {
        for rep in field.repetitions() {
            interpretation.extend(Comps::new(Some(&rep)).coding((1, 2, 3))?);
        }
    }
    Ok(Obx {
        set_id: f.set_id("OBX-1")?,
        value_type,
        identifier,
        sub_id: f.text(4)?,
        values,
        units: f.comps(6).coding((1, 2, 3))?,
        reference_range: f.text(7)?,
        interpretation,
        result_status: f.required(11, "OBX-11")?,
        observation_datetime: f.dtm(14, "OBX-14")?,
    })
}

fn read_nte<'a>(seg: &Segment<'a>) -> Result<Note<'a>, StructureError> {
    let f = Fields::new(seg);
    let mut parts: Vec<Cow<'a, str>> = Vec::new();
    if let Some(field) = f.get(3) {
        for rep in field.repetitions() {
            parts.push(rep.decoded()?);
        }
    }
    let joined = if parts.len() == 1 {
        parts.pop().unwrap_or_default()
    } else {
        Cow::Owned(parts.join("\n"))
    };
    Ok(Note {
        source: f.text(2)?,
        text: joined,
        location: seg.location(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split_messages;

    const SAMPLE: &[u8] = include_bytes!("../../../reference-trial/samples/lab-results.hl7");
    const HEAD: &str = "MSH|^~\\&|LIS|LAB|CF|SITE|20260302091500+0100||ORU^R01^ORU_R01|C1|P|2.5.1||||||UNICODE UTF-8";

    fn read(body: &str) -> Result<OruR01<'static>, StructureError> {
        let text: &'static str = Box::leak(format!("{HEAD}\r{body}").into_boxed_str());
        let m = Message::parse(text.as_bytes()).unwrap();
        OruR01::read(&m)
    }

    #[test]
    fn sample_messages() {
        let pieces = split_messages(SAMPLE);
        let m = pieces[0].parse(SAMPLE).unwrap();
        let oru = OruR01::read(&m).unwrap();
        assert!(oru.issues.is_empty());
        assert_eq!(oru.patients.len(), 1);
        let p = &oru.patients[0];
        assert_eq!(p.pid.ids.len(), 1);
        assert_eq!(p.pid.ids[0].id, "CARDIO-01-0003");
        assert_eq!(
            p.pid.ids[0].assigning_authority.as_deref(),
            Some("CARDIO-01")
        );
        assert_eq!(p.pid.ids[0].id_type.as_deref(), Some("RI"));
        let name = p.pid.name.as_ref().unwrap();
        assert_eq!(
            (name.family.as_deref(), name.given.as_deref()),
            (Some("Schmidt"), Some("Anna"))
        );
        assert_eq!(
            p.pid.birth_date.unwrap().to_fhir_datetime().unwrap(),
            "1970-07-01"
        );
        assert_eq!(p.pid.sex.as_deref(), Some("F"));
        assert_eq!(p.orders.len(), 1);
        let o = &p.orders[0];
        let obr = o.obr.as_ref().unwrap();
        assert_eq!(obr.set_id, Some(1));
        assert_eq!(
            obr.placer_order_number.as_ref().unwrap().entity_id,
            "ORD-7781"
        );
        assert_eq!(
            obr.filler_order_number.as_ref().unwrap().entity_id,
            "LAB-99120"
        );
        assert_eq!(obr.universal_service_id[0].code.as_deref(), Some("24323-8"));
        assert_eq!(obr.universal_service_id[0].system.as_deref(), Some("LN"));
        assert_eq!(
            obr.observation_datetime
                .unwrap()
                .to_fhir_datetime()
                .unwrap(),
            "2026-03-02T07:15:00+01:00"
        );
        assert_eq!(
            obr.results_reported.unwrap().to_fhir_datetime().unwrap(),
            "2026-03-02T09:10:00+01:00"
        );
        assert_eq!(obr.diagnostic_service_section.as_deref(), Some("CH"));
        assert_eq!(obr.result_status.as_deref(), Some("F"));
        assert_eq!(o.observations.len(), 2);
        let x = o.observations[0].obx.as_ref().unwrap();
        assert_eq!(x.set_id, Some(1));
        assert_eq!(x.value_type.as_deref(), Some("NM"));
        assert_eq!(x.identifier.len(), 1);
        assert_eq!(x.identifier[0].code.as_deref(), Some("2345-7"));
        assert_eq!(
            x.identifier[0].display.as_deref(),
            Some("Glucose [Mass/volume] in Serum or Plasma")
        );
        assert_eq!(x.values.len(), 1);
        assert_eq!(x.values[0].text, "112");
        let units = x.units.as_ref().unwrap();
        assert_eq!(
            (units.code.as_deref(), units.system.as_deref()),
            (Some("mg/dL"), Some("UCUM"))
        );
        assert_eq!(x.reference_range.as_deref(), Some("70-99"));
        assert_eq!(x.interpretation[0].code.as_deref(), Some("H"));
        assert_eq!(x.result_status, "F");
        assert_eq!(
            x.observation_datetime.unwrap().to_fhir_datetime().unwrap(),
            "2026-03-02T07:15:00+01:00"
        );
        let second = &o.observations[1];
        assert_eq!(second.notes.len(), 1);
        assert_eq!(second.notes[0].text, "Fasting sample & analysed within 2h");
        assert_eq!(second.notes[0].source.as_deref(), Some("L"));
        assert_eq!(second.location.line, 5);
        assert_eq!(second.location.segment_sequence, Some(2));

        let m = pieces[1].parse(SAMPLE).unwrap();
        let oru = OruR01::read(&m).unwrap();
        assert_eq!(oru.observations().count(), 3);
        let (_, _, last) = oru.observations().last().unwrap();
        let x = last.obx.as_ref().unwrap();
        assert_eq!(x.values[0].text, "6.1");
        assert_eq!(x.units.as_ref().unwrap().code.as_deref(), Some("mmol/L"));
        assert_eq!(
            x.observation_datetime.unwrap().to_fhir_datetime().unwrap(),
            "2026-03-02T09:40:00-05:00"
        );
        assert_eq!(last.location.line, 12);
    }

    #[test]
    fn per_obx_errors_keep_the_good_ones() {
        let oru = read(
            "PID|1||S-1\rOBR|1|||85354-9^BP^LN\r\
             OBX|1|NM|8480-6^Systolic^LN||142|mm[Hg]|||||F\r\
             OBX|2|NM|||91|mm[Hg]|||||F\r\
             OBX|3|NM|8462-4^Diastolic^LN||91|mm[Hg]|||||F|||2026-03-02\r\
             OBX|4|NM|8462-4^Diastolic^LN||91\r\
             OBX|5||8462-4^Diastolic^LN||91||||||F\r\
             OBX|x|NM|8462-4^Diastolic^LN||91||||||F\r",
        )
        .unwrap();
        let obs = &oru.patients[0].orders[0].observations;
        assert_eq!(obs.len(), 6);
        assert!(obs[0].obx.is_ok());
        let e = obs[1].obx.as_ref().unwrap_err();
        assert_eq!(
            e.kind(),
            &StructureErrorKind::MissingField { field: "OBX-3" }
        );
        assert_eq!(e.location().path().unwrap(), "OBX-3");
        assert_eq!(e.location().segment_sequence, Some(2));
        let err = e.ack_error(Severity::Error);
        assert_eq!(err.code, ErrorCode::RequiredFieldMissing);
        assert_eq!(err.location.unwrap().sequence, 2);
        let e = obs[2].obx.as_ref().unwrap_err();
        assert!(matches!(
            e.kind(),
            StructureErrorKind::InvalidValue {
                field: "OBX-14",
                ..
            }
        ));
        assert_eq!(e.location().component, Some(1));
        let e = obs[3].obx.as_ref().unwrap_err();
        assert_eq!(
            e.kind(),
            &StructureErrorKind::MissingField { field: "OBX-11" }
        );
        let e = obs[4].obx.as_ref().unwrap_err();
        assert_eq!(
            e.kind(),
            &StructureErrorKind::MissingField { field: "OBX-2" }
        );
        let e = obs[5].obx.as_ref().unwrap_err();
        assert!(matches!(
            e.kind(),
            StructureErrorKind::InvalidValue { field: "OBX-1", .. }
        ));
    }

    #[test]
    fn rich_obx() {
        let oru = read(
            "PID|1||S-1~S-2^^^AUTH&1.2.3&ISO^MR\rOBR|1|P1^PLACER||X^Y^L^ALT^Alt^99ZZ\r\
             OBX|1|CWE|1234-5^Thing^LN^L-1^Local thing^99LOC||POS^Positive^HL70078~NEG^Negative^HL70078|||H~A|||F\r\
             OBX|2|SN|5-5^S^LN||>^100||||||C\r\
             OBX|3|ST|6-6^T^LN||a\\S\\b^c||||||F\rNTE|1||first~second\r",
        )
        .unwrap();
        let p = &oru.patients[0];
        assert_eq!(p.pid.ids.len(), 2);
        assert_eq!(p.pid.ids[1].assigning_authority.as_deref(), Some("AUTH"));
        let o = &p.orders[0];
        let obr = o.obr.as_ref().unwrap();
        assert_eq!(obr.universal_service_id.len(), 2);
        assert_eq!(
            obr.placer_order_number
                .as_ref()
                .unwrap()
                .namespace_id
                .as_deref(),
            Some("PLACER")
        );
        let x = o.observations[0].obx.as_ref().unwrap();
        assert_eq!(x.identifier.len(), 2);
        assert_eq!(x.identifier[1].code.as_deref(), Some("L-1"));
        assert_eq!(x.identifier[1].system.as_deref(), Some("99LOC"));
        assert_eq!(x.values.len(), 2);
        assert_eq!(x.values[1].component(1), Some("NEG"));
        assert_eq!(x.values[1].component(3), Some("HL70078"));
        assert_eq!(x.interpretation.len(), 2);
        let sn = o.observations[1].obx.as_ref().unwrap();
        assert_eq!(sn.values[0].component(1), Some(">"));
        assert_eq!(sn.values[0].component(2), Some("100"));
        assert_eq!(sn.result_status, "C");
        let st = o.observations[2].obx.as_ref().unwrap();
        assert_eq!(st.values[0].text, "a^b^c");
        assert_eq!(st.values[0].components, vec!["a^b", "c"]);
        assert_eq!(o.observations[2].notes[0].text, "first\nsecond");
    }

    #[test]
    fn message_level_errors() {
        let e = read("OBR|1|||X^Y^LN\r").unwrap_err();
        assert_eq!(e.kind(), &StructureErrorKind::MissingPid);
        assert_eq!(e.location().segment_index, Some(2));
        let e = read("NTE|1||x\r").unwrap_err();
        assert_eq!(e.kind(), &StructureErrorKind::MissingPid);
        let e = read("OBX|1|NM|X^Y^LN||1||||||F\r").unwrap_err();
        assert_eq!(e.kind(), &StructureErrorKind::MissingPid);
        let e = read("PID|1||\r").unwrap_err();
        assert_eq!(
            e.kind(),
            &StructureErrorKind::MissingField { field: "PID-3" }
        );
        assert_eq!(e.location().field, Some(3));
        let e = read("PID|1\r").unwrap_err();
        assert_eq!(
            e.kind(),
            &StructureErrorKind::MissingField { field: "PID-3" }
        );

        let text = b"MSH|^~\\&|A|B|C|D|20260302||ADT^A01|1|P|2.5\rPID|1||X";
        let m = Message::parse(text).unwrap();
        let e = OruR01::read(&m).unwrap_err();
        assert_eq!(
            e.kind(),
            &StructureErrorKind::NotOruR01 {
                found: "ADT^A01".into()
            }
        );
        assert_eq!(
            e.ack_error(Severity::Error).code,
            ErrorCode::UnsupportedMessageType
        );
        let m = Message::parse(b"MSH|^~\\&|A|B|C|D|20260302||ORU^R30|1|P|2.5\rPID|1||X").unwrap();
        let e = OruR01::read(&m).unwrap_err();
        assert_eq!(
            e.ack_error(Severity::Error).code,
            ErrorCode::UnsupportedEventCode
        );
    }

    #[test]
    fn issues_do_not_fail_the_message() {
        let oru = read(
            "NTE|1||too early\rPID|1||S-1||||2026-13-01\rPV1|1\rOBX|1|NM|X^Y^LN||1||||||F\rNTE|1||orphan note\r\
             OBR|1|||X^Y^LN\rZXY|custom\rOBX|1|NM|X^Y^LN||1||||||F\rSPM|1\rOBX|1|ST|SPEC^Specimen^LN||ok||||||F\r\
             AL1|1\rOBR|2\rOBX|1|NM|X^Y^LN||2||||||F\r",
        )
        .unwrap();
        let kinds: Vec<_> = oru
            .issues
            .iter()
            .map(|e| (e.kind().clone(), e.location().segment_index))
            .collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        assert_eq!(
            kinds[0].0,
            StructureErrorKind::UnexpectedSegment {
                id: SegmentId::from_prefix(b"NTE").unwrap()
            }
        );
        assert!(matches!(
            kinds[1].0,
            StructureErrorKind::InvalidValue { field: "PID-7", .. }
        ));
        assert_eq!(kinds[2], (StructureErrorKind::ObxBeforeObr, Some(5)));
        assert_eq!(
            kinds[3].0,
            StructureErrorKind::UnexpectedSegment {
                id: SegmentId::from_prefix(b"AL1").unwrap()
            }
        );
        let p = &oru.patients[0];
        assert!(p.pid.birth_date.is_none());
        assert_eq!(p.orders.len(), 2);
        // The SPM group's OBX is not a result, but it is kept.
        assert_eq!(p.orders[0].observations.len(), 1);
        assert_eq!(p.orders[0].specimen_observations.len(), 1);
        let spec = p.orders[0].specimen_observations[0].obx.as_ref().unwrap();
        assert_eq!(spec.values[0].text, "ok");
        let bad = p.orders[1].obr.as_ref().unwrap_err();
        assert_eq!(
            bad.kind(),
            &StructureErrorKind::MissingField { field: "OBR-4" }
        );
        assert_eq!(p.orders[1].observations.len(), 1);
    }

    #[test]
    fn decode_errors_are_per_obx() {
        let mut text =
            format!("{HEAD}\rPID|1||S-1\rOBR|1|||X^Y^LN\rOBX|1|ST|X^Y^LN||").into_bytes();
        text.extend_from_slice(b"\xFF||||||F\rOBX|2|ST|X^Y^LN||fine||||||F\r");
        let m = Message::parse(&text).unwrap();
        let oru = OruR01::read(&m).unwrap();
        let obs = &oru.patients[0].orders[0].observations;
        let e = obs[0].obx.as_ref().unwrap_err();
        assert_eq!(
            e.kind(),
            &StructureErrorKind::Decode(ErrorKind::InvalidUtf8)
        );
        assert_eq!(e.location().path().unwrap(), "OBX-5");
        assert!(obs[1].obx.is_ok());
    }
}
