//! `--config FILE.toml` (or `CLINFLOW_CONFIG`): settings in a file, under
//! the same names as the flags.
//!
//! ```toml
//! smtp-url = "smtp://relay.example.org:587?tls=required"
//! smtp-from = "CARDIO-01 <trials@example.org>"
//! email-rate = 50
//! ```
//!
//! A key is a long flag that also has an environment variable
//! (`smtp-url` is `--smtp-url` and `CLINFLOW_SMTP_URL`); the file fills in
//! the variables not already set, so a flag wins over the environment,
//! which wins over the file. An unknown key or a value that is not a text,
//! number or boolean is an error naming it and its line: a misspelt
//! setting must not be silently ignored.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The config file named on the command line (`--config PATH`,
/// `--config=PATH`) or by `CLINFLOW_CONFIG`.
pub fn named(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("CLINFLOW_CONFIG").map(PathBuf::from)
}

/// Every `(flag, env)` pair of the command and its subcommands.
pub fn env_flags(cmd: &clap::Command) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    collect(cmd, &mut out);
    out
}

fn collect(cmd: &clap::Command, out: &mut BTreeMap<String, String>) {
    for a in cmd.get_arguments() {
        if let (Some(long), Some(env)) = (a.get_long(), a.get_env()) {
            out.insert(long.to_string(), env.to_string_lossy().into_owned());
        }
    }
    for sub in cmd.get_subcommands() {
        collect(sub, out);
    }
}

/// The `(env, value)` pairs the file sets.
pub fn read(
    path: &Path,
    known: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    parse(&text, known).with_context(|| format!("config file {}", path.display()))
}

fn parse(text: &str, known: &BTreeMap<String, String>) -> anyhow::Result<Vec<(String, String)>> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| format!(" (line {})", line_of(text, s.start)))
            .unwrap_or_default();
        anyhow::anyhow!("{}{at}", e.message())
    })?;
    let mut out = Vec::new();
    for (key, value) in &doc {
        let line = text
            .find(key.as_str())
            .map(|at| line_of(text, at))
            .unwrap_or(0);
        let Some(env) = known.get(key) else {
            bail!(
                "line {line}: no setting {key:?} (settings: {})",
                known.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        let v = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!(
                "line {line}: {key} must be a text, number or boolean, not a {}",
                other.type_str()
            ),
        };
        out.push((env.clone(), v));
    }
    Ok(out)
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeMap<String, String> {
        [
            ("smtp-url", "CLINFLOW_SMTP_URL"),
            ("email-rate", "CLINFLOW_EMAIL_RATE"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn keys_become_their_environment_variables() {
        let got = parse("smtp-url = \"smtp://r:25\"\nemail-rate = 50\n", &known()).unwrap();
        assert_eq!(
            got,
            vec![
                ("CLINFLOW_EMAIL_RATE".to_string(), "50".to_string()),
                ("CLINFLOW_SMTP_URL".to_string(), "smtp://r:25".to_string()),
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_their_line() {
        let e = parse("email-rate = 5\nsmtp-ur = \"x\"\n", &known()).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("line 2") && e.contains("\"smtp-ur\""), "{e}");
        let e = format!("{:#}", parse("\n\nsmtp-url = [1]\n", &known()).unwrap_err());
        assert!(e.contains("line 3") && e.contains("array"), "{e}");
        let e = format!("{:#}", parse("smtp-url = \n", &known()).unwrap_err());
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn the_file_is_named_by_flag_or_environment() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            named(&args(&["clinflow", "--config", "a.toml", "serve"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            named(&args(&["clinflow", "serve", "--config=b.toml"])),
            Some(PathBuf::from("b.toml"))
        );
    }

    proptest::proptest! {
        /// Total: any text is settings or an error, never a panic.
        #[test]
        fn any_text_reads_or_is_refused(text in "\\PC{0,200}", lines in proptest::collection::vec("[a-z-]{1,12} ?= ?(\"[^\"\\\\]{0,10}\"|[0-9]{1,4}|true|\\[1\\]|\\{\\})", 0..6)) {
            let _ = parse(&text, &known());
            let doc = lines.join("\n");
            if let Ok(pairs) = parse(&doc, &known()) {
                for (env, _) in pairs {
                    proptest::prop_assert!(known().values().any(|v| *v == env));
                }
            }
        }
    }
}
