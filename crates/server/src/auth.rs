//! Authentication (bearer tokens) and authorisation (roles, site scoping).
//!
//! Tokens are 256 random bits, shown once at creation; the store keeps only
//! their SHA-256 (a fast hash is right here: the secret has full entropy, so
//! there is nothing to brute-force). `CLINFLOW_ADMIN_TOKEN`, when set, is
//! also accepted as an admin token, compared in constant time.
//!
//! Invariant: every route except those [`is_public`] names (`/healthz` and
//! the web page's static files) is authenticated by the front door
//! ([`authenticate_request`]) before its handler runs, unknown paths
//! included (401 before 404), and every handler reads the caller from
//! [`Caller`].

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::Response;
use clinflow_store::{AuditRecord, Scope, TokenRecord};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Read and write every site's data.
    DataManager,
    /// Read every site's data.
    Monitor,
    /// Read and write the subjects of its own site only.
    SiteUser,
    /// Its own records; submits diaries.
    Patient,
    /// Ingest endpoints only.
    Interface,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::DataManager => "data-manager",
            Role::Monitor => "monitor",
            Role::SiteUser => "site-user",
            Role::Patient => "patient",
            Role::Interface => "interface",
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Ok(match s {
            "admin" => Role::Admin,
            "data-manager" => Role::DataManager,
            "monitor" => Role::Monitor,
            "site-user" => Role::SiteUser,
            "patient" => Role::Patient,
            "interface" => Role::Interface,
            other => {
                return Err(format!(
                    "unknown role {other:?}: use admin, data-manager, monitor, site-user, patient or interface"
                ))
            }
        })
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (audited; never the secret).
    pub name: String,
    pub role: Role,
    /// For `site-user`: its site.
    pub site: Option<String>,
    /// For `patient`: its Patient id.
    pub patient: Option<String>,
}

impl Principal {
    /// Whose data this caller may read, or `None` when it may read no
    /// clinical data at all.
    pub fn read_scope(&self) -> Option<Scope> {
        match self.role {
            Role::Admin | Role::DataManager | Role::Monitor => Some(Scope::All),
            Role::SiteUser => Some(Scope::Sites(self.site.iter().cloned().collect())),
            Role::Patient => self.patient.clone().map(Scope::Patient),
            Role::Interface => None,
        }
    }

    /// Whether this caller may write clinical data at all (further limited
    /// to its site for `site-user`).
    pub fn may_write(&self) -> bool {
        matches!(self.role, Role::Admin | Role::DataManager | Role::SiteUser)
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// A new token's secret and its hash.
pub fn new_secret() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("cf_{}", hex::encode(bytes));
    let hash = hash_secret(&secret);
    (secret, hash)
}

/// The stored form of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality of two byte strings.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Creates a token and returns its secret (shown once).
pub async fn create_token(
    store: &clinflow_store::Store,
    name: &str,
    role: Role,
    site: Option<String>,
    patient: Option<String>,
    expires: Option<i64>,
    actor: &str,
) -> anyhow::Result<String> {
    if role == Role::SiteUser && site.is_none() {
        anyhow::bail!("a site-user token needs --site");
    }
    if role == Role::Patient && patient.is_none() {
        anyhow::bail!("a patient token needs --patient");
    }
    let (secret, hash) = new_secret();
    let now = clinflow_store::now_millis();
    let rec = TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_string(),
        role: role.as_str().to_string(),
        site,
        patient,
        created: now,
        expires,
        revoked: false,
    };
    let audit = AuditRecord {
        time: now,
        actor: actor.to_string(),
        role: "admin".into(),
        action: "token-create".into(),
        outcome: "success".into(),
        detail: Some(format!("token {} ({}) role {}", rec.id, rec.name, rec.role)),
        ..Default::default()
    };
    store.create_token(rec, hash, vec![audit]).await?;
    Ok(secret)
}

/// Why a bearer token was refused (kept off the wire: clients only see 401).
async fn authenticate(state: &AppState, header: Option<&str>) -> Result<Arc<Principal>, ApiError> {
    let token = header
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    if let Some(admin) = &state.config.admin_token {
        if ct_eq(admin.as_bytes(), token.as_bytes()) {
            return Ok(Arc::new(Principal {
                name: "admin-token".into(),
                role: Role::Admin,
                site: None,
                patient: None,
            }));
        }
    }
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let now = clinflow_store::now_millis();
    if let Some(p) = state.tokens.get(&digest, now) {
        return Ok(p);
    }
    let rec = state
        .store
        .token_by_hash(&hex::encode(digest))
        .await
        .map_err(ApiError::Internal)?
        .ok_or(ApiError::Unauthorized)?;
    if rec.revoked || rec.expires.is_some_and(|e| e <= now) {
        return Err(ApiError::Unauthorized);
    }
    let role = Role::from_str(&rec.role).map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?;
    let principal = Arc::new(Principal {
        name: rec.name,
        role,
        site: rec.site,
        patient: rec.patient,
    });
    state.tokens.put(digest, principal.clone(), rec.expires);
    Ok(principal)
}

