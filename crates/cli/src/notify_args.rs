//! `clinflow serve`'s notification options (flags; each also read from its
//! `CLINFLOW_...` environment variable).

use std::time::Duration;

use clinflow_server::campaigns::dispatch::ChannelLimits;
use clinflow_server::campaigns::NotifyConfig;

#[derive(clap::Args, Debug)]
pub struct NotifyArgs {
    /// The SMTP relay: smtp://HOST:PORT (plain), smtp://HOST:PORT?tls=required
    /// (STARTTLS), smtps://USER:PASS@HOST:PORT (implicit TLS). Unset: no e-mail.
    #[arg(long, env = "CLINFLOW_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// The From of every e-mail (its domain is the Message-ID's).
    #[arg(
        long,
        env = "CLINFLOW_SMTP_FROM",
        default_value = "clinflow <noreply@clinflow.invalid>"
    )]
    pub smtp_from: String,
    /// The SMS API's base URL (Twilio's REST shape). Unset: no SMS.
    #[arg(long, env = "CLINFLOW_SMS_BASE_URL")]
    pub sms_base_url: Option<String>,
    #[arg(long, env = "CLINFLOW_SMS_ACCOUNT_SID", default_value = "")]
    pub sms_account_sid: String,
    #[arg(
        long,
        env = "CLINFLOW_SMS_AUTH_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub sms_auth_token: String,
    /// The sending number (E.164) or messaging service sid (MG...).
    #[arg(long, env = "CLINFLOW_SMS_FROM", default_value = "")]
    pub sms_from: String,
    /// The URL recipients and the SMS provider reach this server at
    /// (unsubscribe links, status callbacks). Default: http://LISTEN.
    #[arg(long, env = "CLINFLOW_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// E-mails sent at once (and SMTP connections kept).
    #[arg(long, env = "CLINFLOW_EMAIL_CONCURRENCY", default_value_t = 16)]
    pub email_concurrency: usize,
    /// E-mails started per second at most.
    #[arg(long, env = "CLINFLOW_EMAIL_RATE", default_value_t = 200)]
    pub email_rate: u32,
    /// SMS requests in flight at most.
    #[arg(long, env = "CLINFLOW_SMS_CONCURRENCY", default_value_t = 16)]
    pub sms_concurrency: usize,
    /// SMS requests started per second at most.
    #[arg(long, env = "CLINFLOW_SMS_RATE", default_value_t = 100)]
    pub sms_rate: u32,
    /// One e-mail's deadline, in milliseconds.
    #[arg(long, env = "CLINFLOW_EMAIL_SEND_TIMEOUT", default_value_t = 30_000)]
    pub email_send_timeout: u64,
    /// One SMS request's deadline, in milliseconds.
    #[arg(long, env = "CLINFLOW_SMS_SEND_TIMEOUT", default_value_t = 15_000)]
    pub sms_send_timeout: u64,
    /// Sends of one delivery at most before it fails.
    #[arg(long, env = "CLINFLOW_NOTIFY_MAX_ATTEMPTS", default_value_t = 8)]
    pub notify_max_attempts: u32,
    /// The first retry's backoff, in milliseconds (doubling, with jitter).
    #[arg(long, env = "CLINFLOW_NOTIFY_RETRY_BASE", default_value_t = 1000)]
    pub notify_retry_base: u64,
    /// How often an idle delivery worker looks for due rows, in ms.
    #[arg(long, env = "CLINFLOW_NOTIFY_POLL", default_value_t = 500)]
    pub notify_poll: u64,
    /// Do not run delivery workers in this process (another node sends).
    #[arg(long, env = "CLINFLOW_NO_NOTIFY_WORKERS")]
    pub no_notify_workers: bool,
}

impl NotifyArgs {
    pub fn config(&self) -> NotifyConfig {
        let mut c = NotifyConfig {
            smtp_url: self.smtp_url.clone().filter(|s| !s.is_empty()),
            smtp_from: self.smtp_from.clone(),
            sms_base_url: self.sms_base_url.clone().filter(|s| !s.is_empty()),
            sms_account_sid: self.sms_account_sid.clone(),
            sms_auth_token: self.sms_auth_token.clone(),
            sms_from: self.sms_from.clone(),
            public_url: self.public_url.clone().filter(|s| !s.is_empty()),
            email: ChannelLimits {
                concurrency: self.email_concurrency.clamp(1, 1024),
                rate: self.email_rate.max(1),
                send_timeout: Duration::from_millis(self.email_send_timeout.clamp(100, 600_000)),
            },
            sms: ChannelLimits {
                concurrency: self.sms_concurrency.clamp(1, 1024),
                rate: self.sms_rate.max(1),
                send_timeout: Duration::from_millis(self.sms_send_timeout.clamp(100, 600_000)),
            },
            workers: !self.no_notify_workers,
            poll: Duration::from_millis(self.notify_poll.clamp(10, 60_000)),
            ..Default::default()
        };
        c.retry.max_attempts = self.notify_max_attempts.max(1);
        c.retry.base = Duration::from_millis(self.notify_retry_base.clamp(10, 600_000));
        c
    }
}
