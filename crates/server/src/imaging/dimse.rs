//! The DIMSE C-STORE/C-ECHO listener (`--dicom-listen`): `clinflow-dimse`
//! does the protocol; this sink stores each instance through
//! [`super::intake`], one [`Session`] per association, finished (tasks
//! released, ImagingStudy written) when the association ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clinflow_dimse::{AssociationSummary, ScpConfig, StoreRequest, StoreSink, StoreStatus};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::intake::{Input, Sender, Session};
use super::Imaging;

/// Longest one instance may take to be stored; past it the sender gets a
/// failure status and may send it again.
const STORE_TIMEOUT: Duration = Duration::from_secs(60);

struct Sink {
    imaging: Arc<Imaging>,
    sessions: Mutex<HashMap<u64, Session>>,
}

impl StoreSink for Sink {
    async fn store(&self, req: StoreRequest) -> StoreStatus {
        let mut session = self
            .sessions
            .lock()
            .expect("the sessions lock")
            .remove(&req.association)
            .unwrap_or_default();
        let sender = Sender {
            actor: format!("dimse:{}", req.calling_ae),
            role: "interface".into(),
            client: Some(req.peer.ip().to_string()),
            source: "dimse",
            site_only: None,
            study: None,
        };
        let input = Input::Dataset {
            dataset: req.dataset,
            transfer_syntax: req.transfer_syntax,
            sop_class_uid: req.sop_class_uid,
            sop_instance_uid: req.sop_instance_uid,
        };
        let result = tokio::time::timeout(
            STORE_TIMEOUT,
            self.imaging.accept(input, &sender, &mut session),
        )
        .await;
        self.sessions
            .lock()
            .expect("the sessions lock")
            .insert(req.association, session);
        match result {
            Ok(Ok(stored)) => {
                if stored.duplicate {
                    self.imaging.metrics.received("dimse", "duplicate");
                }
                StoreStatus::success()
            }
            Ok(Err(refusal)) => {
                self.imaging.metrics.received("dimse", refusal.kind());
                tracing::info!(reason = refusal.kind(), "C-STORE refused");
                StoreStatus::with_comment(refusal.status(), refusal.comment())
            }
            Err(_) => {
                self.imaging.metrics.received("dimse", "timeout");
                StoreStatus::with_comment(
                    clinflow_dimse::status::OUT_OF_RESOURCES,
                    "storing the instance took too long; send it again",
                )
            }
        }
    }

    async fn association_closed(&self, summary: AssociationSummary) {
        let session = self
            .sessions
            .lock()
            .expect("the sessions lock")
            .remove(&summary.association);
        tracing::info!(
            stored = summary.stored,
            failed = summary.failed,
            end = ?summary.end,
            "DICOM association closed"
        );
        if let Some(session) = session {
            self.imaging.finish_session(session).await;
        }
    }
}

/// Serves C-STORE and C-ECHO on `listener` until `stop`.
pub async fn run(imaging: Arc<Imaging>, listener: TcpListener, stop: CancellationToken) {
    let cfg = ScpConfig {
        ae_title: imaging.config.dicom_ae.clone(),
        max_associations: imaging.config.dicom_max_associations,
        max_instance_bytes: imaging.config.max_instance_bytes,
        ..ScpConfig::default()
    };
    let sink = Arc::new(Sink {
        imaging,
        sessions: Mutex::new(HashMap::new()),
    });
    if let Err(e) = clinflow_dimse::serve(listener, cfg, sink, stop.cancelled_owned()).await {
        tracing::error!(error = %e, "the DICOM listener failed");
    }
}
