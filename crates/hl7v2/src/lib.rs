//! HL7 v2 without I/O.
//!
//! This crate owns everything clinflow knows about HL7 v2 (ER7, the pipe
//! format) that does not touch a socket or a database. The ingest pipeline
//! reads bytes (HTTP body or MLLP stream) and hands them to it:
//!
//! ```text
//! bytes ──> mllp::MllpDecoder (frames) ──┐
//! bytes ──> split::split_messages ───────┴─> Message::parse ──> oru::OruR01::read
//!                                               │                    │
//!                                               └─> ack::build_ack <─┘ (errors)
//! ```
//!
//! - [`split`]: cuts an input into messages, batch-envelope lines and
//!   garbage (bytes that are not a message: one rejected item each).
//! - [`message`]: the zero-copy parser: [`Message`] with segments, fields,
//!   repetitions, components and subcomponents as slices of the input.
//! - [`delimiters`]: the delimiters of MSH-1/MSH-2, validated.
//! - [`escape`]: decoding of escape sequences (`\F\`, `\X..\`, `\.br\`, ...)
//!   and the reverse, [`escape()`](escape::escape).
//! - [`charset`]: MSH-18 character sets (ASCII, UTF-8, ISO 8859-1).
//! - [`header`]: the decoded MSH ([`Msh`]): sender, receiver, type, control
//!   id, processing id, version, character set, date/time.
//! - [`dtm`]: HL7 `DTM` date/times with their precision and offset, and
//!   their FHIR `dateTime` form.
//! - [`mllp`]: the MLLP framing codec as a pure state machine.
//! - [`ack`]: HL7 ACK messages (MSA, ERR).
//! - [`oru`]: the ORU^R01 structure (patients, orders, observations, notes)
//!   as a typed view, with per-OBX results.
//! - [`error`]: [`ParseError`] and [`Location`].
//!
//! ```
//! use clinflow_hl7v2::{build_ack, parse_dtm, split_messages, AckCode, OruR01, PieceKind};
//!
//! let input = b"MSH|^~\\&|LIS|LAB|CLINFLOW|SITE|20260302091500+0100||ORU^R01^ORU_R01|C-1|P|2.5.1\r\
//!               PID|1||S-1^^^SITE^RI\rOBR|1|||24323-8^Panel^LN|||20260302071500+0100\r\
//!               OBX|1|NM|2345-7^Glucose^LN||112|mg/dL^^UCUM|70-99|H|||F\r\
//!               NTE|1||fasting \\T\\ analysed\r";
//! for piece in split_messages(input) {
//!     assert_eq!(piece.kind, PieceKind::Message);
//!     let msg = piece.parse(input)?;
//!     assert_eq!(msg.msh().control_id(), "C-1");
//!     let oru = OruR01::read(&msg)?;
//!     let (patient, order, obs) = oru.observations().next().unwrap();
//!     assert_eq!(patient.pid.ids[0].id, "S-1");
//!     let obx = obs.obx.as_ref().map_err(|e| e.to_string())?;
//!     assert_eq!(obx.values[0].text, "112");
//!     assert_eq!(obs.notes[0].text, "fasting & analysed");
//!     let when = order.obr.as_ref().map_err(|e| e.to_string())?.observation_datetime;
//!     assert_eq!(when.unwrap().to_fhir_datetime()?, "2026-03-02T07:15:00+01:00");
//!     let ack = build_ack(&msg, AckCode::Accept, &[], &parse_dtm("20260302091501+0100")?, "A-1");
//!     assert!(ack.ends_with(b"MSA|AA|C-1\r"));
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Invariants:
//! - **Totality.** No function here panics on any input: every byte sequence
//!   gives a value or an error that says where (segment, field, component,
//!   byte offset, line). Property tests and the `hl7v2_parse`/`mllp_decode`
//!   fuzz targets (in `fuzz/`) check it.
//! - **Zero copy.** A [`Message`] and its views borrow the input; decoded
//!   values are `Cow::Borrowed` unless an escape sequence or a character set
//!   conversion forces a copy.
//! - **No silent repair.** Bytes invalid for the declared character set are
//!   errors with their location, never replaced.

#![warn(missing_docs)]

pub mod ack;
pub mod charset;
pub mod delimiters;
pub mod dtm;
pub mod error;
pub mod escape;
pub mod header;
mod lines;
pub mod message;
pub mod mllp;
pub mod oru;
pub mod split;

pub use ack::{
    build_ack, build_reject_ack_without_message, salvage_control_id, AckCode, AckError, ErrorCode,
    ErrorLocation, Severity,
};
pub use charset::Charset;
pub use delimiters::Delimiters;
pub use dtm::{parse_dtm, Dtm, DtmError, Precision};
pub use error::{ErrorKind, Location, ParseError, SegmentId};
pub use escape::{escape, Decoded, EscapeWarning, EscapeWarningKind};
pub use header::{Hd, MessageType, Msh, Version};
pub use message::{Component, Field, Message, Origin, Repetition, Segment, Subcomponent};
pub use mllp::{mllp_encode, FrameError, MllpDecoder};
pub use oru::{OruR01, StructureError, StructureErrorKind};

pub use split::{split_messages, Piece, PieceKind};
