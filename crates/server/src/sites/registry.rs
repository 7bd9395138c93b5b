//! The site registry's in-memory snapshot and how it is kept fresh.
//!
//! Readers call [`SiteRegistry::snapshot`]: one atomic load of an
//! `Arc<Snapshot>` (`ArcSwap`), no lock, never waiting for a writer or a
//! rebuild, and every answer comes from one consistent set of sites. A
//! rebuild reads every site (`Organization` with the site identifier) and
//! every trial's protocol from the store, builds a new snapshot off to the
//! side (each site's JSON answer and ETag pre-rendered) and swaps it in.
//!
//! When a rebuild happens: every `sites_refresh` (the [`run`] loop), right
//! after a write through this server (the writer awaits it, so its next read
//! sees the write), and on PostgreSQL when any node commits a change to a
//! site or a trial (LISTEN/NOTIFY, [`clinflow_store::Store::site_changes`]).
//!
//! Invariant: a failed rebuild changes nothing that readers see; the last
//! good snapshot stays, its age shows in `/metrics`
//! (`clinflow_sites_snapshot_age_seconds`), and the failure is logged and
//! counted.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::http::HeaderValue;
use clinflow_store::{Scope, Store};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::model::Site;
use crate::metrics::{Metrics, OutcomeLabels};

/// One site as served.
#[derive(Debug)]
pub struct SiteEntry {
    pub site: Site,
    /// Ids of the trials whose current protocol lists this site.
    pub trials: Vec<String>,
    /// The `Organization`'s version: bumps with every change.
    pub version: u64,
    /// `GET /sites/{id}`'s body, rendered once per rebuild.
    pub body: Bytes,
    /// Its strong ETag, `"{id}.{version}.{trials digest}"`.
    pub etag: HeaderValue,
}

/// An immutable set of sites, in id order.
#[derive(Debug)]
pub struct Snapshot {
    pub sites: Vec<Arc<SiteEntry>>,
    by_id: HashMap<String, usize>,
    /// When it was built (its age is the staleness bound a reader sees).
    pub built: Instant,
    /// Distinguishes snapshots in list ETags: a digest of every site's
    /// ETag (id, version, trials).
    pub digest: String,
}

impl Snapshot {
    fn new(mut sites: Vec<SiteEntry>) -> Snapshot {
        sites.sort_by(|a, b| a.site.id.cmp(&b.site.id));
        let mut h = Sha256::new();
        for s in &sites {
            h.update(s.etag.as_bytes());
            h.update(b"\0");
        }
        let digest = hex::encode(&h.finalize()[..12]);
        let by_id = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.site.id.as_str().to_string(), i))
            .collect();
        Snapshot {
            sites: sites.into_iter().map(Arc::new).collect(),
            by_id,
            built: Instant::now(),
            digest,
        }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<SiteEntry>> {
        self.by_id.get(id).map(|&i| &self.sites[i])
    }
}

/// The registry: the snapshot and what rebuilds it. Cheap to share (`Arc`).
pub struct SiteRegistry {
    /// `ArcSwap`, not a lock: reads vastly outnumber rebuilds, and a reader
    /// must never wait for one.
    current: ArcSwap<Snapshot>,
    store: Store,
    metrics: Arc<Metrics>,
    /// Serialises rebuilds, so that one started after a write cannot be
    /// overtaken by an older one swapping in a snapshot without it. A tokio
    /// mutex: held across the store reads; readers never touch it.
    rebuilding: tokio::sync::Mutex<()>,
    /// Swapped snapshots so far; tests wait on it instead of sleeping.
    generation: tokio::sync::watch::Sender<u64>,
}

impl SiteRegistry {
    /// An empty registry; [`SiteRegistry::refresh`] fills it.
    pub fn new(store: Store, metrics: Arc<Metrics>) -> SiteRegistry {
        SiteRegistry {
            current: ArcSwap::from_pointee(Snapshot::new(Vec::new())),
            store,
            metrics,
            rebuilding: tokio::sync::Mutex::new(()),
            generation: tokio::sync::watch::channel(0).0,
        }
    }

    /// The snapshot served now. A guard, not an `Arc` clone: loading does
    /// not touch the snapshot's shared reference count, which every core
    /// would otherwise contend on. Keep it for the request only.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Counts swapped snapshots; changes after each successful refresh.
    pub fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Sets the age gauge (called when `/metrics` renders).
    pub fn observe_age(&self) {
        let snap = self.current.load();
        self.metrics
            .sites_snapshot_age
            .set(snap.built.elapsed().as_secs_f64());
        self.metrics.sites.set(snap.sites.len() as i64);
    }

