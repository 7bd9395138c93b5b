//! Message templates: literal text with `{{ name }}` placeholders, checked
//! against the names a campaign knows when the campaign is created.

use std::fmt;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

/// Why a template was refused, with the byte offset of its `{{`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    UnknownPlaceholder { name: String, offset: usize },
    Unclosed { offset: usize },
    BadName { offset: usize },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::UnknownPlaceholder { name, offset } => {
                write!(f, "unknown placeholder {{{{{name}}}}} at offset {offset}")
            }
            TemplateError::Unclosed { offset } => {
                write!(f, "a placeholder opened at offset {offset} is not closed with }}}}")
            }
            TemplateError::BadName { offset } => write!(
                f,
                "the placeholder at offset {offset} has no valid name (letters, digits, '_' and '.')"
            ),
        }
    }
}

impl std::error::Error for TemplateError {}

/// How substituted values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    None,
    /// `& < > " '` as HTML entities (values only, never the template).
    Html,
}

fn valid_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'.')
}

impl Template {
    /// Parses `src`; every placeholder must be one of `allowed`.
    pub fn parse(src: &str, allowed: &[&str]) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = src;
        let mut base = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let offset = base + open;
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or(TemplateError::Unclosed { offset })?;
            let name = after[..close].trim();
            if !valid_name(name) {
                return Err(TemplateError::BadName { offset });
            }
            if !allowed.contains(&name) {
                return Err(TemplateError::UnknownPlaceholder {
                    name: name.to_string(),
                    offset,
                });
            }
            parts.push(Part::Var(name.to_string()));
            let consumed = open + 2 + close + 2;
            base += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The placeholders used, in order.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The text with each placeholder replaced by `vars(name)` (empty when
    /// it gives `None`).
    pub fn render(&self, vars: &dyn Fn(&str) -> Option<String>, escape: Escape) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => {
                    let value = vars(v).unwrap_or_default();
                    match escape {
                        Escape::None => out.push_str(&value),
                        Escape::Html => {
                            for c in value.chars() {
                                match c {
                                    '&' => out.push_str("&amp;"),
                                    '<' => out.push_str("&lt;"),
                                    '>' => out.push_str("&gt;"),
                                    '"' => out.push_str("&quot;"),
                                    '\'' => out.push_str("&#39;"),
                                    c => out.push(c),
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOWED: &[&str] = &["practitioner.name", "site.name"];

    #[test]
    fn placeholders_are_substituted_and_html_escaped_in_values_only() {
        let t = Template::parse(
            "<b>Dear {{ practitioner.name }}</b>, {{site.name}}",
            ALLOWED,
        )
        .unwrap();
        let vars = |k: &str| match k {
            "practitioner.name" => Some("A & <B>".to_string()),
            _ => None,
        };
        assert_eq!(
            t.render(&vars, Escape::Html),
            "<b>Dear A &amp; &lt;B&gt;</b>, "
        );
        assert_eq!(t.render(&vars, Escape::None), "<b>Dear A & <B></b>, ");
        assert_eq!(
            t.placeholders().collect::<Vec<_>>(),
            ["practitioner.name", "site.name"]
        );
    }

    #[test]
    fn errors_name_the_placeholder_and_its_offset() {
        assert_eq!(
            Template::parse("Hi {{patient.name}}", ALLOWED),
            Err(TemplateError::UnknownPlaceholder {
                name: "patient.name".into(),
                offset: 3
            })
        );
        assert_eq!(
            Template::parse("ok {{site.name}} {{x", ALLOWED),
            Err(TemplateError::Unclosed { offset: 17 })
        );
        assert_eq!(
            Template::parse("{{ }}", ALLOWED),
            Err(TemplateError::BadName { offset: 0 })
        );
        assert!(Template::parse("a single { or } is text", ALLOWED).is_ok());
    }
}
