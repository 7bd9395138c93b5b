//! The test harness: a real server per test, on port 0, on either engine.
//!
//! [`spawn_app`] builds the same [`Application`] `clinflow serve` runs, on a
//! database of its own (SQLite in a temporary directory, or a fresh
//! PostgreSQL schema), with a random admin token, and serves it on a spawned
//! task until the [`TestApp`] is shut down or dropped. Tests talk to it only
//! through HTTP and the `clinflow` binary; the [`Store`] handle is there for
//! what an attacker with database access would do (audit tampering) and for
//! creating tokens as `clinflow token create` does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use clinflow_server::auth::{create_token, Role};
use clinflow_server::{Application, Config};
use clinflow_store::{DatabaseUrl, Store};
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The PostgreSQL server tests use unless `CLINFLOW_TEST_PG` says otherwise.
pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

pub const PROTOCOL_YAML: &str = include_str!("../../../../reference-trial/protocol.yaml");
pub const SUBJECTS_CSV: &str = include_str!("../../../../reference-trial/subjects.csv");
pub const EVENTS_BUNDLE: &str =
    include_str!("../../../../reference-trial/samples/events-bundle.json");

pub const FHIR_JSON: &str = "application/fhir+json";

/// Which storage engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Runs each named test on both engines, as `sqlite::name` and
/// `postgres::name`. A test is `async fn name(app: TestApp)`; `name with f`
/// first changes the server's [`Config`] with `f: fn(&mut Config)`.
#[macro_export]
macro_rules! engine_tests {
    ($($name:ident $(with $configure:expr)?),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    #[allow(unused_mut, unused_assignments)]
                    let mut configure: fn(&mut clinflow_server::Config) = |_| {};
                    $( configure = $configure; )?
                    $crate::helpers::run_test($crate::helpers::Engine::Sqlite, configure, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    #[allow(unused_mut, unused_assignments)]
                    let mut configure: fn(&mut clinflow_server::Config) = |_| {};
                    $( configure = $configure; )?
                    $crate::helpers::run_test($crate::helpers::Engine::Postgres, configure, super::$name).await;
                }
            )*
        }
    };
}

