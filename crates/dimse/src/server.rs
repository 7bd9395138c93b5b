//! The accept loop and one task per association: PDU framing with bounded reads,
//! P-DATA reassembly and DIMSE dispatch to the sink.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use dicom_ul::pdu::{
    read_pdu, write_pdu, AbortRQServiceProviderReason, AbortRQSource, AssociationRJ,
    AssociationRJResult, AssociationRJServiceProviderPresentationReason, AssociationRJSource,
    PDataValue, PDataValueType, Pdu, MAXIMUM_PDU_SIZE, MINIMUM_PDU_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument as _};

use crate::command::{field, Command, Response};
use crate::negotiate::negotiate;
use crate::{
    status, AssociationEnd, AssociationSummary, ScpConfig, StoreRequest, StoreSink, StoreStatus,
};

/// Largest A-ASSOCIATE-RQ accepted: room for all 128 presentation contexts with many
/// transfer syntaxes each, independent of the negotiated PDU size.
const ASSOCIATE_RQ_LIMIT: u32 = 256 * 1024;
/// Largest command set reassembled (real ones are a few hundred bytes).
const COMMAND_LIMIT: usize = 64 * 1024;
/// Time a connection beyond `max_associations` gets to send its A-ASSOCIATE-RQ before
/// it is closed instead of rejected.
const REJECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// PDV size used for our responses when the peer sets no maximum PDU length.
const DEFAULT_SEND_PDU: u32 = 16_384;

/// Serve C-ECHO and C-STORE on `listener` until `shutdown` completes; then stop
/// accepting, give running associations [`ScpConfig::shutdown_grace`] to finish and
/// drop the rest.
///
/// Errors only for an invalid configuration; connection-level failures are logged.
pub async fn serve<S: StoreSink>(
    listener: TcpListener,
    cfg: ScpConfig,
    sink: Arc<S>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ae = cfg.ae_title.trim();
    ensure!(
        !ae.is_empty() && ae.len() <= 16 && ae.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
        "ae_title must be 1 to 16 printable ASCII characters"
    );
    ensure!(
        (MINIMUM_PDU_SIZE..=MAXIMUM_PDU_SIZE).contains(&cfg.max_pdu_length),
        "max_pdu_length must be within {MINIMUM_PDU_SIZE}..={MAXIMUM_PDU_SIZE}"
    );
    ensure!(
        cfg.max_associations > 0,
        "max_associations must be positive"
    );
    ensure!(!cfg.idle_timeout.is_zero(), "idle_timeout must be positive");
    let local = listener
        .local_addr()
        .context("listener has no local address")?;
    info!(%local, ae_title = ae, "DICOM SCP listening.");

    let cfg = Arc::new(cfg);
    // Why two semaphores: `permits` bounds associations; `rejectors` bounds the short
    // tasks that read an over-limit A-ASSOCIATE-RQ to answer it with A-ASSOCIATE-RJ,
    // so a connection flood cannot grow tasks without bound either.
    let permits = Arc::new(Semaphore::new(cfg.max_associations));
    let rejectors = Arc::new(Semaphore::new(cfg.max_associations));
    let mut tasks = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(error) = joined {
                    warn!(%error, "Association task failed.");
                }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        warn!(%error, "Accept failed.");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(%error, %peer, "Could not set TCP_NODELAY.");
                }
                next_id += 1;
                let id = next_id;
                let span = tracing::info_span!("association", id, %peer);
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let conn = Conn::new(stream, peer, cfg.clone());
                        tasks.spawn(
                            run_association(conn, id, sink.clone(), permit).instrument(span),
                        );
                    }
                    Err(_) => match rejectors.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let conn = Conn::new(stream, peer, cfg.clone());
                            tasks.spawn(reject_busy(conn, permit).instrument(span));
                        }
                        Err(_) => {
                            warn!(%peer, "Too many connections; closing without reply.");
                        }
                    },
                }
            }
        }
    }

    drop(listener);
    info!(
        running = tasks.len(),
        "Shutting down; waiting for associations."
    );
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(cfg.shutdown_grace, drain)
        .await
        .is_err()
    {
        warn!(
            dropped = tasks.len(),
            "Shutdown grace elapsed; dropping associations."
        );
        tasks.shutdown().await;
    }
    info!("DICOM SCP stopped.");
    Ok(())
}

