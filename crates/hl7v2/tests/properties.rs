//! Property tests through the public surface: the parser is total, and
//! generated messages round-trip their values through `escape`, splitting,
//! parsing and `decoded()`.

use clinflow_hl7v2::{
    build_ack, build_reject_ack_without_message, escape, parse_dtm, salvage_control_id,
    split_messages, AckCode, AckError, Charset, Delimiters, Message, OruR01, PieceKind, Severity,
};
use proptest::prelude::*;

const SAMPLE: &[u8] = include_bytes!("../../../reference-trial/samples/lab-results.hl7");

/// Touches every value of every piece of `input`, the way the pipeline and
/// the fuzz target do; must never panic.
fn exercise(input: &[u8]) {
    let _ = salvage_control_id(input);
    let now = parse_dtm("20260302101500+0100").unwrap();
    for piece in split_messages(input) {
        let bytes = piece.bytes(input);
        match piece.parse(input) {
            Ok(m) => {
                for seg in m.segments() {
                    let _ = seg.field(usize::MAX);
                    for f in seg.fields() {
                        let _ = f.decode_detailed();
                        for r in f.repetitions() {
                            let _ = r.decoded();
                            for c in r.components() {
                                let _ = c.decoded();
                                for s in c.subcomponents() {
                                    let _ = s.decode_detailed();
                                }
                            }
                        }
                    }
                }
                let errors: Vec<AckError> = match OruR01::read(&m) {
                    Ok(oru) => oru
                        .observations()
                        .filter_map(|(_, _, o)| o.obx.as_ref().err())
                        .chain(oru.issues.iter())
                        .map(|e| e.ack_error(Severity::Warning))
                        .collect(),
                    Err(e) => vec![e.ack_error(Severity::Error)],
                };
                let ack = build_ack(&m, AckCode::Error, &errors, &now, "ACK-1");
                let parsed = Message::parse(&ack).expect("an ACK parses");
                assert_eq!(parsed.msh().message_type().code, "ACK");
            }
            Err(e) => {
                assert!(e.location().offset <= input.len(), "{e}");
                let id = salvage_control_id(bytes);
                let ack = build_reject_ack_without_message(
                    id.as_deref(),
                    &[AckError::from_parse_error(&e)],
                    &now,
                    "R-1",
                );
                Message::parse(&ack).expect("a reject ACK parses");
            }
        }
    }
}

fn hl7ish() -> impl Strategy<Value = Vec<u8>> {
    let atom = prop_oneof![
        4 => proptest::sample::select(b"|^~\\&#\r\n0123456789.+-ABCMSHOBXPIDNTEFRSTXZ \x00\xC3\xA9\xFF".to_vec()).prop_map(|b| vec![b]),
        1 => proptest::sample::select(vec![
            &b"\rMSH|^~\\&|"[..], b"\\X", b"\\.br\\", b"\\T\\", b"\rOBX|1|NM|", b"\rPID|1||", b"\rOBR|1|||",
            b"|2.5.1", b"|UNICODE UTF-8", b"|8859/1", b"ORU^R01", b"20260302", b"+0100",
        ]).prop_map(|s| s.to_vec()),
    ];
    proptest::collection::vec(atom, 0..80).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        exercise(&input);
    }

    #[test]
    fn never_panics_on_hl7_like_bytes(tail in hl7ish()) {
        let mut input = b"MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5.1|||||".to_vec();
        input.extend(&tail);
        exercise(&input);
        exercise(&tail);
    }

    #[test]
    fn never_panics_with_any_delimiters_and_charset(
        delims in delimiters(),
        charset in prop_oneof![Just(""), Just("UNICODE UTF-8"), Just("8859/1"), Just("ASCII")],
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        // A valid header with these delimiters, then arbitrary bytes in which
        // the delimiters and escape characters are frequent.
        let fs = char::from(delims.field());
        let mut input = format!(
            "MSH{fs}{}{fs}A{fs}B{fs}C{fs}D{fs}20260302{fs}{fs}ORU{}R01{fs}1{fs}P{fs}2.5.1{fs}{fs}{fs}{fs}{fs}{fs}{charset}\r",
            delims.encoding_characters(),
            char::from(delims.component()),
        )
        .into_bytes();
        let specials = [
            delims.field(),
            delims.component(),
            delims.repetition(),
            delims.escape(),
            delims.subcomponent(),
            b'X',
            b'\r',
        ];
        prop_assert!(Message::parse(&input).is_ok(), "the header alone parses");
        input.extend(body.iter().map(|b| match b % 4 {
            0 => specials[usize::from(*b) % specials.len()],
            _ => *b,
        }));
        exercise(&input);
    }

    #[test]
    fn never_panics_on_mutated_samples(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut input = SAMPLE.to_vec();
        for (at, b) in edits {
            let i = at % input.len();
            match b % 3 {
                0 => input[i] = b,
                1 => { input.remove(i); }
                _ => input.insert(i, b),
            }
        }
        exercise(&input);
    }
}

