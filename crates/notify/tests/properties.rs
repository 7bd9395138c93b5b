//! Every function of the crate is total: no panic on any input.

use clinflow_notify::{backoff, phone, sms, template, twilio};
use proptest::prelude::*;

proptest! {
    #[test]
    fn template_parse_and_render_never_panic(s in ".{0,200}") {
        if let Ok(t) = template::Template::parse(&s, &["a", "b.c"]) {
            let _ = t.render(&|_| Some("<x>".into()), template::Escape::Html);
        }
    }

    #[test]
    fn segments_never_panic(s in ".{0,400}") {
        prop_assert!(sms::segments(&s).segments >= 1);
    }

    #[test]
    fn e164_never_panics(s in ".{0,30}") {
        let _ = phone::e164(&s);
    }

    #[test]
    fn backoff_is_bounded(a in any::<u32>(), u in any::<f64>()) {
        let cap = std::time::Duration::from_secs(60);
        prop_assert!(backoff::backoff(a, std::time::Duration::from_secs(1), cap, u) <= cap);
    }

    #[test]
    fn signatures_verify_and_a_change_breaks_them(v in "[ -~]{0,40}", w in "[ -~]{0,40}") {
        let p = vec![("Body".to_string(), v.clone())];
        let sig = twilio::signature("token", "https://h/x", &p);
        prop_assert!(twilio::verify("token", "https://h/x", &p, &sig));
        if v != w {
            let q = vec![("Body".to_string(), w)];
            prop_assert!(!twilio::verify("token", "https://h/x", &q, &sig));
        }
    }
}
