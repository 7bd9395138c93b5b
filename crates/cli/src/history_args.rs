//! The patient history flags: the gateway's (`clinflow serve`) and the
//! services' own processes (`clinflow records serve`, `clinflow billing
//! serve`).

use std::net::SocketAddr;
use std::time::Duration;

use clinflow_server::history::HistoryConfig;

/// `clinflow serve`: where the history services are and how to call them.
#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// The records service (`clinflow records serve`), http://HOST:PORT;
    /// unset, it runs in this process behind its gRPC interface.
    #[arg(long, env = "CLINFLOW_RECORDS_URL", value_name = "URL")]
    records_url: Option<String>,
    /// The billing service (`clinflow billing serve`), http://HOST:PORT;
    /// unset, it runs in this process behind its gRPC interface.
    #[arg(long, env = "CLINFLOW_BILLING_URL", value_name = "URL")]
    billing_url: Option<String>,
    /// The secret the history services require (the same on both sides);
    /// needed with --records-url or --billing-url.
    #[arg(long, env = "CLINFLOW_SERVICE_TOKEN", hide_env_values = true)]
    service_token: Option<String>,
    /// A history's deadline in milliseconds when the caller's
    /// X-Request-Timeout asks for none or more.
    #[arg(long, env = "CLINFLOW_HISTORY_TIMEOUT", default_value_t = 5000)]
    history_timeout: u64,
    /// Histories served at once; more get 503 with Retry-After.
    #[arg(long, env = "CLINFLOW_HISTORY_MAX_IN_FLIGHT", default_value_t = 256)]
    history_max_in_flight: usize,
    /// The circuit breakers' window in milliseconds (adaptive throttling
    /// over what each service accepted lately); 0 turns them off.
    #[arg(long, env = "CLINFLOW_BREAKER_WINDOW", default_value_t = 10_000)]
    breaker_window: u64,
    /// Retries of a call that could not reach its service (each only
    /// while the deadline leaves time for it).
    #[arg(long, env = "CLINFLOW_HISTORY_RETRIES", default_value_t = 2)]
    history_retries: u32,
}

impl HistoryArgs {
    pub fn config(&self) -> anyhow::Result<HistoryConfig> {
        for (flag, url) in [
            ("--records-url", &self.records_url),
            ("--billing-url", &self.billing_url),
        ] {
            if let Some(u) = url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    anyhow::bail!("{flag} {u:?}: use http://HOST:PORT");
                }
            }
        }
        if self.history_timeout == 0 || self.history_timeout > 30_000 {
            // The services stop every call at 30 s (`MAX_DEADLINE`), and the
            // front door at --request-timeout (30 s).
            anyhow::bail!("--history-timeout: 1 to 30000 ms");
        }
        Ok(HistoryConfig {
            records_url: self.records_url.clone(),
            billing_url: self.billing_url.clone(),
            service_token: self.service_token.clone().filter(|t| !t.is_empty()),
            timeout: Duration::from_millis(self.history_timeout),
            max_in_flight: self.history_max_in_flight.max(1),
            breaker_window: Duration::from_millis(self.breaker_window.min(3_600_000)),
            max_retries: self.history_retries.min(5),
        })
    }
}

/// `clinflow records|billing serve`.
#[derive(clap::Subcommand, Debug)]
pub enum ServiceCommand {
    /// Serves the service over gRPC (HTTP/2 without TLS: run it on a
    /// trusted network), with /healthz and /metrics on the same port.
    Serve {
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// The secret callers must send (the gateway's --service-token).
        #[arg(long, env = "CLINFLOW_SERVICE_TOKEN", hide_env_values = true)]
        service_token: String,
        /// Fault injection for tests and benchmarks: every call waits this
        /// many milliseconds before its work (honouring its deadline and
        /// its caller going away, like real work).
        #[arg(long, default_value_t = 0)]
        fault_latency: u64,
    },
}