    /// Rebuilds the snapshot from the store and swaps it in. On failure the
    /// served snapshot stays as it was.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let _one = self.rebuilding.lock().await;
        match build(&self.store).await {
            Ok(sites) => {
                self.current.store(Arc::new(Snapshot::new(sites)));
                self.metrics
                    .sites_refreshes
                    .get_or_create(&OutcomeLabels { outcome: "ok" })
                    .inc();
                self.generation.send_modify(|g| *g += 1);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .sites_refreshes
                    .get_or_create(&OutcomeLabels { outcome: "failed" })
                    .inc();
                tracing::error!(error = %e, "the site registry could not be refreshed; the last good snapshot stays");
                Err(e)
            }
        }
    }

    /// Refreshes after a write through this server. The write is committed
    /// whatever happens here, so a failed refresh is logged (by
    /// [`SiteRegistry::refresh`]) and not returned: the periodic refresh
    /// retries.
    pub async fn refresh_after_write(&self) {
        let _ = self.refresh().await;
    }

    /// Whether a write of this resource type can change a site or the
    /// trials that list it.
    pub fn affected_by(rtype: &str) -> bool {
        matches!(rtype, "Organization" | "ResearchStudy")
    }

    /// After a FHIR write of these types: refreshes when one of them can
    /// change a site, so the writer's next `/sites` read sees it.
    pub async fn after_fhir_write<'a>(&self, rtypes: impl IntoIterator<Item = &'a str>) {
        if rtypes.into_iter().any(Self::affected_by) {
            self.refresh_after_write().await;
        }
    }
}

/// Reads every site and the trials that list it.
async fn build(store: &Store) -> anyhow::Result<Vec<SiteEntry>> {
    let mut trials_of: HashMap<String, BTreeSet<String>> = HashMap::new();
    for t in store.list_trials().await? {
        // One unreadable protocol must not hold every site back: its
        // trial lists no site until it is fixed (said so in the log).
        let p = match clinflow_protocol::parse_json(&t.protocol) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(trial = %t.id, error = %e, "a stored protocol does not parse; its sites are listed without it");
                continue;
            }
        };
        for s in &p.sites {
            trials_of
                .entry(s.id.as_str().to_string())
                .or_default()
                .insert(t.id.clone());
        }
    }
    let orgs = store
        .current_resources("Organization", None, Scope::All)
        .await?;
    let mut out = Vec::with_capacity(orgs.len());
    for org in orgs {
        let body = org.body.as_deref().unwrap_or("null");
        let json: serde_json::Value = serde_json::from_str(body)
            .with_context(|| format!("Organization/{} is not JSON", org.id))?;
        // An Organization written through the FHIR API may carry the site
        // identifier without what a site needs; it is left out (and said
        // so), rather than holding every other site's change back.
        let site = match Site::from_organization(&json) {
            Ok(Some(site)) => site,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(organization = %org.id, error = %e, "an Organization with the site identifier is not a valid site; it is not in the registry");
                continue;
            }
        };
        let trials: Vec<String> = trials_of
            .remove(site.id.as_str())
            .map(|t| t.into_iter().collect())
            .unwrap_or_default();
        let updated = clinflow_fhir::datetime::format_instant(org.last_updated);
        let body = serde_json::to_vec(&site.to_json(&trials, org.version, &updated))?;
        // The trials that list a site change without its Organization
        // changing (an amendment), so they are part of the tag.
        let listed = Sha256::digest(trials.join("\n").as_bytes());
        let etag = HeaderValue::from_str(&format!(
            "\"{}.{}.{}\"",
            site.id,
            org.version,
            hex::encode(&listed[..4])
        ))?;
        out.push(SiteEntry {
            site,
            trials,
            version: org.version,
            body: Bytes::from(body),
            etag,
        });
    }
    Ok(out)
}

/// Keeps the registry fresh until `stop`: every `every`, and whenever the
/// store signals a change made elsewhere.
pub async fn run(registry: Arc<SiteRegistry>, every: Duration, stop: CancellationToken) {
    let mut changes = registry.store.site_changes();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match changes.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            signal = changed => {
                if signal.is_none() {
                    tracing::warn!("the site-change listener stopped; refreshing on the timer only");
                    changes = None;
                    continue;
                }
            }
        }
        let _ = registry.refresh().await;
    }
}
