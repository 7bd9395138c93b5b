//! Building and running the server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use clinflow_store::Store;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::ApiError;
use crate::ingest::mllp::MllpListener;
use crate::ingest::{Pipeline, Stages};
use crate::metrics::{self, Metrics};
use crate::sites::SiteRegistry;
use crate::state::AppState;
use crate::{audit_api, campaigns, dashboard, fhir, ingest, queries, sites, trials, ui};
use anyhow::Context;

/// A built server, bound to its port, not yet serving.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    /// The MLLP listener, when `Config::mllp_listen` is set.
    mllp: Option<MllpListener>,
    /// The ingest workers, stopped after the last request.
    pipeline: Pipeline,
    /// The DIMSE listener, when `config.imaging.dicom_listen` is set.
    dicom: Option<TcpListener>,
}

impl Application {
    /// Opens the store (creating and migrating it) and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let store = Store::open(&config.database).await?;
        Application::with_store(config, store).await
    }

    /// As [`Application::build`], with a store opened by the caller.
    pub async fn with_store(config: Config, store: Store) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(config.listen).await?;
        let mllp = match config.mllp_listen {
            Some(addr) => Some(MllpListener::bind(addr).await?),
            None => None,
        };
        let dicom = match config.imaging.dicom_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the DICOM listener to {addr}"))?,
            ),
            None => None,
        };
        let mut metrics = Metrics::new();
        let imaging = Arc::new(
            crate::imaging::Imaging::new(
                config.imaging.clone(),
                store.clone(),
                metrics.registry_mut(),
            )
            .context("setting up imaging")?,
        );
        let history = Arc::new(
            crate::history::Gateway::start(&config.history, &store, metrics.registry_mut())
                .await
                .context("starting the patient history gateway")?,
        );
        let metrics = Arc::new(metrics);
        // Read before any request is taken, so a batch accepted from now on
        // is queued once, by its request.
        let unfinished = store.unfinished_batches().await?;
        let (ingest, pipeline) = Pipeline::start(
            store.clone(),
            metrics.clone(),
            Stages {
                map_workers: config.ingest_map_workers,
                persist_workers: config.ingest_persist_workers,
                queue: config.ingest_queue,
                mapped_queue: config.ingest_mapped_queue,
            },
            unfinished,
        );
        let sites = Arc::new(SiteRegistry::new(store.clone(), metrics.clone()));
        sites.refresh().await.context("loading the site registry")?;
        let tokens = Arc::new(crate::auth::TokenCache::new(config.token_cache_ttl));
        let notify = Arc::new(
            crate::campaigns::Notifier::new(
                &store,
                &config.notify,
                &listener.local_addr()?.to_string(),
            )
            .await
            .context("setting up notifications")?,
        );
        let state = AppState::new(crate::state::Shared {
            in_flight: Semaphore::new(config.max_in_flight),
            ingest_rates: Default::default(),
            tokens,
            notify,
            history,
            imaging,
            store,
            config: Arc::new(config),
            metrics,
            ingest,
            sites,
        });
        let router = router(state.clone());
        Ok(Application {
            listener,
            router,
            state,
            mllp,
            pipeline,
            dicom,
        })
    }

    /// The DICOM listener's bound address, when it was asked for.
    pub fn dicom_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.dicom.as_ref().map(TcpListener::local_addr)
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The MLLP listener's bound address, when it was asked for.
    pub fn mllp_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.mllp.as_ref().map(MllpListener::local_addr)
    }

    /// The shared state (for the CLI's demo set-up and for tests).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves; then stops accepting (HTTP and
    /// MLLP), finishes the requests and MLLP messages in flight (the
    /// pipeline still running, so that their ACKs can be sent), drains the
    /// ingest stages (at most `ingest_drain_timeout`), and commits queued
    /// audit records.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let signal = {
            let stop = stop.clone();
            tokio::spawn(async move {
                shutdown.await;
                stop.cancel();
            })
        };
        let refresher = tokio::spawn(crate::sites::registry::run(
            self.state.sites.clone(),
            self.state.config.sites_refresh,
            stop.clone(),
        ));
        let app = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        // No Nagle delay: an answer is one write, and waiting for the
        // client's ACK before sending the next one only adds latency.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let http =
            axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let notifier = {
            let notify = self.state.notify.clone();
            let stop = stop.clone();
            tokio::spawn(async move { notify.run(stop).await })
        };
        let dicom = self.dicom.map(|listener| {
            tokio::spawn(crate::imaging::dimse::run(
                self.state.imaging.clone(),
                listener,
                stop.clone(),
            ))
        });
        let workers_stop = CancellationToken::new();
        let workers = tokio::spawn(crate::imaging::analysis::run_workers(
            self.state.imaging.clone(),
            workers_stop.clone(),
        ));
        let mllp = async {
            if let Some(mllp) = self.mllp {
                mllp.run(self.state.clone(), stop.clone()).await;
            }
        };
        let (served, ()) = tokio::join!(
            async {
                let r = http.await;
                // An HTTP server that failed stops the MLLP listener too.
                stop.cancel();
                r
            },
            mllp
        );
        signal.abort();
        refresher.abort();
        if let Some(dicom) = dicom {
            // It stopped accepting at `stop`, and gives its associations a
            // grace period.
            let _ = dicom.await;
        }
        // The analyses running finish (bounded); one cut off is delivered
        // again after its lease.
        workers_stop.cancel();
        match tokio::time::timeout(self.state.config.ingest_drain_timeout, workers).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the imaging workers failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "the imaging workers panicked"),
            Err(_) => {
                tracing::warn!("imaging analyses still running at shutdown; they are redelivered")
            }
        }
        self.state.history.stop();
        // The delivery workers saw `stop`: their sends in flight finish
        // (bounded by the send timeout) and are recorded.
        if let Err(e) = notifier.await {
            tracing::error!(error = %e, "the notification workers failed");
        }
        served?;
        self.pipeline
            .stop(self.state.config.ingest_drain_timeout)
            .await;
        self.state.store.flush().await?;
        tracing::info!("server stopped; queued audit records committed");
        Ok(())
    }
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .nest("/fhir", fhir::routes())
        .route("/trials", get(trials::list_trials).post(trials::post_trial))
        .route("/trials/{id}", get(trials::get_trial))
        .route(
            "/trials/{id}/subjects",
            get(dashboard::list_subjects).post(trials::post_subjects),
        )
        .route(
            "/trials/{id}/subjects/{subject}",
            get(dashboard::get_subject),
        )
        .route("/trials/{id}/dashboard", get(dashboard::get_dashboard))
        .nest("/ingest", ingest::routes())
        .merge(sites::routes())
        .merge(campaigns::routes())
        .route("/queries", get(queries::list))
        .route("/queries/{id}/answer", post(queries::answer))
        .route("/queries/{id}/close", post(queries::close))
        .route("/patients/{id}/history", get(crate::history::get_history))
        .route("/audit/export", get(audit_api::export))
        .route("/audit/verify", get(audit_api::verify))
        .route("/metrics", get(render_metrics))
        .merge(crate::imaging::dicomweb::routes())
        .merge(crate::imaging::tasks::routes());
    Router::new()
        .route("/healthz", get(healthz))
        .merge(ui::routes())
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), front_door))
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// What every request goes through first, in one layer (each stateful
/// layer costs a state clone and a boxed future per request):
/// - load shedding: past `max_in_flight` requests at once, 503 with
///   `Retry-After` instead of queueing without bound;
/// - the whole-request deadline (`request_timeout`): 503 past it;
/// - authentication, for every route but the public ones
///   ([`crate::auth::is_public`]);
/// - request metrics by route template ([`metrics::observe`]).
async fn front_door(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = std::time::Instant::now();
    let labels = metrics::labels_of(&req);
    let fhir = req.uri().path().starts_with("/fhir");
    let error = |e: ApiError| error_in(fhir, e);
    let route = labels.1;
    let serve = async {
        let mut req = req;
        if !crate::auth::is_public(route) {
            if let Err(refused) = crate::auth::authenticate_request(&state, &mut req).await {
                return refused;
            }
        }
        next.run(req).await
    };
    let resp = match state.in_flight.try_acquire() {
        Ok(_permit) => match tokio::time::timeout(state.config.request_timeout, serve).await {
            Ok(resp) => resp,
            Err(_) => {
                tracing::warn!("request exceeded its deadline");
                error(ApiError::Unavailable(1))
            }
        },
        Err(_) => error(ApiError::Unavailable(1)),
    };
    metrics::observe(&state.metrics, labels, resp.status().as_u16(), start);
    resp
}

/// An error in the shape of the API the path belongs to: an
/// OperationOutcome under `/fhir`, problem+json elsewhere.
pub(crate) fn error_for(path: &str, e: ApiError) -> Response {
    error_in(path.starts_with("/fhir"), e)
}

/// As [`error_for`], knowing already whether the path is under `/fhir`.
fn error_in(fhir: bool, e: ApiError) -> Response {
    if fhir {
        crate::error::FhirError::from(e).into_response()
    } else {
        e.into_response()
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let db = tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await;
    let (status, db_state) = match db {
        Ok(Ok(())) => (StatusCode::OK, "ok"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "unreachable")
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
    };
    (
        status,
        axum::Json(serde_json::json!({
            "status": if status == StatusCode::OK { "ok" } else { "degraded" },
            "database": {"engine": state.store.engine(), "status": db_state},
        })),
    )
        .into_response()
}

async fn render_metrics(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
) -> Result<Response, ApiError> {
    caller.deny_interface()?;
    state.sites.observe_age();
    state.imaging.observe_queue().await;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response())
}