/// Why reading a PDU failed.
#[derive(Debug)]
enum ReadFail {
    /// EOF before the first byte of a PDU.
    Closed,
    /// No complete PDU within the idle timeout.
    TimedOut,
    /// A socket error or EOF inside a PDU.
    Io,
    /// A PDU longer than allowed, or one the PDU codec rejects.
    Malformed,
}

/// A TCP connection with bounded PDU reads and writes.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    cfg: Arc<ScpConfig>,
}

impl Conn {
    fn new(stream: TcpStream, peer: SocketAddr, cfg: Arc<ScpConfig>) -> Self {
        Self { stream, peer, cfg }
    }

    /// Read one PDU whose variable field is at most `limit` bytes, within
    /// `timeout`.
    async fn read(&mut self, limit: u32, timeout: Duration) -> Result<Pdu, ReadFail> {
        let mut header = [0u8; 6];
        match tokio::time::timeout(timeout, self.stream.read_exact(&mut header)).await {
            Err(_) => return Err(ReadFail::TimedOut),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ReadFail::Closed)
            }
            Ok(Err(_)) => return Err(ReadFail::Io),
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        if len > limit {
            return Err(ReadFail::Malformed);
        }
        let mut buf = Vec::with_capacity(6 + len as usize);
        buf.extend_from_slice(&header);
        buf.resize(6 + len as usize, 0);
        match tokio::time::timeout(timeout, self.stream.read_exact(&mut buf[6..])).await {
            Err(_) => return Err(ReadFail::TimedOut),
            Ok(Err(_)) => return Err(ReadFail::Io),
            Ok(Ok(_)) => {}
        }
        match read_pdu(&buf[..], MAXIMUM_PDU_SIZE, false) {
            Ok(Some(pdu)) => Ok(pdu),
            Ok(None) | Err(_) => Err(ReadFail::Malformed),
        }
    }

    /// Write one PDU within the idle timeout.
    async fn send(&mut self, pdu: &Pdu) -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        write_pdu(&mut bytes, pdu).context("encoding PDU")?;
        tokio::time::timeout(self.cfg.idle_timeout, self.stream.write_all(&bytes))
            .await
            .context("write timed out")?
            .context("write failed")?;
        Ok(())
    }

    /// Send A-ABORT (best effort) and close.
    async fn abort(mut self, reason: AbortRQServiceProviderReason) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        };
        let _ = self.send(&pdu).await;
        let _ = tokio::time::timeout(self.cfg.idle_timeout, self.stream.shutdown()).await;
    }

    /// Close after a final PDU was sent.
    async fn close(mut self) {
        let _ = tokio::time::timeout(self.cfg.idle_timeout, self.stream.shutdown()).await;
    }
}

/// Answer a connection beyond `max_associations` with a transient A-ASSOCIATE-RJ.
async fn reject_busy(mut conn: Conn, _permit: OwnedSemaphorePermit) {
    let timeout = REJECT_TIMEOUT.min(conn.cfg.idle_timeout);
    match conn.read(ASSOCIATE_RQ_LIMIT, timeout).await {
        Ok(Pdu::AssociationRQ(rq)) => {
            info!(
                calling_ae = rq.calling_ae_title.trim(),
                "Association rejected: too many associations."
            );
            let rj = Pdu::AssociationRJ(AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            });
            if conn.send(&rj).await.is_ok() {
                conn.close().await;
            }
        }
        Ok(_) | Err(ReadFail::Malformed) => {
            conn.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                .await
        }
        Err(_) => {}
    }
}

/// A DIMSE message being reassembled from PDVs.
#[derive(Default)]
struct Pending {
    /// Presentation context of the message (all its PDVs must share it).
    context: u8,
    /// Command-set bytes so far.
    command_bytes: Vec<u8>,
    /// The decoded command, once its last fragment arrived and a data set follows.
    command: Option<Command>,
    /// Data-set bytes so far.
    data: Vec<u8>,
    /// The data set outgrew `max_instance_bytes`; the rest is drained and discarded.
    overflow: bool,
}

