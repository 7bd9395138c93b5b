//! clinflow-dimse: a DICOM upper-layer service class provider for C-ECHO and C-STORE.
//!
//! [`serve`] accepts TCP connections, negotiates associations (Verification plus every
//! storage SOP class, the common transfer syntaxes), reassembles P-DATA fragments and
//! hands each received instance to a [`StoreSink`], whose [`StoreStatus`] becomes the
//! C-STORE-RSP. Framing and negotiation are done here on top of `dicom-ul`'s PDU codec,
//! so every read is bounded in size and time.
//!
//! Layout: `command` (DIMSE command-set codec, pure), `negotiate` (A-ASSOCIATE
//! decisions, pure), `server` (sockets, tasks, shutdown).
//!
//! Invariant: no dataset content, patient data or SOP instance UID is ever logged;
//! log lines carry association ids, AE titles, peers, counts and statuses only.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub mod command;
pub mod negotiate;
mod server;

pub use server::serve;

/// DIMSE status codes (PS3.7 Annex C, PS3.4 Table B.2-1) a sink may return.
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Warning: coercion of data elements.
    pub const COERCION_OF_DATA_ELEMENTS: u16 = 0xB000;
    /// Warning: elements discarded.
    pub const ELEMENTS_DISCARDED: u16 = 0xB006;
    /// Warning: data set does not match SOP class.
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING: u16 = 0xB007;
    /// Failure: refused, out of resources (also sent when a data set exceeds
    /// [`ScpConfig::max_instance_bytes`](crate::ScpConfig::max_instance_bytes)).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Failure: data set does not match SOP class.
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    /// Failure: cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// Failure: duplicate SOP instance.
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    /// Failure: SOP class not supported (e.g. the command's SOP class differs from the
    /// presentation context's abstract syntax).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Failure: unrecognized operation (a DIMSE request other than C-ECHO / C-STORE).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;

    /// Whether `status` counts as stored: success or a warning.
    pub fn is_success_or_warning(status: u16) -> bool {
        status == SUCCESS || (0xB000..=0xBFFF).contains(&status) || status == 0x0107
    }
}

/// Configuration of the service class provider.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// Our AE title (at most 16 characters); compared with the called AE title.
    pub ae_title: String,
    /// Maximum PDU variable-field length we advertise and accept from the peer.
    pub max_pdu_length: u32,
    /// Concurrent associations; beyond it an association is rejected (transient,
    /// local limit exceeded).
    pub max_associations: usize,
    /// Bound on every socket read and write; an association idle longer is aborted.
    pub idle_timeout: Duration,
    /// Largest data set accepted; a larger one is drained and answered with
    /// [`status::OUT_OF_RESOURCES`], and the association stays usable.
    pub max_instance_bytes: usize,
    /// Reject associations whose called AE title is not [`ScpConfig::ae_title`].
    pub strict_called_ae: bool,
    /// After shutdown is signalled, how long running associations may continue before
    /// they are dropped.
    pub shutdown_grace: Duration,
}

impl Default for ScpConfig {
    fn default() -> Self {
        Self {
            ae_title: "CLINFLOW".to_owned(),
            max_pdu_length: 65_536,
            max_associations: 16,
            idle_timeout: Duration::from_secs(30),
            max_instance_bytes: 256 * 1024 * 1024,
            strict_called_ae: true,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// One received C-STORE instance.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    /// Calling AE title, trimmed.
    pub calling_ae: String,
    /// Called AE title, trimmed.
    pub called_ae: String,
    /// The peer's socket address.
    pub peer: SocketAddr,
    /// Id of the association, unique within one [`serve`] call.
    pub association: u64,
    /// AffectedSOPClassUID.
    pub sop_class_uid: String,
    /// AffectedSOPInstanceUID.
    pub sop_instance_uid: String,
    /// The presentation context's transfer syntax UID.
    pub transfer_syntax: String,
    /// The data set exactly as received, in `transfer_syntax`, without file meta.
    pub dataset: Vec<u8>,
}

/// The sink's answer to a [`StoreRequest`], sent back in the C-STORE-RSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// A [`status`] code.
    pub status: u16,
    /// ErrorComment (0000,0902); at most 64 characters are sent. Must hold no patient
    /// data.
    pub comment: Option<String>,
}

impl StoreStatus {
    /// Success without comment.
    pub fn success() -> Self {
        Self {
            status: status::SUCCESS,
            comment: None,
        }
    }

    /// A status with a comment.
    pub fn with_comment(status: u16, comment: impl Into<String>) -> Self {
        Self {
            status,
            comment: Some(comment.into()),
        }
    }
}

/// How an association ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssociationEnd {
    /// A-RELEASE-RQ answered with A-RELEASE-RP.
    Released,
    /// The peer sent A-ABORT.
    AbortedByPeer,
    /// The peer closed the connection without release.
    PeerClosed,
    /// No PDU within [`ScpConfig::idle_timeout`]; we sent A-ABORT.
    TimedOut,
    /// A malformed or unexpected PDU or DIMSE message; we sent A-ABORT.
    ProtocolError,
    /// A socket error.
    Io,
}

/// What happened on one association, reported to [`StoreSink::association_closed`].
#[derive(Debug, Clone)]
pub struct AssociationSummary {
    /// Id of the association.
    pub association: u64,
    /// Calling AE title, trimmed.
    pub calling_ae: String,
    /// The peer's socket address.
    pub peer: SocketAddr,
    /// C-STORE requests answered with success or a warning.
    pub stored: u64,
    /// C-STORE requests answered with a failure.
    pub failed: u64,
    /// How it ended.
    pub end: AssociationEnd,
}

/// Receives stored instances. One sink is shared by all associations.
pub trait StoreSink: Send + Sync + 'static {
    /// Handle one instance. The returned status is sent to the peer; the sink should
    /// bound its own work, since the peer waits for the response.
    fn store(&self, req: StoreRequest) -> impl Future<Output = StoreStatus> + Send;

    /// Called once per established association after it ends (released, aborted,
    /// closed or timed out); not called for rejected associations, nor for associations
    /// dropped at the end of the shutdown grace period.
    fn association_closed(&self, summary: AssociationSummary) -> impl Future<Output = ()> + Send {
        let _ = summary;
        async {}
    }
}
