//! The MLLP listener: HL7 v2 messages over TCP (`--mllp-listen`), each
//! answered with an ACK.
//!
//! ```text
//! socket ──read──> MllpDecoder ──frame──> parse MSH ──> accept_batch (as POST /ingest/hl7v2)
//!   ^                                        │ unreadable: AR          │ queue full: wait, retry
//!   └── ACK (MSA-2 = MSH-10) <── batch done: AA (+ ERR warnings) / AE (+ ERR errors)
//! ```
//!
//! Each message is one batch of format `hl7v2`, accepted through the same
//! call as the HTTP endpoint ([`super::accept_batch`]): its raw bytes are
//! committed with an `ingest-accept` audit record before anything is
//! acknowledged, the same bytes are the same batch, and the pipeline's
//! item keys make the same message (sender + MSH-10) re-encoded a
//! duplicate. The ACK is sent once the batch is done, so an `AA` means
//! stored, and its ERR warnings list the values the edit checks rejected.
//!
//! One task per connection handles its messages strictly in order: it
//! reads no further while a message is being handled, so a full pipeline
//! becomes TCP backpressure on the sender, and memory per connection is
//! bounded by one read buffer and the decoder's maximum frame.
//!
//! MLLP has no authentication: a connection acts as the submitter
//! `mllp:<peer address>` with the `interface` role (recorded in the audit
//! trail as the actor of what it stores).
//!
//! Every wait is bounded: reads and writes by `mllp_idle_timeout`, a
//! message from frame to ACK by `mllp_ack_timeout` (then the connection is
//! closed without an ACK; the sender resends, which is idempotent).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use clinflow_hl7v2::{
    build_ack, build_reject_ack_without_message, mllp_encode, salvage_control_id, AckCode,
    AckError, Dtm, ErrorCode, ErrorLocation, FrameError, Message, MllpDecoder, SegmentId, Severity,
};
use clinflow_store::{BatchRecord, BatchStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::Format;
use crate::auth::{Caller, Principal, Role};
use crate::error::ApiError;
use crate::metrics::{AckLabels, Metrics, UnackedLabels};
use crate::state::AppState;

/// Bytes asked of the socket per read.
const READ_BUFFER: usize = 64 * 1024;
/// Waits between attempts while the pipeline's queue is full: short, and
/// growing to a bound.
const FULL_BACKOFF_FIRST: Duration = Duration::from_millis(20);
const FULL_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often a wait for a batch checks the store even without a wake-up
/// (a finish signalled between the check and the wait is not missed, but a
/// batch finished by another process would be).
const DONE_RECHECK: Duration = Duration::from_millis(500);

/// The MLLP listener, bound by [`crate::Application::build`].
pub struct MllpListener {
    listener: TcpListener,
}

impl MllpListener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<MllpListener> {
        Ok(MllpListener {
            listener: TcpListener::bind(addr).await?,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` is cancelled; then stops
    /// accepting and waits for each connection to finish the messages it
    /// has read (each bounded by `mllp_ack_timeout`).
    pub async fn run(self, state: AppState, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(state.config.mllp_max_connections.max(1)));
        let mut connections = JoinSet::new();
        loop {
            // A place first: beyond the limit, connections wait in the
            // kernel's backlog instead of in memory.
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            // Reap finished connections so the set does not grow.
            while let Some(done) = connections.try_join_next() {
                log_panic(done);
            }
            match accepted {
                Ok((stream, peer)) => {
                    let (state, shutdown) = (state.clone(), shutdown.clone());
                    connections.spawn(async move {
                        let _permit = permit;
                        let metrics = state.metrics.clone();
                        metrics.mllp_connections.inc();
                        metrics.mllp_connections_open.inc();
                        // Decremented however the task ends.
                        let _open = OpenConnection(&metrics);
                        tracing::info!(%peer, "MLLP connection opened");
                        match Connection::new(stream, peer, state, shutdown).run().await {
                            Ok(()) => tracing::info!(%peer, "MLLP connection closed"),
                            Err(e) => tracing::warn!(
                                %peer,
                                error = %format!("{e:#}"),
                                "MLLP connection closed on an error"
                            ),
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: a short pause
                    // instead of a busy loop.
                    tracing::warn!(error = %e, "MLLP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(self.listener);
        while let Some(done) = connections.try_join_next() {
            log_panic(done);
        }
        tracing::info!(
            connections = connections.len(),
            "MLLP listener closed; finishing the messages in flight"
        );
        while let Some(done) = connections.join_next().await {
            log_panic(done);
        }
    }
}

/// Decrements `mllp_connections_open` when dropped.
struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.mllp_connections_open.dec();
    }
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "an MLLP connection task panicked");
    }
}

/// What became of one frame.
enum Answer {
    /// Send this ACK (unframed, of this code) and go on.
    Ack(Vec<u8>, AckCode),
    /// Nothing to acknowledge (garbage between frames).
    Nothing,
    /// Close the connection without an ACK: the message could not be
    /// stored in time, or the server is stopping; the sender resends.
    Close(&'static str),
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    state: AppState,
    caller: Caller,
    /// The server's stop: no further read, no further wait for a place in
    /// the queue; a message already accepted is still answered.
    shutdown: CancellationToken,
}

impl Connection {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        state: AppState,
        shutdown: CancellationToken,
    ) -> Connection {
        let caller = Caller {
            principal: Principal {
                name: format!("mllp:{peer}"),
                role: Role::Interface,
                site: None,
                patient: None,
            },
            client: Some(peer.to_string()),
            reason: None,
        };
        Connection {
            stream,
            peer,
            state,
            caller,
            shutdown,
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let _ = self.stream.set_nodelay(true);
        let idle = self.state.config.mllp_idle_timeout;
        let mut decoder = MllpDecoder::new(self.state.config.mllp_max_frame);
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            let read = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                r = timeout(idle, self.stream.read(&mut buf)) => r,
            };
            let n = match read {
                Err(_) => {
                    tracing::info!(peer = %self.peer, "MLLP connection idle too long");
                    return Ok(());
                }
                Ok(r) => r?,
            };
            if n == 0 {
                if let Some(e) = decoder.finish() {
                    tracing::warn!(peer = %self.peer, error = %e, "MLLP stream ended badly");
                }
                return Ok(());
            }
            // Every frame of this read is handled, in order, before the
            // next read, even when a stop was asked meanwhile: the sender
            // has sent them and waits for their ACKs.
            for frame in decoder.feed(buf.get(..n).unwrap_or_default()) {
                let started = Instant::now();
                let metrics = &self.state.metrics;
                let answer = match frame {
                    Ok(payload) => self.message(payload).await,
                    Err(e) => {
                        metrics.mllp_frame_errors.inc();
                        frame_error(&e, &self.peer)
                    }
                };
                match answer {
                    Answer::Ack(ack, code) => {
                        // Counted before the write, so that a peer holding
                        // its ACK finds it counted.
                        metrics
                            .mllp_acks
                            .get_or_create(&AckLabels {
                                code: code.as_str().to_string(),
                            })
                            .inc();
                        metrics
                            .mllp_ack_seconds
                            .observe(started.elapsed().as_secs_f64());
                        let framed = mllp_encode(&ack);
                        timeout(idle, self.stream.write_all(&framed))
                            .await
                            .map_err(|_| anyhow::anyhow!("the peer did not take its ACK"))??;
                    }
                    Answer::Nothing => {}
                    Answer::Close(why) => {
                        metrics
                            .mllp_unacknowledged
                            .get_or_create(&UnackedLabels {
                                why: why.to_string(),
                            })
                            .inc();
                        tracing::warn!(peer = %self.peer, why, "MLLP connection closed without an ACK");
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One message: parse its header, accept it as a batch, wait for the
    /// batch, build the ACK.
    async fn message(&self, payload: Vec<u8>) -> Answer {
        let deadline = Instant::now() + self.state.config.mllp_ack_timeout;
        let message = match Message::parse(&payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(peer = %self.peer, error = %e, "MLLP message rejected: unreadable");
                return Answer::Ack(
                    build_reject_ack_without_message(
                        salvage_control_id(&payload).as_deref(),
                        &[AckError::from_parse_error(&e)],
                        &now(),
                        &ack_control_id(),
                    ),
                    AckCode::Reject,
                );
            }
        };
        let ack = |code: AckCode, errors: &[AckError]| {
            Answer::Ack(
                build_ack(&message, code, errors, &now(), &ack_control_id()),
                code,
            )
        };
        let batch = match self.accept(&payload, deadline).await {
            Ok(b) => b,
            Err(Refused::Conflict(why)) => {
                return ack(
                    AckCode::Error,
                    &[AckError {
                        location: None,
                        code: ErrorCode::ApplicationInternalError,
                        severity: Severity::Error,
                        text: why,
                    }],
                )
            }
            Err(Refused::Close(why)) => return Answer::Close(why),
        };
        let batch = match self.wait_done(&batch.id, deadline).await {
            Some(b) => b,
            None => return Answer::Close("the message was stored but not processed in time"),
        };
        let rejections = match self.state.store.batch_rejections(&batch.id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading a batch's rejections failed");
                return Answer::Close("the message's outcome could not be read");
            }
        };
        let k = batch.counts;
        let accepted = k.stored > 0 || k.duplicates > 0;
        let severity = if accepted {
            Severity::Warning
        } else {
            Severity::Error
        };
        let errors: Vec<AckError> = rejections
            .iter()
            .map(|r| AckError {
                location: error_location(&r.location),
                code: error_code(&r.location),
                severity,
                text: r.reason.clone(),
            })
            .collect();
        tracing::info!(
            peer = %self.peer,
            batch = %batch.id,
            stored = k.stored,
            rejected = k.rejected,
            duplicates = k.duplicates,
            "MLLP message acknowledged"
        );
        if accepted {
            ack(AckCode::Accept, &errors)
        } else {
            ack(AckCode::Error, &errors)
        }
    }

    /// Accepts the message as a batch, waiting (without reading) while the
    /// queue is full.
    async fn accept(&self, payload: &[u8], deadline: Instant) -> Result<BatchRecord, Refused> {
        let body = Bytes::copy_from_slice(payload);
        let mut backoff = FULL_BACKOFF_FIRST;
        loop {
            match super::accept_batch(&self.state, &self.caller, Format::Hl7v2, body.clone()).await
            {
                Ok(b) => return Ok(b),
                Err(ApiError::TooManyRequests(_)) => {
                    let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    if wait.is_zero() {
                        return Err(Refused::Close("the pipeline stayed full"));
                    }
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => {
                            return Err(Refused::Close("the server is stopping"))
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(FULL_BACKOFF_MAX);
                }
                Err(ApiError::Conflict(why)) | Err(ApiError::BadRequest(why)) => {
                    return Err(Refused::Conflict(why))
                }
                Err(ApiError::Unavailable(_)) => {
                    return Err(Refused::Close("the pipeline is stopping"))
                }
                Err(e) => {
                    tracing::error!(error = %e, "accepting an MLLP message failed");
                    return Err(Refused::Close("the message could not be stored"));
                }
            }
        }
    }

    /// The batch once done, or `None` past the deadline.
    async fn wait_done(&self, id: &str, deadline: Instant) -> Option<BatchRecord> {
        let finished = self.state.ingest.finished();
        loop {
            // Registered before the check, so a finish after it wakes us.
            let woken = finished.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.state.store.batch(id).await {
                Ok(Some(b)) if b.status == BatchStatus::Done => return Some(b),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "reading a batch failed"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = timeout(left.min(DONE_RECHECK), woken).await;
        }
    }
}

/// Why a message was not accepted.
enum Refused {
    /// Answered with an AE: the sender must change something first.
    Conflict(String),
    /// The connection is closed without an ACK.
    Close(&'static str),
}

/// The answer to a framing problem: an AR for a frame that was sent whole
/// but cannot be taken (too large, bad trailer), nothing for garbage or a
/// frame the sender abandoned.
fn frame_error(e: &FrameError, peer: &SocketAddr) -> Answer {
    tracing::warn!(%peer, error = %e, "MLLP framing error");
    match e {
        FrameError::TooLarge { .. } | FrameError::BadTrailer { .. } => Answer::Ack(
            build_reject_ack_without_message(
                None,
                &[AckError {
                    location: None,
                    code: ErrorCode::ApplicationInternalError,
                    severity: Severity::Error,
                    text: e.to_string(),
                }],
                &now(),
                &ack_control_id(),
            ),
            AckCode::Reject,
        ),
        FrameError::Garbage { .. }
        | FrameError::Unterminated { .. }
        | FrameError::Truncated { .. } => Answer::Nothing,
    }
}

/// ERR-2 from a rejection's location (`OBX[2].5`, `PID[1].3`); `None` for
/// the others (`line 4`).
fn error_location(location: &str) -> Option<ErrorLocation> {
    let (seg, rest) = location.split_once('[')?;
    let segment = SegmentId::from_prefix(seg.as_bytes()).filter(|_| seg.len() == 3)?;
    let (seq, rest) = rest.split_once(']')?;
    let sequence = seq.parse().ok()?;
    let field = rest.strip_prefix('.').and_then(|f| f.parse().ok());
    Some(ErrorLocation {
        segment,
        sequence,
        field,
        repetition: None,
        component: None,
        subcomponent: None,
    })
}

/// ERR-3 for a rejection: an unknown subject is an unknown key (204); a
/// value the checks refuse, a data type error (102), with the reason in
/// ERR-8.
fn error_code(location: &str) -> ErrorCode {
    if location.starts_with("PID") {
        ErrorCode::UnknownKeyIdentifier
    } else if location.starts_with("MSH") {
        ErrorCode::UnsupportedMessageType
    } else {
        ErrorCode::DataTypeError
    }
}

fn now() -> Dtm {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // A clock past year 9999 falls back to the epoch, which always fits.
    Dtm::from_unix(secs, 0)
        .or_else(|| Dtm::from_unix(0, 0))
        .expect("the epoch is a valid DTM")
}

/// The ACK's own MSH-10: 20 random hex digits (fits every version's
/// length).
fn ack_control_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(20);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_locations_become_err_2() {
        let l = error_location("OBX[2].5").unwrap();
        assert_eq!(l.segment.as_str(), "OBX");
        assert_eq!((l.sequence, l.field), (2, Some(5)));
        let l = error_location("PID[1]").unwrap();
        assert_eq!((l.segment.as_str(), l.sequence, l.field), ("PID", 1, None));
        assert!(error_location("line 4").is_none());
        assert!(error_location("OBXX[1].2").is_none());
        assert!(error_location("").is_none());
    }
}
