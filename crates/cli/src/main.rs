//! `clinflow`: the server and its administration commands.
//!
//! Thin by design: parses the command line, starts telemetry and calls the
//! library. Every command that touches the store takes `--database` (or
//! `CLINFLOW_DATABASE`) and creates and migrates the database if needed, so
//! it works on the same database as a running server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use clinflow_server::auth::{create_token, Role};
use clinflow_server::{Application, Config};
use clinflow_store::{AuditRecord, DatabaseUrl, Store};

mod campaign;
mod config_file;
mod history_args;
mod imaging_args;
mod ingest;
mod notify_args;

/// The server allocates and frees many small objects per request (JSON
/// trees of Bundles, index rows, response entries) on several threads;
/// glibc's allocator showed in profiles (malloc_consolidate, unlink_chunk).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The reference trial, built in, for `serve --demo`.
const DEMO_PROTOCOL: &str = include_str!("../../../reference-trial/protocol.yaml");
const DEMO_SUBJECTS: &str = include_str!("../../../reference-trial/subjects.csv");

#[derive(Parser)]
#[command(
    name = "clinflow",
    version,
    about = "clinflow: a clinical data platform"
)]
struct Cli {
    /// Where the data lives: sqlite://PATH or postgres://USER@HOST:PORT/DB.
    /// Default: sqlite://DATA_DIR/clinflow.db.
    #[arg(long, global = true, env = "CLINFLOW_DATABASE")]
    database: Option<String>,
    /// The data directory (the SQLite file and other local state).
    #[arg(long, global = true, env = "CLINFLOW_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// A TOML file of settings named like the flags (`smtp-url = "..."`),
    /// for every flag that has an environment variable; a flag wins over
    /// the environment, which wins over the file.
    #[arg(long, global = true, env = "CLINFLOW_CONFIG", value_name = "FILE.toml")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Loads the reference trial CARDIO-01 with a synthetic data set
        /// (several hundred subjects and their visits, results, wearable
        /// readings, diaries, adverse events and bills; seeded) and prints an
        /// admin token.
        #[arg(long)]
        demo: bool,
        /// The seed of the demo data set.
        #[arg(long, default_value_t = 2026)]
        demo_seed: u64,
        /// How often the site registry is rebuilt from the database, in
        /// seconds (it also is after every write through this server and,
        /// on PostgreSQL, on another node's change).
        #[arg(long, default_value_t = 600)]
        sites_refresh: u64,
        /// How long a checked token is trusted without reading the
        /// database, in milliseconds: the longest a token revoked elsewhere
        /// keeps working here (0: read on every request).
        #[arg(long, default_value_t = 5000)]
        token_cache_ttl: u64,
        /// Each dashboard section's deadline, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        dashboard_section_timeout: u64,
        /// Fault injection for tests and benchmarks: SECTION=MS delays a
        /// dashboard section (`all` for every section). Repeatable.
        #[arg(long, value_name = "SECTION=MS")]
        dashboard_section_delay: Vec<String>,
        /// Accepted as an admin token.
        #[arg(long, env = "CLINFLOW_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Per-request deadline, in seconds.
        #[arg(long, default_value_t = 30)]
        request_timeout: u64,
        /// Largest request body, in bytes.
        #[arg(long, default_value_t = 32 * 1024 * 1024)]
        body_limit: usize,
        /// Largest number of entries in one Bundle.
        #[arg(long, default_value_t = 10_000)]
        max_bundle_entries: usize,
        /// Requests served at once before answering 503.
        #[arg(long, default_value_t = 2048)]
        max_in_flight: usize,
        /// Ingest `map` stage workers: parse, map to FHIR and edit checks,
        /// one batch at a time each.
        #[arg(long, default_value_t = 2)]
        ingest_map_workers: usize,
        /// Ingest `persist` stage workers: store a mapped batch's items,
        /// one batch at a time each (mostly waiting for the store, so more
        /// than the cores).
        #[arg(long, default_value_t = 4)]
        ingest_persist_workers: usize,
        /// Accepted ingest batches that may wait for a `map` worker before
        /// the ingest endpoints answer 429 (0 counts as 1).
        #[arg(long, default_value_t = 64)]
        ingest_queue: usize,
        /// Mapped batches that may wait for a `persist` worker before the
        /// `map` workers wait (0 counts as 1).
        #[arg(long, default_value_t = 4)]
        ingest_mapped_queue: usize,
        /// Also listen for HL7 v2 over MLLP on ADDR (off unless set). MLLP
        /// has no authentication: bind a trusted interface or firewall it.
        #[arg(long, value_name = "ADDR")]
        mllp_listen: Option<SocketAddr>,
        #[command(flatten)]
        notify: Box<notify_args::NotifyArgs>,
        #[command(flatten)]
        history: Box<history_args::HistoryArgs>,
        #[command(flatten)]
        imaging: Box<imaging_args::ImagingArgs>,
    },
    /// The records service of patient histories (gRPC), as its own process.
    Records {
        #[command(subcommand)]
        command: history_args::ServiceCommand,
    },
    /// The billing service of patient histories (gRPC), as its own process.
    Billing {
        #[command(subcommand)]
        command: history_args::ServiceCommand,
    },
    /// Practitioners (the recipients of campaigns).
    Practitioners {
        #[command(subcommand)]
        command: PractitionersCommand,
    },
    /// Notification campaigns.
    Campaign {
        #[command(subcommand)]
        command: CampaignCommand,
    },
    /// Creates or migrates the database.
    Migrate,
    /// Trial set-up.
    Trial {
        #[command(subcommand)]
        command: TrialCommand,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Sends files to a running server's ingest pipeline and waits until
    /// each is processed: a progress bar on stderr, every rejection and a
    /// summary on stdout. Exits 0 when everything was stored, 1 when an
    /// item was rejected or an input not accepted, 2 on other errors.
    Ingest {
        #[arg(long, value_enum)]
        format: ingest::Format,
        /// Files, directories (every file under them) or `-` for stdin;
        /// each is one batch.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// The server's base URL.
        #[arg(long, env = "CLINFLOW_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// An interface, data-manager or admin token.
        #[arg(
            long,
            env = "CLINFLOW_TOKEN",
            hide_env_values = true,
            default_value = ""
        )]
        token: String,
        /// Inputs sent at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Timeout of each HTTP request, in seconds.
        #[arg(long, default_value_t = 60)]
        request_timeout: u64,
        /// How long to wait for a batch to be processed, in seconds.
        #[arg(long, default_value_t = 600)]
        wait_timeout: u64,
        /// Times a 429 or 503 is retried (after its Retry-After).
        #[arg(long, default_value_t = 20)]
        max_retries: u32,
    },
}