/// Per-association state after A-ASSOCIATE-AC.
struct Association<S> {
    id: u64,
    calling_ae: String,
    called_ae: String,
    /// Accepted presentation contexts: id -> (abstract syntax, transfer syntax).
    contexts: HashMap<u8, (String, String)>,
    /// Largest PDV payload we may send to the peer.
    send_chunk: usize,
    /// Copy of `ScpConfig::max_instance_bytes`.
    max_instance: usize,
    sink: Arc<S>,
    stored: u64,
    failed: u64,
    pending: Option<Pending>,
}

async fn run_association<S: StoreSink>(
    mut conn: Conn,
    id: u64,
    sink: Arc<S>,
    permit: OwnedSemaphorePermit,
) {
    let idle = conn.cfg.idle_timeout;
    let rq = match conn.read(ASSOCIATE_RQ_LIMIT, idle).await {
        Ok(Pdu::AssociationRQ(rq)) => rq,
        Ok(_) | Err(ReadFail::Malformed) => {
            info!("Connection did not start with A-ASSOCIATE-RQ; aborting.");
            conn.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                .await;
            return;
        }
        Err(fail) => {
            debug!(?fail, "Connection ended before A-ASSOCIATE-RQ.");
            return;
        }
    };
    let calling_ae = rq.calling_ae_title.trim().to_owned();
    let called_ae = rq.called_ae_title.trim().to_owned();
    let negotiated = negotiate(
        &rq,
        &conn.cfg.ae_title,
        conn.cfg.strict_called_ae,
        conn.cfg.max_pdu_length,
    );
    let accepted = match negotiated {
        Ok(accepted) => accepted,
        Err(rj) => {
            info!(calling_ae, called_ae, reason = %rj.source, "Association rejected.");
            if conn.send(&Pdu::AssociationRJ(rj)).await.is_ok() {
                conn.close().await;
            }
            return;
        }
    };
    let contexts: HashMap<u8, (String, String)> = accepted
        .ac
        .presentation_contexts
        .iter()
        .filter(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
        .filter_map(|pc| {
            let proposed = rq.presentation_contexts.iter().find(|p| p.id == pc.id)?;
            Some((
                pc.id,
                (
                    proposed
                        .abstract_syntax
                        .trim_end_matches(['\0', ' '])
                        .to_owned(),
                    pc.transfer_syntax.clone(),
                ),
            ))
        })
        .collect();
    if conn.send(&Pdu::AssociationAC(accepted.ac)).await.is_err() {
        return;
    }
    info!(
        calling_ae,
        called_ae,
        accepted_contexts = contexts.len(),
        proposed_contexts = rq.presentation_contexts.len(),
        "Association accepted."
    );
    // PDV payload = PDU variable field minus the 4-byte item length, context id and
    // header byte.
    let peer_max = accepted.peer_max_pdu.unwrap_or(DEFAULT_SEND_PDU).max(64);
    let mut assoc = Association {
        id,
        calling_ae,
        called_ae,
        contexts,
        send_chunk: (peer_max - 6) as usize,
        max_instance: conn.cfg.max_instance_bytes,
        sink,
        stored: 0,
        failed: 0,
        pending: None,
    };
    let peer = conn.peer;

    let end = loop {
        let pdu = match conn.read(conn.cfg.max_pdu_length, idle).await {
            Ok(pdu) => pdu,
            Err(ReadFail::Closed) => break AssociationEnd::PeerClosed,
            Err(ReadFail::Io) => break AssociationEnd::Io,
            Err(ReadFail::TimedOut) => {
                conn.abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                    .await;
                break AssociationEnd::TimedOut;
            }
            Err(ReadFail::Malformed) => {
                conn.abort(AbortRQServiceProviderReason::InvalidPduParameter)
                    .await;
                break AssociationEnd::ProtocolError;
            }
        };
        match pdu {
            Pdu::PData { data } => {
                let mut failed = false;
                for pdv in data {
                    match assoc.on_pdv(pdv, peer).await {
                        Ok(Some((bytes, context))) => {
                            if assoc
                                .send_command(&mut conn, &bytes, context)
                                .await
                                .is_err()
                            {
                                failed = true;
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(why) => {
                            warn!(why, "Protocol error in P-DATA; aborting.");
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    conn.abort(AbortRQServiceProviderReason::UnexpectedPduParameter)
                        .await;
                    break AssociationEnd::ProtocolError;
                }
            }
            Pdu::ReleaseRQ => {
                if conn.send(&Pdu::ReleaseRP).await.is_ok() {
                    conn.close().await;
                    break AssociationEnd::Released;
                }
                break AssociationEnd::Io;
            }
            Pdu::AbortRQ { .. } => break AssociationEnd::AbortedByPeer,
            _ => {
                conn.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                    .await;
                break AssociationEnd::ProtocolError;
            }
        }
    };
    info!(
        calling_ae = assoc.calling_ae,
        stored = assoc.stored,
        failed = assoc.failed,
        ?end,
        "Association ended."
    );
    let summary = AssociationSummary {
        association: assoc.id,
        calling_ae: assoc.calling_ae,
        peer,
        stored: assoc.stored,
        failed: assoc.failed,
        end,
    };
    // The association is over: free its slot before the sink's callback runs.
    drop(permit);
    assoc.sink.association_closed(summary).await;
}

/// An encoded response command set and the presentation context to send it on.
type Outgoing = (Vec<u8>, u8);

impl<S: StoreSink> Association<S> {
    /// Feed one PDV; returns a response to send when a message completed.
    async fn on_pdv(
        &mut self,
        pdv: PDataValue,
        peer: SocketAddr,
    ) -> Result<Option<Outgoing>, &'static str> {
        if !self.contexts.contains_key(&pdv.presentation_context_id) {
            return Err("PDV on a presentation context that was not accepted");
        }
        let max_instance = self.max_instance;
        let pending = self.pending.get_or_insert_with(|| Pending {
            context: pdv.presentation_context_id,
            ..Pending::default()
        });
        if pending.context != pdv.presentation_context_id {
            return Err("PDVs of one message on different presentation contexts");
        }
        match pdv.value_type {
            PDataValueType::Command => {
                if pending.command.is_some() {
                    return Err("command fragment while a data set was expected");
                }
                if pending.command_bytes.len() + pdv.data.len() > COMMAND_LIMIT {
                    return Err("command set too large");
                }
                pending.command_bytes.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(None);
                }
                let command = Command::decode(&pending.command_bytes)
                    .map_err(|_| "undecodable command set")?;
                if command.has_data_set() {
                    pending.command = Some(command);
                    pending.command_bytes = Vec::new();
                    return Ok(None);
                }
                let pending = self.pending.take().unwrap_or_default();
                Ok(Some(self.dispatch(command, pending, peer).await))
            }
            PDataValueType::Data => {
                if pending.command.is_none() {
                    return Err("data fragment before its command");
                }
                if pending.overflow || pending.data.len() + pdv.data.len() > max_instance {
                    // Drain: keep reading so the association stays usable, keep no bytes.
                    pending.overflow = true;
                    pending.data = Vec::new();
                } else {
                    pending.data.extend_from_slice(&pdv.data);
                }
                if !pdv.is_last {
                    return Ok(None);
                }
                let mut pending = self.pending.take().unwrap_or_default();
                let command = pending.command.take().unwrap_or_default();
                Ok(Some(self.dispatch(command, pending, peer).await))
            }
        }
    }

    /// Act on a complete message and build its response.
    async fn dispatch(&mut self, cmd: Command, pending: Pending, peer: SocketAddr) -> Outgoing {
        let context = pending.context;
        let (abstract_syntax, transfer_syntax) =
            self.contexts.get(&context).cloned().unwrap_or_default();
        match cmd.command_field {
            field::C_ECHO_RQ => {
                debug!("C-ECHO answered.");
                let rsp = Response {
                    command_field: field::C_ECHO_RSP,
                    message_id_responded: cmd.message_id,
                    affected_sop_class_uid: Some(
                        cmd.affected_sop_class_uid
                            .as_deref()
                            .unwrap_or(&abstract_syntax),
                    ),
                    affected_sop_instance_uid: None,
                    status: status::SUCCESS,
                    error_comment: None,
                };
                (rsp.encode(), context)
            }
            field::C_STORE_RQ => {
                let sop_class = cmd
                    .affected_sop_class_uid
                    .clone()
                    .unwrap_or_else(|| abstract_syntax.clone());
                let result = self
                    .store(
                        &cmd,
                        &sop_class,
                        &abstract_syntax,
                        transfer_syntax,
                        pending,
                        peer,
                    )
                    .await;
                if status::is_success_or_warning(result.status) {
                    self.stored += 1;
                } else {
                    self.failed += 1;
                }
                info!(
                    sop_class = %sop_class,
                    status = format_args!("{:04X}", result.status),
                    "C-STORE answered."
                );
                let rsp = Response {
                    command_field: field::C_STORE_RSP,
                    message_id_responded: cmd.message_id,
                    affected_sop_class_uid: Some(&sop_class),
                    affected_sop_instance_uid: cmd.affected_sop_instance_uid.as_deref(),
                    status: result.status,
                    error_comment: result.comment.as_deref(),
                };
                (rsp.encode(), context)
            }
            other => {
                info!(
                    command_field = format_args!("{other:04X}"),
                    "Unsupported DIMSE operation refused."
                );
                let rsp = Response {
                    command_field: other | 0x8000,
                    message_id_responded: cmd.message_id,
                    affected_sop_class_uid: cmd.affected_sop_class_uid.as_deref(),
                    affected_sop_instance_uid: None,
                    status: status::UNRECOGNIZED_OPERATION,
                    error_comment: Some("only C-ECHO and C-STORE are supported"),
                };
                (rsp.encode(), context)
            }
        }
    }

    /// Validate a C-STORE and hand it to the sink.
    async fn store(
        &self,
        cmd: &Command,
        sop_class: &str,
        abstract_syntax: &str,
        transfer_syntax: String,
        pending: Pending,
        peer: SocketAddr,
    ) -> StoreStatus {
        if pending.overflow {
            return StoreStatus::with_comment(
                status::OUT_OF_RESOURCES,
                format!("data set exceeds {} bytes", self.max_instance),
            );
        }
        if !cmd.has_data_set() {
            return StoreStatus::with_comment(
                status::CANNOT_UNDERSTAND,
                "C-STORE without data set",
            );
        }
        if sop_class != abstract_syntax {
            return StoreStatus::with_comment(
                status::SOP_CLASS_NOT_SUPPORTED,
                "SOP class differs from the presentation context",
            );
        }
        let sop_instance_uid = match cmd.affected_sop_instance_uid.as_deref() {
            Some(uid) if !uid.is_empty() => uid.to_owned(),
            _ => {
                return StoreStatus::with_comment(
                    status::CANNOT_UNDERSTAND,
                    "missing AffectedSOPInstanceUID",
                )
            }
        };
        let req = StoreRequest {
            calling_ae: self.calling_ae.clone(),
            called_ae: self.called_ae.clone(),
            peer,
            association: self.id,
            sop_class_uid: sop_class.to_owned(),
            sop_instance_uid,
            transfer_syntax,
            dataset: pending.data,
        };
        self.sink.store(req).await
    }

    /// Send an encoded command set as P-DATA, fragmented to the peer's PDU size.
    async fn send_command(&self, conn: &mut Conn, bytes: &[u8], context: u8) -> anyhow::Result<()> {
        let chunks: Vec<&[u8]> = bytes.chunks(self.send_chunk.max(1)).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context,
                    value_type: PDataValueType::Command,
                    is_last: i == last,
                    data: chunk.to_vec(),
                }],
            };
            conn.send(&pdu).await?;
        }
        Ok(())
    }
}