/// Tokens checked against the store lately, so that a busy client costs a
/// hash and a map lookup per request instead of a database read.
///
/// Keyed by the secret's SHA-256 (the secret itself is not kept). An entry
/// is trusted for `ttl` after it was read, and never past the token's own
/// expiry; so a token revoked in the database (`clinflow token revoke`, or
/// on another node) stops working here within `ttl`. Unknown and refused
/// tokens are not cached: each costs a read.
///
/// The entries live in each worker thread's own map (at most
/// [`TokenCache::MAX`] per thread; full, it starts over): no lock and no
/// shared reference count on the request path, which a map shared by every
/// core had (measured: contended cache lines). A thread reads the store the
/// first time it sees a token in each `ttl`.
pub struct TokenCache {
    /// Unique per cache in the process: the key of its entries in the
    /// per-thread maps.
    id: u64,
    ttl: std::time::Duration,
}

struct CachedToken {
    principal: Arc<Principal>,
    /// The token's own expiry (ms), if any.
    expires: Option<i64>,
    /// Until when the entry is trusted.
    until: std::time::Instant,
}

thread_local! {
    static TOKENS: std::cell::RefCell<std::collections::HashMap<(u64, [u8; 32]), CachedToken>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

impl TokenCache {
    pub const MAX: usize = 10_000;

    /// A cache trusting entries for `ttl`; `ttl` zero caches nothing.
    pub fn new(ttl: std::time::Duration) -> TokenCache {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        TokenCache {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ttl,
        }
    }

    fn get(&self, digest: &[u8; 32], now_ms: i64) -> Option<Arc<Principal>> {
        if self.ttl.is_zero() {
            return None;
        }
        TOKENS.with(|t| {
            let t = t.borrow();
            let e = t.get(&(self.id, *digest))?;
            let fresh = e.until > std::time::Instant::now() && e.expires.is_none_or(|x| x > now_ms);
            fresh.then(|| e.principal.clone())
        })
    }

    fn put(&self, digest: [u8; 32], principal: Arc<Principal>, expires: Option<i64>) {
        if self.ttl.is_zero() {
            return;
        }
        // A copy per thread, so that threads do not share its count.
        let principal = Arc::new(Principal::clone(&principal));
        TOKENS.with(|t| {
            let mut t = t.borrow_mut();
            if t.len() >= Self::MAX {
                t.clear();
            }
            t.insert(
                (self.id, digest),
                CachedToken {
                    principal,
                    expires,
                    until: std::time::Instant::now()
                        .checked_add(self.ttl)
                        .unwrap_or_else(std::time::Instant::now),
                },
            );
        });
    }
}

/// Authenticates a request: puts its [`Principal`] into the request's
/// extensions (as an `Arc<Principal>`), or gives the 401 to answer
/// (counted in `auth_failures`). The front door calls it for every route
/// but the public ones ([`is_public`]).
pub async fn authenticate_request(state: &AppState, req: &mut Request) -> Result<(), Response> {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match authenticate(state, header).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            Ok(())
        }
        Err(e) => {
            state.metrics.auth_failures.inc();
            Err(crate::startup::error_for(req.uri().path(), e))
        }
    }
}

/// The routes (templates) served without a token: liveness, and the web
/// page's static files (which hold no data). Everything else, unknown
/// paths included, needs one.
pub fn is_public(route: &str) -> bool {
    matches!(
        route,
        "/healthz" | "/ui" | "/ui/" | "/ui/app.js" | "/ui/style.css"
    ) || crate::campaigns::PUBLIC_ROUTES.contains(&route)
}

/// The caller of a request: who, from where, and why.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub client: Option<String>,
    /// The `X-Reason` header.
    pub reason: Option<String>,
}

impl Caller {
    /// Refuses the `interface` role, which may use the ingest endpoints only.
    pub fn deny_interface(&self) -> Result<(), ApiError> {
        if self.principal.role == Role::Interface {
            return Err(ApiError::Forbidden(
                "the interface role may use the ingest endpoints only".into(),
            ));
        }
        Ok(())
    }

    /// An audit record of this caller doing `action`.
    pub fn audit(&self, action: &str, outcome: &str) -> AuditRecord {
        AuditRecord {
            time: clinflow_store::now_millis(),
            actor: self.principal.name.clone(),
            role: self.principal.role.as_str().to_string(),
            action: action.to_string(),
            reason: self.reason.clone(),
            outcome: outcome.to_string(),
            client: self.client.clone(),
            ..Default::default()
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Caller, ApiError> {
        let principal = parts
            .extensions
            .get::<Arc<Principal>>()
            .map(|p| Principal::clone(p))
            .ok_or(ApiError::Unauthorized)?;
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        let reason = parts
            .headers
            .get("x-reason")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(500).collect());
        Ok(Caller {
            principal,
            client,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_hash_to_what_is_stored() {
        let (a, ha) = new_secret();
        let (b, hb) = new_secret();
        assert_ne!(a, b);
        assert_eq!(hash_secret(&a), ha);
        assert_ne!(ha, hb);
        assert!(a.starts_with("cf_") && a.len() == 67);
    }

    #[test]
    fn roles_parse_from_their_names_only() {
        for r in [
            Role::Admin,
            Role::DataManager,
            Role::Monitor,
            Role::SiteUser,
            Role::Patient,
            Role::Interface,
        ] {
            assert_eq!(Role::from_str(r.as_str()), Ok(r));
        }
        assert!(Role::from_str("root").is_err());
    }

    #[test]
    fn constant_time_compare_is_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