#[derive(Subcommand)]
enum TrialCommand {
    /// Creates or amends a trial from its protocol file (and enrols subjects).
    Load {
        protocol: PathBuf,
        #[arg(long)]
        subjects: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PractitionersCommand {
    /// Loads practitioners from a CSV file with the columns
    /// id,family,given,email,phone,site,specialty (idempotent: rows that
    /// did not change are not written again).
    Load { file: PathBuf },
}

#[derive(Subcommand)]
enum CampaignCommand {
    /// Creates a campaign from a TOML file (the POST /campaigns body) and
    /// follows it to the end. Exits 0 when nothing failed.
    Send {
        file: PathBuf,
        /// The server's base URL.
        #[arg(long, env = "CLINFLOW_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// A data-manager or admin token.
        #[arg(
            long,
            env = "CLINFLOW_TOKEN",
            hide_env_values = true,
            default_value = ""
        )]
        token: String,
        /// How long to follow it, in seconds.
        #[arg(long, default_value_t = 3600)]
        wait_timeout: u64,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Creates a token and prints it (only it) on stdout, once.
    Create {
        #[arg(long)]
        role: String,
        #[arg(long)]
        site: Option<String>,
        /// The subject id, for a patient token.
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Days until it expires.
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Lists tokens (never their secrets).
    List,
    /// Revokes a token by its id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Checks the hash chain; exits 1 and says where when it is broken.
    Verify,
}

fn init_tracing(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Dependencies that log the data they carry at debug level (the
    // PostgreSQL driver logs bound query parameters: patient ids) are held
    // at info whatever RUST_LOG says: no patient identifier in a log line.
    for quiet in [
        "tokio_postgres=info",
        "postgres_protocol=info",
        "rusqlite=info",
    ] {
        if let Ok(d) = quiet.parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn database_url(cli: &Cli) -> anyhow::Result<DatabaseUrl> {
    match &cli.database {
        Some(u) => u.parse().map_err(|e: String| anyhow::anyhow!(e)),
        None => Ok(DatabaseUrl::Sqlite(cli.data_dir.join("clinflow.db"))),
    }
}

fn cli_actor(action: &str) -> AuditRecord {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    AuditRecord {
        time: clinflow_store::now_millis(),
        actor: format!("cli:{user}"),
        role: "admin".into(),
        action: action.into(),
        outcome: "success".into(),
        ..Default::default()
    }
}

/// Resolves on SIGTERM or ctrl-c. The handlers are installed here, before
/// the server serves its first request: installed lazily (on first poll of
/// the shutdown future), a SIGTERM arriving in between would kill the
/// process with the default action instead of draining requests.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        )
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested: finishing requests in flight");
    })
}

async fn load_trial_text(
    store: &Store,
    protocol: &str,
    subjects: Option<&str>,
) -> anyhow::Result<clinflow_server::trials::LoadReport> {
    let protocol = clinflow_protocol::parse_yaml(protocol).map_err(|e| anyhow::anyhow!("{e}"))?;
    let subjects = match subjects {
        Some(s) => clinflow_protocol::parse_subjects_csv(s, &protocol)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Vec::new(),
    };
    Ok(clinflow_server::trials::load(store, &protocol, &subjects, cli_actor("trial-load")).await?)
}

/// `clinflow records serve` / `clinflow billing serve`.
async fn serve_history_service(
    url: &clinflow_store::DatabaseUrl,
    command: history_args::ServiceCommand,
    which: clinflow_history::service::Which,
) -> anyhow::Result<()> {
    let history_args::ServiceCommand::Serve {
        listen,
        service_token,
        fault_latency,
    } = command;
    if service_token.is_empty() {
        anyhow::bail!("--service-token (CLINFLOW_SERVICE_TOKEN) must not be empty");
    }
    let shutdown = shutdown_signal()?;
    let store = Store::open(url).await?;
    let ctx = clinflow_history::service::ServiceContext::new(
        store.clone(),
        &service_token,
        clinflow_history::service::Faults {
            latency: Duration::from_millis(fault_latency),
        },
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let name = match which {
        clinflow_history::service::Which::Records => "records",
        clinflow_history::service::Which::Billing => "billing",
    };
    // The first line is the address (port 0 picks one: tests read it).
    println!("clinflow {name} service listening on http://{addr}");
    tracing::info!(%addr, service = name, "serving");
    clinflow_history::service::serve(listener, ctx, vec![which], true, shutdown).await?;
    store.flush().await?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let url = database_url(&cli)?;
    match cli.command {
        Command::Serve {
            listen,
            demo,
            demo_seed,
            sites_refresh,
            token_cache_ttl,
            dashboard_section_timeout,
            dashboard_section_delay,
            admin_token,
            request_timeout,
            body_limit,
            max_bundle_entries,
            max_in_flight,
            ingest_map_workers,
            ingest_persist_workers,
            ingest_queue,
            ingest_mapped_queue,
            mllp_listen,
            notify,
            history,
            imaging,
        } => {
            let mut config = Config::new(url.clone());
            config.imaging = imaging.config(&cli.data_dir)?;
            config.notify = notify.config();
            config.history = history.config()?;
            config.listen = listen;
            config.admin_token = admin_token.filter(|t| !t.is_empty());
            config.request_timeout = Duration::from_secs(request_timeout);
            config.body_limit = body_limit;
            config.max_bundle_entries = max_bundle_entries;
            config.max_in_flight = max_in_flight;
            config.ingest_map_workers = ingest_map_workers;
            config.ingest_persist_workers = ingest_persist_workers;
            config.ingest_queue = ingest_queue;
            config.ingest_mapped_queue = ingest_mapped_queue;
            config.mllp_listen = mllp_listen;
            // Bounded, so that deadlines computed from them cannot overflow.
            config.sites_refresh = Duration::from_secs(sites_refresh.clamp(1, 7 * 86_400));
            config.token_cache_ttl = Duration::from_millis(token_cache_ttl.min(3_600_000));
            config.dashboard_section_timeout = Duration::from_millis(dashboard_section_timeout);
            for d in &dashboard_section_delay {
                let (name, ms) = d
                    .split_once('=')
                    .and_then(|(n, ms)| Some((n, ms.parse::<u64>().ok()?)))
                    .ok_or_else(|| {
                        anyhow::anyhow!("--dashboard-section-delay {d:?}: use SECTION=MS")
                    })?;
                let names: Vec<&str> = if name == "all" {
                    clinflow_server::dashboard::SECTIONS.to_vec()
                } else if clinflow_server::dashboard::SECTIONS.contains(&name) {
                    vec![name]
                } else {
                    anyhow::bail!(
                        "--dashboard-section-delay: no section {name:?}; the sections are {}",
                        clinflow_server::dashboard::SECTIONS.join(", ")
                    );
                };
                for n in names {
                    config
                        .dashboard_section_delay
                        .insert(n.to_string(), Duration::from_millis(ms));
                }
            }
            let shutdown = shutdown_signal()?;
            let app = Application::build(config).await?;
            let addr = app.local_addr()?;
            if demo {
                let store = &app.state().store;
                let report = clinflow_server::demo::load_demo(
                    app.state(),
                    DEMO_PROTOCOL,
                    DEMO_SUBJECTS,
                    demo_seed,
                    Default::default(),
                )
                .await?;
                let token = create_token(
                    store,
                    "demo-admin",
                    Role::Admin,
                    None,
                    None,
                    None,
                    "serve --demo",
                )
                .await?;
                println!(
                    "clinflow demo: trial {} v{} loaded: {} synthetic subjects, {} resources, {} data queries",
                    report.trial.trial,
                    report.trial.version,
                    report.subjects,
                    report.resources,
                    report.data_queries
                );
                println!("admin token (shown once): {token}");
            }
            println!("clinflow listening on http://{addr} (FHIR base http://{addr}/fhir)");
            if let Some(mllp) = app.mllp_local_addr() {
                let mllp = mllp?;
                println!("clinflow listening for HL7 v2 over MLLP on {mllp}");
                tracing::info!(%mllp, "MLLP listener bound");
            }
            if let Some(dicom) = app.dicom_local_addr() {
                let dicom = dicom?;
                println!(
                    "clinflow listening for DICOM (C-STORE, C-ECHO) on {dicom} as AE {}",
                    app.state().config.imaging.dicom_ae
                );
                tracing::info!(%dicom, "DICOM listener bound");
            }
            tracing::info!(%addr, engine = app.state().store.engine(), "serving");
            app.run_until_stopped(shutdown).await?;
        }
        Command::Records { command } => {
            serve_history_service(&url, command, clinflow_history::service::Which::Records).await?;
        }
        Command::Billing { command } => {
            serve_history_service(&url, command, clinflow_history::service::Which::Billing).await?;
        }
        Command::Practitioners {
            command: PractitionersCommand::Load { file },
        } => {
            let store = Store::open(&url).await?;
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let rows = clinflow_server::campaigns::practitioners::parse_csv(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let report = clinflow_server::campaigns::practitioners::load(
                &store,
                &rows,
                cli_actor("practitioners-load"),
            )
            .await?;
            store.flush().await?;
            println!(
                "{} practitioners: {} resources created, {} updated, {} unchanged",
                rows.len(),
                report.created,
                report.updated,
                report.unchanged
            );
        }
        Command::Campaign {
            command:
                CampaignCommand::Send {
                    file,
                    server,
                    token,
                    wait_timeout,
                },
        } => {
            let ok =
                campaign::send(&file, &server, &token, Duration::from_secs(wait_timeout)).await?;
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Command::Migrate => {
            let store = Store::open(&url).await?;
            store.flush().await?;
            eprintln!("database is at the current schema");
        }
        Command::Trial {
            command: TrialCommand::Load { protocol, subjects },
        } => {
            let store = Store::open(&url).await?;
            let p = std::fs::read_to_string(&protocol)
                .with_context(|| format!("reading {}", protocol.display()))?;
            let s = match &subjects {
                Some(s) => Some(
                    std::fs::read_to_string(s)
                        .with_context(|| format!("reading {}", s.display()))?,
                ),
                None => None,
            };
            let report = load_trial_text(&store, &p, s.as_deref())
                .await
                .with_context(|| format!("loading {}", protocol.display()))?;
            store.flush().await?;
            println!(
                "trial {} version {}{}: {} created, {} updated, {} unchanged",
                report.trial,
                report.version,
                if report.new_version {
                    " (new version)"
                } else {
                    ""
                },
                report.created,
                report.updated,
                report.unchanged
            );
        }
        Command::Token { command } => {
            let store = Store::open(&url).await?;
            match command {
                TokenCommand::Create {
                    role,
                    site,
                    patient,
                    name,
                    expires_in_days,
                } => {
                    let role: Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
                    let name = name.unwrap_or_else(|| format!("{}-token", role.as_str()));
                    let expires = expires_in_days
                        .map(|d| clinflow_store::now_millis() + i64::from(d) * 86_400_000);
                    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
                    let token = create_token(
                        &store,
                        &name,
                        role,
                        site,
                        patient,
                        expires,
                        &format!("cli:{user}"),
                    )
                    .await?;
                    println!("{token}");
                }
                TokenCommand::List => {
                    for t in store.list_tokens().await? {
                        println!(
                            "{}\t{}\t{}\t{}\t{}",
                            t.id,
                            t.name,
                            t.role,
                            t.site.as_deref().unwrap_or("-"),
                            if t.revoked { "revoked" } else { "active" }
                        );
                    }
                }
                TokenCommand::Revoke { id } => {
                    let mut rec = cli_actor("token-revoke");
                    rec.detail = Some(format!("token {id}"));
                    if !store.revoke_token(&id, vec![rec]).await? {
                        eprintln!("no token with id {id}");
                        return Ok(ExitCode::from(2));
                    }
                    eprintln!("token {id} revoked");
                }
            }
            store.flush().await?;
        }
        Command::Ingest {
            format,
            inputs,
            server,
            token,
            concurrency,
            request_timeout,
            wait_timeout,
            max_retries,
        } => {
            let code = ingest::run(ingest::Options {
                format,
                inputs,
                server,
                token,
                concurrency,
                request_timeout: Duration::from_secs(request_timeout),
                wait_timeout: Duration::from_secs(wait_timeout),
                max_retries,
            })
            .await?;
            return Ok(ExitCode::from(code));
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let store = Store::open(&url).await?;
            match store.verify_audit().await? {
                Ok(n) => println!("audit trail intact: {n} records verified"),
                Err(b) => {
                    println!("audit trail BROKEN: {b}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Read before clap (and before any thread: it sets environment
    // variables), so the file's settings reach every flag's `env`.
    if let Some(path) = config_file::named(&args) {
        let mut known = config_file::env_flags(&<Cli as clap::CommandFactory>::command());
        known.remove("config");
        match config_file::read(&path, &known) {
            Ok(pairs) => {
                for (k, v) in pairs {
                    if std::env::var_os(&k).is_none() {
                        std::env::set_var(k, v);
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let cli = Cli::parse_from(args);
    init_tracing(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