/// A generated message: delimiters, charset, and segments of fields of
/// repetitions of components of subcomponents.
#[derive(Debug, Clone)]
struct Spec {
    delims: Delimiters,
    charset: Charset,
    control_id: String,
    segments: Vec<Vec<Vec<Vec<Vec<String>>>>>,
    terminators: Vec<&'static str>,
}

fn delimiters() -> impl Strategy<Value = Delimiters> {
    // Any printable punctuation, except the characters that the fixed header
    // values below contain (a real header with such delimiters would need
    // them escaped, and MSH-12/MSH-18 are read unescaped).
    let punct: Vec<u8> = (0x21u8..=0x7E)
        .filter(|b| !b.is_ascii_alphanumeric() && !b"-+./".contains(b))
        .collect();
    (
        proptest::sample::subsequence(punct, 6),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(mut set, trunc, seed)| {
            // Shuffle deterministically from the seed so every role sees every character.
            let n = set.len();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                set.swap(i, (s >> 33) as usize % (i + 1));
            }
            let enc = if trunc { &set[1..6] } else { &set[1..5] };
            Delimiters::new(set[0], enc).unwrap()
        })
}

fn value(charset: Charset) -> BoxedStrategy<String> {
    let c = match charset {
        Charset::Utf8 => prop_oneof![
            3 => any::<char>(),
            3 => proptest::sample::select((0x20u8..=0x7E).map(char::from).collect::<Vec<_>>()),
            1 => Just('\n'),
            1 => Just('\r'),
        ]
        .boxed(),
        Charset::Latin1 => (0u32..=0xFF)
            .prop_map(|c| char::from_u32(c).unwrap_or('?'))
            .boxed(),
        Charset::Ascii => (0u32..=0x7F)
            .prop_map(|c| char::from_u32(c).unwrap_or('?'))
            .boxed(),
    };
    proptest::collection::vec(c, 0..12)
        .prop_map(|v| v.into_iter().collect())
        .boxed()
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        delimiters(),
        prop_oneof![
            Just(Charset::Utf8),
            Just(Charset::Latin1),
            Just(Charset::Ascii)
        ],
        "[A-Za-z0-9-]{1,20}",
    )
        .prop_flat_map(|(delims, charset, control_id)| {
            let leaf = value(charset);
            let comp = proptest::collection::vec(leaf, 1..3);
            let rep = proptest::collection::vec(comp, 1..3);
            let field = proptest::collection::vec(rep, 1..3);
            let seg = proptest::collection::vec(field, 1..5);
            (
                Just(delims),
                Just(charset),
                Just(control_id),
                proptest::collection::vec(seg, 0..4),
                proptest::collection::vec(proptest::sample::select(vec!["\r", "\n", "\r\n"]), 6),
            )
        })
        .prop_map(
            |(delims, charset, control_id, segments, terminators)| Spec {
                delims,
                charset,
                control_id,
                segments,
                terminators,
            },
        )
}

