//! An SMTP client that knows how far a message got.
//!
//! lettre's transport answers a send with one error whatever the phase, so
//! a connection lost before `MAIL FROM` (nothing sent: safe to retry) and
//! one lost after the message's final dot (the server may have taken it: a
//! retry can deliver it twice) look the same. This client drives lettre's
//! `AsyncSmtpConnection` command by command and says which it was
//! ([`SmtpFailure::NotSent`] or [`SmtpFailure::Unknown`]), keeps a pool of
//! open connections, and sets `TCP_NODELAY` (lettre writes the final
//! `.\r\n` as its own small segment, which Nagle's algorithm holds until
//! the server's delayed ACK, about 40 ms a message).

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use tokio::time::{timeout_at, Instant};

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// No TLS (`smtp://`): a relay on a trusted network only.
    Plain,
    /// STARTTLS when the server offers it (`smtp://...?tls=opportunistic`).
    StartTlsOpportunistic,
    /// STARTTLS or no connection (`smtp://...?tls=required`).
    StartTlsRequired,
    /// TLS from the first byte (`smtps://`).
    Implicit,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub credentials: Option<(String, String)>,
}

impl SmtpTarget {
    /// `smtp://[USER:PASS@]HOST[:PORT][?tls=required|opportunistic]` or
    /// `smtps://[USER:PASS@]HOST[:PORT]`; ports default to 25 and 465.
    pub fn parse(s: &str) -> Result<SmtpTarget, String> {
        let u = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let mut tls = None;
        for (k, v) in u.query_pairs() {
            if k != "tls" {
                return Err(format!(
                    "unknown parameter {k:?} (only tls=required|opportunistic)"
                ));
            }
            if tls.replace(v.into_owned()).is_some() {
                return Err("tls= given twice".into());
            }
        }
        if !matches!(u.path(), "" | "/") {
            return Err(format!("a path ({:?}) means nothing here", u.path()));
        }
        if u.port() == Some(0) {
            return Err("port 0".into());
        }
        let security = match (u.scheme(), tls.as_deref()) {
            ("smtp", None) => Security::Plain,
            ("smtp", Some("required")) => Security::StartTlsRequired,
            ("smtp", Some("opportunistic")) => Security::StartTlsOpportunistic,
            ("smtp", Some(t)) => return Err(format!("tls={t}: required or opportunistic")),
            ("smtps", None) => Security::Implicit,
            ("smtps", Some(_)) => return Err("smtps is TLS already: no tls= parameter".into()),
            (other, _) => return Err(format!("scheme {other}: smtp or smtps")),
        };
        let port = u.port().unwrap_or(match security {
            Security::Implicit => 465,
            _ => 25,
        });
        let credentials = if u.username().is_empty() {
            if u.password().is_some() {
                return Err("a password without a user".into());
            }
            None
        } else {
            let dec = |p: &str| {
                percent_decode(p).ok_or_else(|| "credentials: bad percent-encoding".to_string())
            };
            Some((dec(u.username())?, dec(u.password().unwrap_or_default())?))
        };
        // Opportunistic STARTTLS is left out too: whoever strips the
        // server's STARTTLS offer would get the password in clear.
        if credentials.is_some()
            && matches!(security, Security::Plain | Security::StartTlsOpportunistic)
        {
            return Err(
                "credentials over a connection that may be unencrypted: use smtps:// or ?tls=required"
                    .into(),
            );
        }
        Ok(SmtpTarget {
            host,
            port,
            security,
            credentials,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a message was not (known to be) taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmtpFailure {
    /// The server did not take it: no connection, or a refusal (`code`)
    /// before or at the end of the message. Sending again cannot make a
    /// second copy.
    NotSent { code: Option<u16>, reason: String },
    /// The whole message was written and no answer came (timeout, lost
    /// connection): the server may have taken it.
    Unknown { reason: String },
}

/// A pool of SMTP connections to one server.
pub struct SmtpPool {
    target: SmtpTarget,
    tls: Option<TlsParameters>,
    hello: ClientId,
    idle: std::sync::Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    max_idle: usize,
    /// An idle connection older than this is closed, not reused (servers
    /// drop idle clients after a few minutes).
    idle_timeout: Duration,
}

impl SmtpPool {
    pub fn new(target: SmtpTarget, max_idle: usize) -> Result<SmtpPool, String> {
        let tls = match target.security {
            Security::Plain => None,
            _ => Some(
                TlsParameters::new(target.host.clone())
                    .map_err(|e| format!("TLS parameters for {}: {e}", target.host))?,
            ),
        };
        Ok(SmtpPool {
            target,
            tls,
            hello: ClientId::default(),
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
            idle_timeout: Duration::from_secs(60),
        })
    }

    /// Sends `message` (the formatted bytes) to `envelope`'s recipients,
    /// all of it within `timeout`.
    pub async fn send(
        &self,
        envelope: &Envelope,
        message: &[u8],
        timeout: Duration,
    ) -> Result<(), SmtpFailure> {
        let deadline = Instant::now() + timeout;
        let late = |phase: &str| SmtpFailure::NotSent {
            code: None,
            reason: format!("SMTP timeout ({phase})"),
        };
        // A pooled connection the server has closed fails at MAIL with no
        // reply; nothing was taken, so one fresh connection is tried.
        let mut conn = match self.take_idle() {
            Some(mut c) => match timeout_at(deadline, transaction(&mut c, envelope, message)).await
            {
                Ok(Ok(())) => c,
                // A pooled connection the server is closing answers its
                // 421 to our MAIL: nothing was taken, try a fresh one.
                Ok(Err(Phase::Refused(SmtpFailure::NotSent {
                    code: Some(421), ..
                })))
                | Ok(Err(Phase::Broken(_))) => self.fresh(deadline, envelope, message).await?,
                // Dropped, not QUIT: a refusing server gets no more waits.
                Ok(Err(Phase::Refused(f))) => return Err(f),
                Err(_) => return Err(late("envelope")),
            },
            None => self.fresh(deadline, envelope, message).await?,
        };
        match timeout_at(deadline, conn.message(message)).await {
            Ok(Ok(_)) => {
                self.put_back(conn);
                Ok(())
            }
            Ok(Err(e)) => match e.status() {
                Some(code) => {
                    drop(conn);
                    Err(SmtpFailure::NotSent {
                        code: code.to_string().parse().ok(),
                        reason: e.to_string(),
                    })
                }
                None => Err(SmtpFailure::Unknown {
                    reason: format!("SMTP connection lost after the message: {e}"),
                }),
            },
            Err(_) => Err(SmtpFailure::Unknown {
                reason: "SMTP timeout after the message was written".into(),
            }),
        }
    }

    /// A new connection with the envelope sent on it.
    async fn fresh(
        &self,
        deadline: Instant,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<AsyncSmtpConnection, SmtpFailure> {
        let work = async {
            let mut c = self.connect().await?;
            match transaction(&mut c, envelope, message).await {
                Ok(()) => Ok(c),
                Err(Phase::Refused(f) | Phase::Broken(f)) => Err(f),
            }
        };
        timeout_at(deadline, work).await.unwrap_or_else(|_| {
            Err(SmtpFailure::NotSent {
                code: None,
                reason: "SMTP timeout (connecting)".into(),
            })
        })
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SmtpFailure> {
        let t = &self.target;
        let failed = |what: &str, e: &dyn std::fmt::Display| SmtpFailure::NotSent {
            code: None,
            reason: format!("SMTP {what} {}:{}: {e}", t.host, t.port),
        };
        let mut conn = if t.security == Security::Implicit {
            // lettre's own connect does the TLS handshake before EHLO (no
            // TCP_NODELAY on this path; TLS records are written whole).
            AsyncSmtpConnection::connect_tokio1(
                (t.host.as_str(), t.port),
                None,
                &self.hello,
                self.tls.clone(),
                None,
            )
            .await
            .map_err(|e| failed("connect", &e))?
        } else {
            let stream = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
                .await
                .map_err(|e| failed("connect", &e))?;
            stream
                .set_nodelay(true)
                .map_err(|e| failed("connect", &e))?;
            let mut c = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                .await
                .map_err(|e| failed("greeting", &e))?;
            let starttls = match t.security {
                Security::StartTlsRequired => true,
                Security::StartTlsOpportunistic => c.can_starttls(),
                _ => false,
            };
            if starttls {
                if !c.can_starttls() {
                    return Err(failed("STARTTLS", &"not offered by the server"));
                }
                if let Some(tls) = &self.tls {
                    c.starttls(tls.clone(), &self.hello)
                        .await
                        .map_err(|e| failed("STARTTLS", &e))?;
                }
            }
            c
        };
        if let Some((user, pass)) = &t.credentials {
            if !conn.is_encrypted() {
                return Err(failed("AUTH", &"refused: the connection is not encrypted"));
            }
            let creds = Credentials::new(user.clone(), pass.clone());
            conn.auth(&[Mechanism::Plain, Mechanism::Login], &creds)
                .await
                .map_err(|e| match e.status() {
                    Some(code) => SmtpFailure::NotSent {
                        code: code.to_string().parse().ok(),
                        reason: format!("SMTP AUTH: {e}"),
                    },
                    None => failed("AUTH", &e),
                })?;
        }
        Ok(conn)
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((c, since)) = idle.pop() {
            if since.elapsed() < self.idle_timeout && !c.has_broken() {
                return Some(c);
            }
        }
        None
    }

    fn put_back(&self, c: AsyncSmtpConnection) {
        if c.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push((c, Instant::now()));
        }
    }
}

/// How the envelope phase failed.
enum Phase {
    /// The server answered no.
    Refused(SmtpFailure),
    /// No answer (the connection is gone).
    Broken(SmtpFailure),
}

/// MAIL FROM, RCPT TO for each recipient, DATA: nothing is taken yet.
/// Non-ASCII addresses need the server's SMTPUTF8, a non-ASCII message its
/// 8BITMIME (RFC 6531, RFC 6152); without them the message is refused
/// here, before anything is sent.
async fn transaction(
    c: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    message: &[u8],
) -> Result<(), Phase> {
    let refuse = |reason: &str| {
        Phase::Refused(SmtpFailure::NotSent {
            code: Some(554),
            reason: reason.into(),
        })
    };
    let mut params = Vec::new();
    let non_ascii = |a: &lettre::Address| !AsRef::<str>::as_ref(a).is_ascii();
    if envelope.from().is_some_and(non_ascii) || envelope.to().iter().any(non_ascii) {
        if !c.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(refuse("a non-ASCII address and a server without SMTPUTF8"));
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    if !message.is_ascii() {
        if !c.server_info().supports_feature(Extension::EightBitMime) {
            return Err(refuse("a non-ASCII message and a server without 8BITMIME"));
        }
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let phase = |e: lettre::transport::smtp::Error, what: &str| match e.status() {
        Some(code) => Phase::Refused(SmtpFailure::NotSent {
            code: code.to_string().parse().ok(),
            reason: e.to_string(),
        }),
        None => Phase::Broken(SmtpFailure::NotSent {
            code: None,
            reason: format!("SMTP connection ({what}): {e}"),
        }),
    };
    // lettre takes any positive reply as success; MAIL and RCPT need a 2xx
    // and DATA a 354, or the message's lines would be read as commands.
    let expect = |r: lettre::transport::smtp::response::Response, want: &str, what: &str| {
        let code = r.code().to_string();
        if code.starts_with(want) {
            Ok(())
        } else {
            Err(Phase::Refused(SmtpFailure::NotSent {
                code: code.parse().ok(),
                reason: format!("SMTP {what}: unexpected reply {code}"),
            }))
        }
    };
    let r = c
        .command(Mail::new(envelope.from().cloned(), params))
        .await
        .map_err(|e| phase(e, "MAIL"))?;
    expect(r, "2", "MAIL")?;
    for to in envelope.to() {
        let r = c
            .command(Rcpt::new(to.clone(), vec![]))
            .await
            .map_err(|e| phase(e, "RCPT"))?;
        expect(r, "2", "RCPT")?;
    }
    let r = c.command(Data).await.map_err(|e| phase(e, "DATA"))?;
    expect(r, "354", "DATA")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_security_and_credentials() {
        let t = SmtpTarget::parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.security),
            ("127.0.0.1", 2525, Security::Plain)
        );
        assert!(t.credentials.is_none());
        let t = SmtpTarget::parse("smtps://u%40x:p%3Aw@mail.example.org").unwrap();
        assert_eq!((t.port, t.security), (465, Security::Implicit));
        assert_eq!(t.credentials, Some(("u@x".into(), "p:w".into())));
        let t = SmtpTarget::parse("smtp://relay:587?tls=required").unwrap();
        assert_eq!(t.security, Security::StartTlsRequired);
        let t = SmtpTarget::parse("smtp://[::1]:25?tls=opportunistic").unwrap();
        assert_eq!(
            (t.host.as_str(), t.security),
            ("::1", Security::StartTlsOpportunistic)
        );
    }

    #[test]
    fn unsafe_or_unknown_urls_are_refused() {
        for (url, why) in [
            ("smtp://u:p@relay", "unencrypted"),
            ("smtp://u:p@relay?tls=opportunistic", "unencrypted"),
            ("smtp://relay?tsl=required", "unknown parameter"),
            ("smtp://relay?tls=required&tls=required", "twice"),
            ("smtp://relay/x", "path"),
            ("smtp://relay:0", "port 0"),
            ("smtps://u:%+F@relay", "percent"),
            ("smtp://relay?tls=maybe", "tls=maybe"),
            ("smtps://relay?tls=required", "TLS already"),
            ("http://relay", "scheme http"),
            ("smtp://", "no host"),
            ("not a url", "not a URL"),
        ] {
            let e = SmtpTarget::parse(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    proptest::proptest! {
        /// Total: any text is a target or a reason, never a panic; and
        /// what is accepted never carries credentials over plain text.
        #[test]
        fn any_text_parses_or_is_refused(s in "\\PC{0,80}", tail in "[a-z0-9%:@/?=&.\\[\\]+-]{0,40}") {
            for url in [s.clone(), format!("smtp://{tail}"), format!("smtps://{tail}")] {
                if let Ok(t) = SmtpTarget::parse(&url) {
                    proptest::prop_assert!(!t.host.is_empty());
                    proptest::prop_assert!(t.port != 0);
                    if t.credentials.is_some() {
                        proptest::prop_assert!(matches!(
                            t.security,
                            Security::StartTlsRequired | Security::Implicit
                        ));
                    }
                }
            }
        }
    }
}