/// Spawns an app, runs `test` on it, and drops the PostgreSQL schema
/// afterwards (best effort), whether the test passed or panicked.
pub async fn run_test<F, Fut>(engine: Engine, configure: fn(&mut Config), test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::FutureExt;
    let app = spawn_app(engine, configure).await;
    let schema = app.pg_schema.clone();
    let outcome = std::panic::AssertUnwindSafe(test(app)).catch_unwind().await;
    if let Some((base, schema)) = schema {
        drop_schema(&base, &schema).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// As [`run_test`], with a configuration closure that may capture.
pub async fn run_test_with<F, Fut>(engine: Engine, configure: impl FnOnce(&mut Config), test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::FutureExt;
    let app = spawn_app(engine, configure).await;
    let schema = app.pg_schema.clone();
    let outcome = std::panic::AssertUnwindSafe(test(app)).catch_unwind().await;
    if let Some((base, schema)) = schema {
        drop_schema(&base, &schema).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A unique, valid SQL identifier and token name part.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}",
        uuid::Uuid::new_v4().simple(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The PostgreSQL server URL (without a schema).
pub fn pg_base() -> String {
    std::env::var("CLINFLOW_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.to_string())
}

/// A database of its own: `(url, tempdir for SQLite, (pg base, schema))`.
pub fn fresh_database(
    engine: Engine,
) -> (String, Option<tempfile::TempDir>, Option<(String, String)>) {
    match engine {
        Engine::Sqlite => {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let url = format!("sqlite://{}", dir.path().join("clinflow.db").display());
            (url, Some(dir), None)
        }
        Engine::Postgres => {
            let base = pg_base();
            let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
            let sep = if base.contains('?') { '&' } else { '?' };
            (
                format!("{base}{sep}schema={schema}"),
                None,
                Some((base, schema)),
            )
        }
    }
}

/// Drops a test schema; failures only cost space, so they are ignored.
pub async fn drop_schema(base: &str, schema: &str) {
    let Ok((client, conn)) = tokio_postgres::connect(base, tokio_postgres::NoTls).await else {
        return;
    };
    let driver = tokio::spawn(conn);
    let _ = client
        .batch_execute(&format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        ))
        .await;
    drop(client);
    let _ = driver.await;
}

/// Opens the store at `url`, failing the test with a clear message when
/// PostgreSQL cannot be reached (never a skip).
pub async fn open_store(url: &str) -> Store {
    let parsed: DatabaseUrl = url.parse().expect("a database URL");
    match Store::open(&parsed).await {
        Ok(s) => s,
        Err(e) => match parsed {
            DatabaseUrl::Postgres(_) => panic!(
                "PostgreSQL is not reachable at {} ({e:#}). Start it, or set CLINFLOW_TEST_PG to a \
                 postgres:// URL: these tests fail rather than skip.",
                pg_base()
            ),
            DatabaseUrl::Sqlite(_) => panic!("opening {url}: {e:#}"),
        },
    }
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub engine: Engine,
    pub addr: SocketAddr,
    /// The MLLP listener's address, when `config.mllp_listen` was set.
    pub mllp_addr: Option<SocketAddr>,
    /// `http://ADDR`.
    pub base: String,
    pub client: reqwest::Client,
    /// The admin token (`config.admin_token`, as `CLINFLOW_ADMIN_TOKEN` sets it).
    pub admin: String,
    /// The server's store (same process, same handle).
    pub store: Store,
    /// The `--database` URL of this app's database.
    pub db_url: String,
    /// The configuration the server runs with.
    pub config: Config,
    /// The server's site registry (tests wait on its refreshes).
    pub sites: std::sync::Arc<clinflow_server::sites::SiteRegistry>,
    /// The server's shared state (for the demo loader).
    pub state: clinflow_server::state::AppState,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// The DICOM listener's address, when `config.imaging.dicom_listen` was set.
    pub dicom_addr: Option<SocketAddr>,
    /// Keeps the SQLite database alive as long as the app.
    _dir: Option<tempfile::TempDir>,
    /// Keeps the imaging files alive as long as the app.
    _files: Option<tempfile::TempDir>,
    /// PostgreSQL: `(server URL, schema)`, dropped after the test.
    pub pg_schema: Option<(String, String)>,
}

/// Builds and starts a server on a fresh database of `engine`; `configure`
/// adjusts the [`Config`] first (`|_| {}` for the defaults).
pub async fn spawn_app(engine: Engine, configure: impl FnOnce(&mut Config)) -> TestApp {
    let (db_url, dir, pg_schema) = fresh_database(engine);
    let store = open_store(&db_url).await;
    let admin = format!("admin-{}", uuid::Uuid::new_v4().simple());
    let mut config = Config::new(db_url.parse().expect("a database URL"));
    config.listen = "127.0.0.1:0".parse().expect("an address");
    config.admin_token = Some(admin.clone());
    let files = tempfile::tempdir().expect("a temporary directory");
    config.imaging.dir = files.path().join("imaging");
    configure(&mut config);
    let app = Application::with_store(config.clone(), store.clone())
        .await
        .expect("the server builds");
    let dicom_addr = app
        .dicom_local_addr()
        .map(|a| a.expect("a bound DICOM address"));
    let addr = app.local_addr().expect("a bound address");
    let sites = app.state().sites.clone();
    let state = app.state().clone();
    let mllp_addr = app
        .mllp_local_addr()
        .map(|a| a.expect("a bound MLLP address"));
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        engine,
        addr,
        mllp_addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client"),
        admin,
        store,
        db_url,
        config,
        sites,
        state,
        shutdown: Some(tx),
        server: Some(server),
        dicom_addr,
        _dir: dir,
        _files: Some(files),
        pg_schema,
    }
}

/// A second server on `app`'s database (another node of the same
/// deployment), with the same admin token; stopped when dropped.
pub async fn spawn_node(app: &TestApp) -> TestApp {
    spawn_node_with(app, |_| {}).await
}

/// As [`spawn_node`], with `configure` changing its [`Config`] first.
pub async fn spawn_node_with(app: &TestApp, configure: impl FnOnce(&mut Config)) -> TestApp {
    let store = open_store(&app.db_url).await;
    let mut config = app.config.clone();
    config.listen = "127.0.0.1:0".parse().expect("an address");
    configure(&mut config);
    let node = Application::with_store(config.clone(), store.clone())
        .await
        .expect("the second node builds");
    let dicom_addr = node
        .dicom_local_addr()
        .map(|a| a.expect("a bound DICOM address"));
    let addr = node.local_addr().expect("a bound address");
    let sites = node.state().sites.clone();
    let state = node.state().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(node.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        engine: app.engine,
        addr,
        mllp_addr: None,
        base: format!("http://{addr}"),
        client: app.client.clone(),
        admin: app.admin.clone(),
        store,
        db_url: app.db_url.clone(),
        config,
        sites,
        state,
        shutdown: Some(tx),
        server: Some(server),
        dicom_addr,
        _dir: None,
        _files: None,
        pg_schema: None,
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Resp {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Asserts that this is an `OperationOutcome` with `status`; returns it.
    #[track_caller]
    pub fn outcome(&self, status: u16) -> Value {
        self.expect(status);
        let j = self.json();
        assert_eq!(
            j["resourceType"], "OperationOutcome",
            "expected an OperationOutcome: {}",
            self.text
        );
        assert!(
            j["issue"].as_array().is_some_and(|i| !i.is_empty()),
            "an OperationOutcome without issues: {}",
            self.text
        );
        j
    }

    /// Asserts that this is an `application/problem+json` with `status`.
    #[track_caller]
    pub fn problem(&self, status: u16) -> Value {
        self.expect(status);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.text
        );
        let j = self.json();
        assert_eq!(j["status"], status);
        assert!(j["detail"].is_string(), "{}", self.text);
        j
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
    }

    pub async fn send(&self, req: RequestBuilder) -> Resp {
        let resp = req.send().await.expect("the server answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("a response body");
        Resp {
            status,
            headers,
            text,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.send(self.request(Method::GET, path, token)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.send(self.request(Method::DELETE, path, token)).await
    }

    /// POST with a body of the given media type.
    pub async fn post(&self, path: &str, token: &str, content_type: &str, body: &str) -> Resp {
        self.send(
            self.request(Method::POST, path, token)
                .header("content-type", content_type)
                .body(body.to_string()),
        )
        .await
    }

    /// PUT of FHIR JSON.
    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.send(
            self.request(Method::PUT, path, token)
                .header("content-type", FHIR_JSON)
                .body(body.to_string()),
        )
        .await
    }

    /// POST of FHIR JSON (create, or a Bundle to `/fhir`).
    pub async fn fhir_post(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.post(path, token, FHIR_JSON, &body.to_string()).await
    }

    /// Creates a resource as `token`; returns its new id. Panics unless 201.
    pub async fn create(&self, token: &str, resource: &Value) -> String {
        let rtype = resource["resourceType"].as_str().expect("a resourceType");
        let r = self
            .fhir_post(&format!("/fhir/{rtype}"), token, resource)
            .await;
        r.expect(201);
        r.json()["id"].as_str().expect("an id").to_string()
    }

    /// A search as `token`; returns the searchset Bundle. Panics unless 200.
    pub async fn search(&self, token: &str, rtype: &str, query: &str) -> Value {
        let r = self.get(&format!("/fhir/{rtype}?{query}"), token).await;
        r.expect(200);
        let b = r.json();
        assert_eq!(b["type"], "searchset", "{}", r.text);
        b
    }

    /// The ids of a search's matches, following every `next` link.
    pub async fn search_ids(&self, token: &str, rtype: &str, query: &str) -> Vec<String> {
        let mut ids = Vec::new();
        let mut bundle = self.search(token, rtype, query).await;
        loop {
            ids.extend(match_ids(&bundle));
            let Some(next) = next_link(&bundle) else {
                break;
            };
            let r = self.get(&self.relative(&next), token).await;
            r.expect(200);
            bundle = r.json();
        }
        ids
    }

    /// How many resources of `rtype` the caller sees (`_total=accurate`).
    pub async fn count(&self, token: &str, rtype: &str) -> u64 {
        self.search(token, rtype, "_total=accurate&_count=0").await["total"]
            .as_u64()
            .expect("a total")
    }

    /// A link of this server as a path (links carry the Host we sent).
    pub fn relative(&self, link: &str) -> String {
        link.strip_prefix(&self.base)
            .unwrap_or_else(|| panic!("link {link} is not on {}", self.base))
            .to_string()
    }

    /// Creates a token of `role` on the app's store, as `clinflow token
    /// create` does, named `name`.
    pub async fn token_named(
        &self,
        name: &str,
        role: &str,
        site: Option<&str>,
        patient: Option<&str>,
    ) -> String {
        let role: Role = role.parse().expect("a role");
        create_token(
            &self.store,
            name,
            role,
            site.map(str::to_string),
            patient.map(str::to_string),
            None,
            "test",
        )
        .await
        .expect("a token")
    }

    /// As [`TestApp::token_named`], with a name made from the role.
    pub async fn token(&self, role: &str, site: Option<&str>, patient: Option<&str>) -> String {
        let name = format!("{role}-{}", uuid::Uuid::new_v4().simple());
        self.token_named(&name, role, site, patient).await
    }

    /// Loads CARDIO-01 through the API: the protocol, then its subjects.
    pub async fn load_reference_trial(&self) {
        let r = self
            .post("/trials", &self.admin, "application/yaml", PROTOCOL_YAML)
            .await;
        assert!(r.status == 200 || r.status == 201, "{}", r.text);
        let r = self
            .post(
                &format!("/trials/{}/subjects", trial_id()),
                &self.admin,
                "text/csv",
                SUBJECTS_CSV,
            )
            .await;
        r.expect(200);
    }

    /// Signals shutdown without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server task after [`TestApp::signal_shutdown`]: it
    /// finishes the requests in flight and commits queued audit records.
    pub async fn stopped(&mut self) -> anyhow::Result<()> {
        match self.server.take() {
            Some(h) => h.await.expect("the server task does not panic"),
            None => Ok(()),
        }
    }

    /// Runs the `clinflow` binary with `--database` set to this app's
    /// database.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli(&self.db_url, args)
    }

    /// The SQL that lifts the audit trail's append-only protection, as an
    /// attacker with database access would (trigger names from each
    /// engine's `0001_init.sql`).
    pub fn drop_audit_triggers_sql(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite => "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;",
            Engine::Postgres => {
                "DROP TRIGGER audit_log_no_update ON audit_log; \
                 DROP TRIGGER audit_log_no_delete ON audit_log;"
            }
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.signal_shutdown();
    }
}

/// The value of a sample (`name value`, `name` with its labels if any) in
/// Prometheus text; 0 when absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

/// The `clinflow` binary of this build.
/// A port nothing listens on now (for a `clinflow serve` process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn clinflow_bin() -> &'static str {
    env!("CARGO_BIN_EXE_clinflow")
}

/// Runs `clinflow --database URL ARGS...` in the workspace root.
pub fn cli(db_url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(clinflow_bin())
        .args(args)
        .arg("--database")
        .arg(db_url)
        .current_dir(workspace_root())
        .env_remove("CLINFLOW_DATABASE")
        .env_remove("CLINFLOW_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the clinflow binary runs")
}

/// The workspace root (where `reference-trial/` is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ids of a searchset's `match` entries, in order.
pub fn match_ids(bundle: &Value) -> Vec<String> {
    entries(bundle)
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().expect("an id").to_string())
        .collect()
}

pub fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"].as_array().cloned().unwrap_or_default()
}

pub fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

/// `issue[].expression[]` of an OperationOutcome, flattened.
pub fn expressions(outcome: &Value) -> Vec<String> {
    outcome["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect()
}

/// One row of the reference trial's subjects.csv.
#[derive(Debug, Clone)]
pub struct SubjectRow {
    pub id: String,
    pub site: String,
}

/// The subjects of subjects.csv (a plain file: no quoting).
pub fn subjects() -> Vec<SubjectRow> {
    let mut lines = SUBJECTS_CSV.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let (id, site) = (col("subject"), col("site"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            SubjectRow {
                id: f[id].to_string(),
                site: f[site].to_string(),
            }
        })
        .collect()
}

/// The reference protocol, parsed.
pub fn protocol() -> clinflow_protocol::Protocol {
    clinflow_protocol::parse_yaml(PROTOCOL_YAML).expect("the reference protocol parses")
}

pub fn trial_id() -> String {
    protocol().id.as_str().to_string()
}

/// The site ids of the reference protocol, in order.
pub fn site_ids() -> Vec<String> {
    protocol()
        .sites
        .iter()
        .map(|s| s.id.as_str().to_string())
        .collect()
}

/// The subjects of one site.
pub fn subjects_of(site: &str) -> Vec<String> {
    subjects()
        .into_iter()
        .filter(|s| s.site == site)
        .map(|s| s.id)
        .collect()
}

/// A minimal valid Observation of `subject`.
pub fn observation(subject: &str, loinc: &str, date: &str, value: &str, unit: &str) -> Value {
    // The value goes in as raw JSON number text so decimals keep their form.
    let text = format!(
        r#"{{"resourceType":"Observation","status":"final",
        "category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],
        "code":{{"coding":[{{"system":"http://loinc.org","code":"{loinc}"}}]}},
        "subject":{{"reference":"Patient/{subject}"}},
        "effectiveDateTime":"{date}",
        "valueQuantity":{{"value":{value},"unit":"{unit}","system":"http://unitsofmeasure.org","code":"{unit}"}}}}"#
    );
    serde_json::from_str(&text).expect("valid JSON")
}