fn render(spec: &Spec) -> Vec<u8> {
    let d = &spec.delims;
    let ch = |b: u8| char::from(b).to_string();
    let fs = ch(d.field());
    let mut text = format!(
        "MSH{fs}{}{fs}APP{fs}FAC{fs}CF{fs}SITE{fs}20260302101500+0100{fs}{fs}ORU{}R01{fs}{}{fs}P{fs}2.5.1{fs}{fs}{fs}{fs}{fs}{fs}{}",
        d.encoding_characters(),
        ch(d.component()),
        spec.control_id,
        spec.charset.msh18_name(),
    );
    for (i, seg) in spec.segments.iter().enumerate() {
        text.push_str(spec.terminators[i % spec.terminators.len()]);
        text.push_str(&format!("ZV{}", i % 10));
        for field in seg {
            text.push_str(&fs);
            let reps: Vec<String> = field
                .iter()
                .map(|rep| {
                    rep.iter()
                        .map(|comp| {
                            comp.iter()
                                .map(|v| escape(v, d))
                                .collect::<Vec<_>>()
                                .join(&ch(d.subcomponent()))
                        })
                        .collect::<Vec<_>>()
                        .join(&ch(d.component()))
                })
                .collect();
            text.push_str(&reps.join(&ch(d.repetition())));
        }
    }
    spec.charset.encode_lossy(&text).into_owned()
}

fn check(spec: &Spec, m: &Message<'_>) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.delimiters(), spec.delims);
    prop_assert_eq!(m.charset(), spec.charset);
    prop_assert_eq!(m.msh().control_id(), spec.control_id.as_str());
    prop_assert_eq!(m.segment_count(), spec.segments.len() + 1);
    for (i, seg_spec) in spec.segments.iter().enumerate() {
        let seg = m.segment(i + 2).unwrap();
        prop_assert_eq!(seg.field_count(), seg_spec.len());
        for (fi, field_spec) in seg_spec.iter().enumerate() {
            let f = seg.field(fi + 1).unwrap();
            prop_assert_eq!(f.repetitions().count(), field_spec.len());
            for (ri, rep_spec) in field_spec.iter().enumerate() {
                let r = f.repetition(ri + 1).unwrap();
                prop_assert_eq!(r.components().count(), rep_spec.len());
                for (ci, comp_spec) in rep_spec.iter().enumerate() {
                    let c = r.component(ci + 1).unwrap();
                    prop_assert_eq!(c.subcomponents().count(), comp_spec.len());
                    for (si, v) in comp_spec.iter().enumerate() {
                        let s = c.subcomponent(si + 1).unwrap();
                        let got = s.decode_detailed().unwrap();
                        prop_assert_eq!(got.text.as_ref(), v.as_str());
                        prop_assert!(got.warnings.is_empty());
                    }
                    if comp_spec.len() == 1 {
                        let whole = c.decoded().unwrap();
                        prop_assert_eq!(whole.as_ref(), comp_spec[0].as_str());
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_messages_round_trip(specs in proptest::collection::vec(spec(), 1..4), blank in "[\r\n]{0,3}") {
        let mut input = Vec::new();
        for s in &specs {
            input.extend(render(s));
            input.extend(s.terminators[5].as_bytes());
            input.extend(blank.as_bytes());
        }
        let pieces = split_messages(&input);
        prop_assert_eq!(pieces.len(), specs.len());
        for (piece, s) in pieces.iter().zip(&specs) {
            prop_assert_eq!(piece.kind, PieceKind::Message);
            let m = piece.parse(&input).unwrap();
            check(s, &m)?;
            // A whole message parses the same without splitting.
            let alone = render(s);
            check(s, &Message::parse(&alone).unwrap())?;
        }
    }
}
