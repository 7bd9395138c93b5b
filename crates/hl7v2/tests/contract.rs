//! Issue 3's HL7 v2 contract, through the public surface: the reference
//! trial's sample (`reference-trial/samples/lab-results.hl7`) with every
//! segment terminator and with other delimiters; repetitions, components and
//! subcomponents; every escape the issue names; the MSH-18 character sets;
//! MLLP framing (several frames per read, frames split across reads, the
//! maximum frame size, resynchronisation after garbage); ACKs (MSA-2 echoing
//! MSH-10, ERR segments); and the invalid cases of the reference trial's
//! README that reach an HL7 message.
//!
//! The edit checks (known subject, hard and soft ranges, units, trial
//! period) belong to the pipeline, which has the protocol. For those cases
//! this crate's job is to parse the message and hand over exactly the value
//! the check needs, and to write the ERR the pipeline asks for: that is what
//! is asserted here.

use clinflow_hl7v2::{
    build_ack, build_reject_ack_without_message, escape, mllp_encode, parse_dtm,
    salvage_control_id, split_messages, AckCode, AckError, Charset, Delimiters, ErrorCode,
    ErrorKind, ErrorLocation, FrameError, Message, MllpDecoder, OruR01, PieceKind, Severity,
    StructureErrorKind,
};

const SAMPLE: &[u8] = include_bytes!("../../../reference-trial/samples/lab-results.hl7");

/// The sample with each `\n` replaced by `terminator`.
fn with_terminator(terminator: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in SAMPLE {
        if b == b'\n' {
            out.extend_from_slice(terminator);
        } else {
            out.push(b);
        }
    }
    out
}

/// The sample's messages, each on its own, segments ended by `\r` (the
/// wire form), without a final terminator.
fn wire_messages() -> Vec<Vec<u8>> {
    let input = with_terminator(b"\r");
    split_messages(&input)
        .iter()
        .map(|p| p.bytes(&input).to_vec())
        .collect()
}

/// Every subcomponent's raw bytes, with its segment id, line and position:
/// the whole tree of a message, to compare two parses.
type Leaf = (String, usize, usize, usize, usize, usize, Vec<u8>);

fn tree(m: &Message<'_>) -> Vec<Leaf> {
    let mut out = Vec::new();
    for seg in m.segments() {
        for f in seg.fields() {
            for (ri, r) in f.repetitions().enumerate() {
                for (ci, c) in r.components().enumerate() {
                    for (si, s) in c.subcomponents().enumerate() {
                        out.push((
                            seg.id().to_owned(),
                            seg.line(),
                            f.number(),
                            ri + 1,
                            ci + 1,
                            si + 1,
                            s.raw().to_vec(),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn now() -> clinflow_hl7v2::Dtm {
    parse_dtm("20260302091501+0100").unwrap()
}

fn segments_of(ack: &[u8]) -> Vec<String> {
    String::from_utf8(ack.to_vec())
        .unwrap()
        .split('\r')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The sample's text with `from` replaced by `to` (which must occur).
fn sample_with(from: &str, to: &str) -> Vec<u8> {
    let text = std::str::from_utf8(SAMPLE).unwrap();
    assert!(text.contains(from), "{from:?} is not in the sample");
    text.replacen(from, to, 1).into_bytes()
}

// --- Segment terminators --------------------------------------------------

#[test]
fn the_sample_parses_the_same_with_every_segment_terminator() {
    let baseline = SAMPLE.to_vec();
    let mixed: Vec<u8> = {
        // \r, \n and \r\n in turn.
        let ends: [&[u8]; 3] = [b"\r", b"\n", b"\r\n"];
        let mut out = Vec::new();
        let mut k = 0;
        for &b in SAMPLE {
            if b == b'\n' {
                out.extend_from_slice(ends[k % 3]);
                k += 1;
            } else {
                out.push(b);
            }
        }
        out
    };
    let inputs = [
        baseline.clone(),
        with_terminator(b"\r"),
        with_terminator(b"\r\n"),
        mixed,
    ];
    let trees = |input: &[u8]| -> Vec<Vec<Leaf>> {
        let pieces = split_messages(input);
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            pieces.iter().map(|p| (p.kind, p.line)).collect::<Vec<_>>(),
            vec![(PieceKind::Message, 1), (PieceKind::Message, 7)]
        );
        pieces
            .iter()
            .map(|p| {
                assert!(p.bytes(input).starts_with(b"MSH|"));
                let m = p.parse(input).unwrap();
                assert_eq!(m.segment_count(), 6);
                tree(&m)
            })
            .collect()
    };
    let want = trees(&baseline);
    assert_eq!(want[0][0].6, b"|");
    for input in &inputs[1..] {
        assert_eq!(trees(input), want);
    }
    // A whole message (an MLLP payload) parses without splitting, with a
    // final terminator or without.
    for m in wire_messages() {
        let mut ended = m.clone();
        ended.push(b'\r');
        assert_eq!(
            tree(&Message::parse(&m).unwrap()),
            tree(&Message::parse(&ended).unwrap())
        );
    }
}

// --- The sample, read as ORU^R01 ------------------------------------------

#[test]
fn the_sample_gives_what_the_mapping_needs() {
    for input in [SAMPLE.to_vec(), with_terminator(b"\r")] {
        let pieces = split_messages(&input);
        let m1 = pieces[0].parse(&input).unwrap();
        let h = m1.msh();
        assert_eq!(h.control_id(), "LAB-20260302-0001");
        assert_eq!(h.sender(), "LIS|CENTRAL-LAB");
        assert_eq!(h.version().to_string(), "2.5.1");
        assert_eq!(h.charset(), Charset::Utf8);
        assert!(h.message_type().is("ORU", "R01"));
        assert_eq!(
            h.datetime().unwrap().to_fhir_datetime().unwrap(),
            "2026-03-02T09:15:00+01:00"
        );

        let oru = OruR01::read(&m1).unwrap();
        assert!(oru.issues.is_empty(), "{:?}", oru.issues);
        let obs: Vec<_> = oru.observations().collect();
        assert_eq!(obs.len(), 2);
        let (patient, order, first) = obs[0];
        assert_eq!(patient.pid.ids[0].id, "CARDIO-01-0003");
        assert_eq!(
            patient.pid.ids[0].assigning_authority.as_deref(),
            Some("CARDIO-01")
        );
        let obr = order.obr.as_ref().unwrap();
        assert_eq!(obr.universal_service_id[0].code.as_deref(), Some("24323-8"));
        assert_eq!(obr.universal_service_id[0].system.as_deref(), Some("LN"));
        let x = first.obx.as_ref().unwrap();
        assert_eq!(x.value_type.as_deref(), Some("NM"));
        assert_eq!(x.identifier[0].code.as_deref(), Some("2345-7"));
        assert_eq!(x.identifier[0].system.as_deref(), Some("LN"));
        assert_eq!(x.values[0].text, "112");
        let units = x.units.as_ref().unwrap();
        assert_eq!(units.code.as_deref(), Some("mg/dL"));
        assert_eq!(units.system.as_deref(), Some("UCUM"));
        assert_eq!(x.reference_range.as_deref(), Some("70-99"));
        assert_eq!(x.interpretation[0].code.as_deref(), Some("H"));
        assert_eq!(x.result_status, "F");
        assert_eq!(
            x.observation_datetime.unwrap().to_fhir_datetime().unwrap(),
            "2026-03-02T07:15:00+01:00"
        );
        // The NTE after the second OBX, with its \T\ decoded.
        let (_, _, second) = obs[1];
        assert_eq!(second.notes.len(), 1);
        assert_eq!(second.notes[0].text, "Fasting sample & analysed within 2h");
        assert!(first.notes.is_empty());

        let m2 = pieces[1].parse(&input).unwrap();
        assert_eq!(m2.msh().control_id(), "LAB-20260302-0002");
        let oru = OruR01::read(&m2).unwrap();
        let obs: Vec<_> = oru.observations().collect();
        assert_eq!(obs.len(), 3);
        assert_eq!(obs[0].0.pid.ids[0].id, "CARDIO-01-0001");
        let codes: Vec<_> = obs
            .iter()
            .map(|(_, _, o)| {
                let x = o.obx.as_ref().unwrap();
                (
                    x.identifier[0].code.as_deref().unwrap().to_owned(),
                    x.values[0].text.to_string(),
                    x.units
                        .as_ref()
                        .unwrap()
                        .code
                        .as_deref()
                        .unwrap()
                        .to_owned(),
                )
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                ("8480-6".into(), "142".into(), "mm[Hg]".into()),
                ("8462-4".into(), "91".into(), "mm[Hg]".into()),
                // The glucose the protocol converts.
                ("2345-7".into(), "6.1".into(), "mmol/L".into()),
            ]
        );
        let glucose = obs[2].2.obx.as_ref().unwrap();
        assert_eq!(
            glucose
                .observation_datetime
                .unwrap()
                .to_fhir_datetime()
                .unwrap(),
            "2026-03-02T09:40:00-05:00"
        );
        // Locations are those of the whole input.
        assert_eq!(obs[2].2.location.line, 12);
        assert_eq!(obs[2].2.location.segment_sequence, Some(3));
    }
}

// --- Delimiters -------------------------------------------------------------

#[test]
fn delimiters_come_from_msh1_and_msh2() {
    // The sample with `|^~\&` written as `;@*$#` (none of which it contains).
    let map = |b: u8| match b {
        b'|' => b';',
        b'^' => b'@',
        b'~' => b'*',
        b'\\' => b'$',
        b'&' => b'#',
        other => other,
    };
    assert!(!SAMPLE.iter().any(|b| b";@*$#".contains(b)));
    let custom: Vec<u8> = SAMPLE.iter().map(|b| map(*b)).collect();
    let want: Vec<Vec<Leaf>> = split_messages(SAMPLE)
        .iter()
        .map(|p| tree(&p.parse(SAMPLE).unwrap()))
        .collect();
    let pieces = split_messages(&custom);
    assert_eq!(pieces.len(), 2);
    for (p, want) in pieces.iter().zip(&want) {
        let m = p.parse(&custom).unwrap();
        assert_eq!(m.delimiters(), Delimiters::new(b';', b"@*$#").unwrap());
        let got: Vec<Leaf> = tree(&m)
            .into_iter()
            .map(|mut l| {
                l.6 = l.6.iter().map(|b| map(*b)).collect();
                l
            })
            .collect();
        let want: Vec<Leaf> = want
            .iter()
            .cloned()
            .map(|mut l| {
                l.6 = l.6.iter().map(|b| map(*b)).collect();
                l
            })
            .collect();
        assert_eq!(got, want);
    }
    // Escapes follow the message's delimiters: `$T$` is now `#`.
    let m = pieces[0].parse(&custom).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let (_, _, second) = oru.observations().nth(1).unwrap();
    assert_eq!(second.notes[0].text, "Fasting sample # analysed within 2h");
    // The ACK is written with them too, and parses.
    let ack = build_ack(&m, AckCode::Accept, &[], &now(), "A-1");
    assert!(ack.starts_with(b"MSH;@*$#;CLINFLOW;CARDIO-01;LIS;CENTRAL-LAB;"));
    assert!(ack.ends_with(b"\rMSA;AA;LAB-20260302-0001\r"));
    assert_eq!(Message::parse(&ack).unwrap().delimiters(), m.delimiters());
}

#[test]
fn invalid_delimiters_are_errors_at_msh2() {
    for (input, field) in [
        (&b"MSH|^~\\^|A"[..], 2),
        (b"MSH|^~\\|", 2),
        (b"MSH|^~", 2),
        (b"MSHA^~\\&", 1),
    ] {
        let e = Message::parse(input).unwrap_err();
        assert_eq!(e.location().field, Some(field), "{e}");
        assert_eq!(e.location().segment_index, Some(1));
    }
}

// --- Repetitions, components, subcomponents ---------------------------------

#[test]
fn repetitions_components_and_subcomponents() {
    let input = b"MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5.1\r\
                  PID|1||A1^^^AUTH&1.2.3&ISO^MR~B2^^^OTHER^RI||Doe^Jane\r";
    let m = Message::parse(input).unwrap();
    let pid = m.segment(2).unwrap();
    let ids = pid.field(3).unwrap();
    assert_eq!(ids.repetitions().count(), 2);
    let first = ids.repetition(1).unwrap();
    assert_eq!(first.components().count(), 5);
    assert_eq!(first.component(1).unwrap().raw(), b"A1");
    // Present but empty is Some(empty); absent is None.
    assert!(first.component(2).unwrap().is_empty());
    assert!(first.component(6).is_none());
    let authority: Vec<_> = first
        .component(4)
        .unwrap()
        .subcomponents()
        .map(|s| s.decoded().unwrap().into_owned())
        .collect();
    assert_eq!(authority, ["AUTH", "1.2.3", "ISO"]);
    let second = ids.repetition(2).unwrap();
    assert_eq!(second.component(4).unwrap().raw(), b"OTHER");
    let sub = second.component(4).unwrap().subcomponent(1).unwrap();
    assert_eq!(sub.location().path().unwrap(), "PID-3(2).4.1");
    assert_eq!(
        sub.location().offset,
        input.windows(5).position(|w| w == b"OTHER").unwrap()
    );
    assert!(ids.repetition(3).is_none());
    assert_eq!(pid.field(5).unwrap().component(2).unwrap().raw(), b"Jane");
    assert!(pid.field(6).is_none());
    let oru = OruR01::read(&m);
    // No OBR/OBX: still a patient; the ids keep their authority.
    let oru = oru.unwrap();
    let p = &oru.patients[0].pid;
    assert_eq!(p.ids.len(), 2);
    assert_eq!(p.ids[0].assigning_authority.as_deref(), Some("AUTH"));
    assert_eq!(p.ids[1].id_type.as_deref(), Some("RI"));
}

// --- Escapes ------------------------------------------------------------------

#[test]
fn every_escape_sequence() {
    let input = "MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5.1||||||UNICODE UTF-8\r\
                 NTE|1||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\r\
                 NTE|2||\\X41C3A9\\ and \\XE282AC\\\r\
                 NTE|3||line 1\\.br\\line 2\r\
                 NTE|4||left^right\r";
    let m = Message::parse(input.as_bytes()).unwrap();
    let nte = |i: usize| m.segment(i).unwrap().field(3).unwrap();
    // Escaped delimiters do not split: one field, one repetition, one
    // component, one subcomponent.
    let f = nte(2);
    assert_eq!(f.repetitions().count(), 1);
    assert_eq!(f.component(1).unwrap().subcomponents().count(), 1);
    assert_eq!(f.decoded().unwrap(), "a|b^c&d~e\\f");
    assert_eq!(nte(3).decoded().unwrap(), "Aé and €");
    assert_eq!(nte(4).decoded().unwrap(), "line 1\nline 2");
    // An unescaped component separator splits, and decoding a whole field
    // keeps it.
    assert_eq!(nte(5).component(2).unwrap().decoded().unwrap(), "right");
    assert_eq!(nte(5).decoded().unwrap(), "left^right");
    // Nothing unknown was met.
    for i in 2..=5 {
        assert!(nte(i).decode_detailed().unwrap().warnings.is_empty());
    }
    // Unknown sequences are kept, with a warning; text is not lost.
    let m =
        Message::parse(b"MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5.1\rNTE|1||\\Zlocal\\ x \\Q")
            .unwrap();
    let d = m
        .segment(2)
        .unwrap()
        .field(3)
        .unwrap()
        .decode_detailed()
        .unwrap();
    assert_eq!(d.text, "\\Zlocal\\ x \\Q");
    assert_eq!(d.warnings.len(), 2);

    // escape() is decoding's inverse, with any delimiters.
    for delims in [
        Delimiters::default(),
        Delimiters::new(b';', b"@*$#").unwrap(),
    ] {
        let value = "a|b^c~d\\e&f;g@h*i$j#k\nl\r";
        let escaped = escape(value, &delims);
        assert!(!escaped.contains(['\r', '\n']));
        let fs = char::from(delims.field());
        let text = format!(
            "MSH{fs}{}{fs}A{fs}B{fs}C{fs}D{fs}20260302{fs}{fs}ORU{}R01{fs}1{fs}P{fs}2.5.1\rNTE{fs}1{fs}{fs}{escaped}",
            delims.encoding_characters(),
            char::from(delims.component()),
        );
        let m = Message::parse(text.as_bytes()).unwrap();
        let f = m.segment(2).unwrap().field(3).unwrap();
        assert_eq!(subcomponent_count(&f), 1);
        assert_eq!(f.decoded().unwrap(), value);
    }
}

/// Subcomponents of a field, over all its repetitions and components.
fn subcomponent_count(f: &clinflow_hl7v2::Field<'_>) -> usize {
    f.repetitions()
        .flat_map(|r| r.components())
        .map(|c| c.subcomponents().count())
        .sum()
}

// --- Character sets (MSH-18) ------------------------------------------------

fn with_charset(msh18: &str, note: &[u8]) -> Vec<u8> {
    let mut out =
        format!("MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5.1||||||{msh18}\rNTE|1||").into_bytes();
    out.extend_from_slice(note);
    out.push(b'\r');
    out
}

#[test]
fn msh18_character_sets() {
    let ok: [(&str, &[u8], Charset); 7] = [
        ("", b"Renee", Charset::Ascii),
        ("ASCII", b"Renee", Charset::Ascii),
        ("UNICODE UTF-8", "Renée".as_bytes(), Charset::Utf8),
        ("UNICODE UTF-8", b"Ren\\XC3A9\\e", Charset::Utf8),
        ("8859/1", b"Ren\xE9e", Charset::Latin1),
        ("8859/1", b"Ren\\XE9\\e", Charset::Latin1),
        ("8859/1~UNICODE UTF-8", b"Ren\xE9e", Charset::Latin1),
    ];
    for (name, note, charset) in ok {
        let input = with_charset(name, note);
        let m = Message::parse(&input).unwrap();
        assert_eq!(m.charset(), charset, "{name}");
        let want = if charset == Charset::Ascii {
            "Renee"
        } else {
            "Renée"
        };
        assert_eq!(
            m.segment(2).unwrap().field(3).unwrap().decoded().unwrap(),
            want,
            "{name}"
        );
    }
    // Bytes invalid for the declared set are errors at the byte, never
    // replaced.
    for (name, note, kind) in [
        (
            "ASCII",
            &b"Ren\xE9e"[..],
            ErrorKind::NonAscii { byte: 0xE9 },
        ),
        ("", b"Ren\xC3\xA9e", ErrorKind::NonAscii { byte: 0xC3 }),
        ("UNICODE UTF-8", b"Ren\xE9e", ErrorKind::InvalidUtf8),
        ("UNICODE UTF-8", b"Ren\\XE9\\e", ErrorKind::InvalidUtf8),
    ] {
        let input = with_charset(name, note);
        let m = Message::parse(&input).unwrap();
        let e = m
            .segment(2)
            .unwrap()
            .field(3)
            .unwrap()
            .decoded()
            .unwrap_err();
        assert_eq!(e.kind(), &kind, "{name}");
        // "Ren" then the bad byte (or the escape that holds it).
        let note_start = input.len() - 1 - note.len();
        assert_eq!(e.location().offset, note_start + 3, "{name}");
        assert_eq!(e.location().path().unwrap(), "NTE-3");
    }
    // The same text in each set gives the same value.
    let utf8 = with_charset("UNICODE UTF-8", "é ü ß".as_bytes());
    let latin1 = with_charset("8859/1", b"\xE9 \xFC \xDF");
    let value = |b: &[u8]| {
        Message::parse(b)
            .unwrap()
            .segment(2)
            .unwrap()
            .field(3)
            .unwrap()
            .decoded()
            .unwrap()
            .into_owned()
    };
    assert_eq!(value(&utf8), value(&latin1));
    // An unknown set fails the message at MSH-18; its reject ACK says so.
    let input = with_charset("ISO IR87", b"x");
    let e = Message::parse(&input).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::UnknownCharset { .. }));
    assert_eq!(e.location().field, Some(18));
    let ack = build_reject_ack_without_message(
        salvage_control_id(&input).as_deref(),
        &[AckError::from_parse_error(&e)],
        &now(),
        "R-1",
    );
    let segs = segments_of(&ack);
    assert_eq!(segs[1], "MSA|AR|1");
    assert!(segs[2].starts_with("ERR||MSH^1^18|103^"), "{}", segs[2]);
}

#[test]
fn acks_are_encoded_in_the_message_character_set() {
    let input = with_charset("8859/1", b"x");
    let m = Message::parse(&input).unwrap();
    let err = AckError {
        location: None,
        code: ErrorCode::ApplicationInternalError,
        severity: Severity::Error,
        text: "Renée".into(),
    };
    let ack = build_ack(&m, AckCode::Error, &[err], &now(), "A-1");
    assert!(ack.windows(5).any(|w| w == b"Ren\xE9e"));
    let parsed = Message::parse(&ack).unwrap();
    assert_eq!(parsed.charset(), Charset::Latin1);
    assert_eq!(
        parsed
            .segment(3)
            .unwrap()
            .field(8)
            .unwrap()
            .decoded()
            .unwrap(),
        "Renée"
    );
}

// --- MLLP -------------------------------------------------------------------

fn decode_all(max: usize, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut dec = MllpDecoder::new(max);
    let mut out: Vec<_> = chunks.iter().flat_map(|c| dec.feed(c)).collect();
    out.extend(dec.finish().map(Err));
    assert_eq!(dec.buffered(), 0);
    out
}

#[test]
fn mllp_several_frames_per_read_and_frames_split_across_reads() {
    let msgs = wire_messages();
    let stream: Vec<u8> = msgs.iter().flat_map(|m| mllp_encode(m)).collect();
    let max = 4096;

    // Both frames in one read.
    let mut dec = MllpDecoder::new(max);
    let got = dec.feed(&stream);
    assert_eq!(got, vec![Ok(msgs[0].clone()), Ok(msgs[1].clone())]);
    assert!(dec.is_idle());

    // A frame split across reads: nothing until its trailer arrives, at
    // every cut point.
    let frame = mllp_encode(&msgs[0]);
    for cut in 1..frame.len() {
        let mut dec = MllpDecoder::new(max);
        assert!(dec.feed(&frame[..cut]).is_empty(), "cut {cut}");
        assert_eq!(
            dec.feed(&frame[cut..]),
            vec![Ok(msgs[0].clone())],
            "cut {cut}"
        );
    }

    // Byte by byte and in odd chunks, the same frames.
    let whole = decode_all(max, &[&stream]);
    for size in [1, 2, 7, 64, 1000] {
        let chunks: Vec<&[u8]> = stream.chunks(size).collect();
        assert_eq!(decode_all(max, &chunks), whole, "reads of {size}");
    }

    // Each frame is a message; its ACK echoes MSH-10 and is framed back.
    for (payload, id) in whole
        .iter()
        .flatten()
        .zip(["LAB-20260302-0001", "LAB-20260302-0002"])
    {
        let m = Message::parse(payload).unwrap();
        let ack = build_ack(&m, AckCode::Accept, &[], &now(), "A-1");
        let back = decode_all(max, &[&mllp_encode(&ack)]);
        assert_eq!(back, vec![Ok(ack.clone())]);
        assert_eq!(segments_of(&ack).last().unwrap(), &format!("MSA|AA|{id}"));
    }
}

#[test]
fn mllp_maximum_frame_size_and_resynchronisation() {
    let msgs = wire_messages();
    let max = msgs.iter().map(Vec::len).max().unwrap();
    let oversized = mllp_encode(&vec![b'x'; max + 1]);
    let mut stream = b"GET / HTTP/1.1\r\n".to_vec(); // garbage before any frame
    stream.extend(mllp_encode(&msgs[0]));
    stream.extend(b"\r\n"); // whitespace between frames: not garbage
    stream.extend(&oversized);
    stream.extend(b"\x1c\rjunk"); // a stray trailer and garbage
    stream.extend(mllp_encode(&msgs[1]));
    stream.extend([0x0B]); // a frame the stream cuts short
    stream.extend(&msgs[0][..10]);

    let want = |got: &[Result<Vec<u8>, FrameError>]| {
        let shape: Vec<String> = got
            .iter()
            .map(|r| match r {
                Ok(p) => format!("frame {}", String::from_utf8_lossy(&p[..3])),
                Err(FrameError::Garbage { bytes, .. }) => format!("garbage {bytes}"),
                Err(FrameError::TooLarge { max: m, .. }) => format!("too large {m}"),
                Err(FrameError::Truncated { bytes, .. }) => format!("truncated {bytes}"),
                Err(e) => format!("{e}"),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                "garbage 12".to_owned(), // "GET / HTTP/1.1" without its spaces
                "frame MSH".to_owned(),
                format!("too large {max}"),
                "garbage 5".to_owned(), // 0x1C and "junk"
                "frame MSH".to_owned(),
                "truncated 10".to_owned(),
            ]
        );
        assert_eq!(got[1], Ok(msgs[0].clone()));
        assert_eq!(got[4], Ok(msgs[1].clone()));
    };
    want(&decode_all(max, &[&stream]));
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    want(&decode_all(max, &bytes));
    let chunks: Vec<&[u8]> = stream.chunks(13).collect();
    want(&decode_all(max, &chunks));

    // Memory stays bounded by the maximum while an oversized frame streams.
    let mut dec = MllpDecoder::new(64);
    dec.feed(&[0x0B]);
    for _ in 0..1000 {
        dec.feed(&[b'y'; 100]);
        assert!(dec.buffered() <= 64);
    }
    assert_eq!(
        dec.feed(&mllp_encode(b"MSH|ok")),
        vec![Ok(b"MSH|ok".to_vec())]
    );
}

// --- ACKs ---------------------------------------------------------------------

#[test]
fn ack_accept_echoes_msh10_with_swapped_sender_and_receiver() {
    let msgs = wire_messages();
    let m = Message::parse(&msgs[0]).unwrap();
    let ack = build_ack(&m, AckCode::Accept, &[], &now(), "ACK-0001");
    assert_eq!(
        segments_of(&ack),
        vec![
            "MSH|^~\\&|CLINFLOW|CARDIO-01|LIS|CENTRAL-LAB|20260302091501+0100||ACK^R01^ACK|ACK-0001|P|2.5.1||||||UNICODE UTF-8",
            "MSA|AA|LAB-20260302-0001",
        ]
    );
    let parsed = Message::parse(&ack).unwrap();
    assert_eq!(parsed.msh().control_id(), "ACK-0001");
    assert_eq!(
        parsed.segment(2).unwrap().field(2).unwrap().raw(),
        m.msh().control_id().as_bytes()
    );
}

#[test]
fn ack_error_and_reject_carry_err_segments() {
    // OBX-14 of the second OBX is not a date: the message is readable, that
    // value is not.
    let input = sample_with("F|||20260302071500+0100\nNTE", "F|||2026-03-02\nNTE");
    let pieces = split_messages(&input);
    let m = pieces[0].parse(&input).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let errors: Vec<AckError> = oru
        .observations()
        .filter_map(|(_, _, o)| o.obx.as_ref().err())
        .map(|e| e.ack_error(Severity::Error))
        .collect();
    assert_eq!(errors.len(), 1);
    let ack = build_ack(&m, AckCode::Error, &errors, &now(), "A-2");
    let segs = segments_of(&ack);
    assert_eq!(segs[1], "MSA|AE|LAB-20260302-0001");
    assert!(
        segs[2].starts_with("ERR||OBX^2^14^1^1|102^Data type error^HL70357|E||||invalid OBX-14"),
        "{}",
        segs[2]
    );
    // The ERR text survives its own escaping.
    let parsed = Message::parse(&ack).unwrap();
    let text = parsed
        .segment(3)
        .unwrap()
        .field(8)
        .unwrap()
        .decoded()
        .unwrap();
    assert_eq!(text, errors[0].text);

    // Not an ORU^R01: AR with 200.
    let adt = b"MSH|^~\\&|A|B|C|D|20260302||ADT^A01^ADT_A01|X-9|P|2.5.1\rPID|1||S\r";
    let m = Message::parse(adt).unwrap();
    let e = OruR01::read(&m).unwrap_err();
    let ack = build_ack(
        &m,
        AckCode::Reject,
        &[e.ack_error(Severity::Error)],
        &now(),
        "A-3",
    );
    let segs = segments_of(&ack);
    assert_eq!(segs[0].split('|').nth(8), Some("ACK^A01^ACK"));
    assert_eq!(segs[1], "MSA|AR|X-9");
    assert!(segs[2].starts_with("ERR||MSH^1^9|200^Unsupported message type^HL70357|E|"));

    // v2.4: ERR-1 and MSA-3 instead.
    let v24 = b"MSH|^~\\&|A|B|C|D|20260302||ORU^R01|Y-1|P|2.4\rOBR|1|||X^Y^LN\r";
    let m = Message::parse(v24).unwrap();
    let e = OruR01::read(&m).unwrap_err();
    assert_eq!(e.kind(), &StructureErrorKind::MissingPid);
    let ack = build_ack(
        &m,
        AckCode::Error,
        &[e.ack_error(Severity::Error)],
        &now(),
        "A-4",
    );
    let segs = segments_of(&ack);
    assert!(
        segs[1].starts_with("MSA|AE|Y-1|no PID segment"),
        "{}",
        segs[1]
    );
    assert_eq!(segs[2], "ERR|OBR^1^^100&Segment sequence error&HL70357");
}

// --- The reference trial's invalid cases -----------------------------------

#[test]
fn unknown_subject_is_handed_over_for_the_lookup() {
    let input = sample_with(
        "CARDIO-01-0003^^^CARDIO-01^RI",
        "CARDIO-01-9999^^^CARDIO-01^RI",
    );
    let pieces = split_messages(&input);
    let m = pieces[0].parse(&input).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let patient = &oru.patients[0];
    assert_eq!(patient.pid.ids[0].id, "CARDIO-01-9999");
    // The pipeline rejects it: AE, ERR 204 at PID-3.
    let pid = m.segment(patient.location.segment_index.unwrap()).unwrap();
    let err = AckError {
        location: ErrorLocation::from_location(&pid.field(3).unwrap().location()),
        code: ErrorCode::UnknownKeyIdentifier,
        severity: Severity::Error,
        text: "unknown subject CARDIO-01-9999".into(),
    };
    let segs = segments_of(&build_ack(&m, AckCode::Error, &[err], &now(), "A-5"));
    assert_eq!(segs[1], "MSA|AE|LAB-20260302-0001");
    assert_eq!(
        segs[2],
        "ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||unknown subject CARDIO-01-9999"
    );
}

#[test]
fn out_of_range_values_and_wrong_units_are_handed_over_with_their_obx() {
    // Hard range: a glucose of 5000 mg/dL; the edit check rejects the value
    // and the message is still accepted (AA with a warning at its OBX-5).
    let input = sample_with("||112|mg/dL", "||5000|mg/dL");
    let m = split_messages(&input)[0].parse(&input).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let (_, _, o) = oru.observations().next().unwrap();
    let x = o.obx.as_ref().unwrap();
    assert_eq!(x.values[0].text, "5000");
    assert_eq!(x.value_type.as_deref(), Some("NM"));
    let obx = m.segment(o.location.segment_index.unwrap()).unwrap();
    let warning = AckError {
        location: ErrorLocation::from_location(&obx.field(5).unwrap().location()),
        code: ErrorCode::DataTypeError,
        severity: Severity::Warning,
        text: "glucose 5000 mg/dL outside the hard range".into(),
    };
    let segs = segments_of(&build_ack(&m, AckCode::Accept, &[warning], &now(), "A-6"));
    assert_eq!(segs[1], "MSA|AA|LAB-20260302-0001");
    assert!(segs[2].starts_with("ERR||OBX^1^5|102^"), "{}", segs[2]);
    assert!(segs[2].contains("|W|"), "{}", segs[2]);

    // Soft range: 112 mg/dL is above the reference range; flagged H.
    let m = split_messages(SAMPLE)[0].parse(SAMPLE).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let x = oru.observations().next().unwrap().2.obx.clone().unwrap();
    assert_eq!(x.reference_range.as_deref(), Some("70-99"));
    assert_eq!(x.interpretation[0].code.as_deref(), Some("H"));

    // Wrong unit: the unit is handed over as sent.
    let input = sample_with(
        "|112|mg/dL^milligram per deciliter^UCUM|",
        "|112|kg^kilogram^UCUM|",
    );
    let m = split_messages(&input)[0].parse(&input).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let x = oru.observations().next().unwrap().2.obx.clone().unwrap();
    let units = x.units.unwrap();
    assert_eq!(
        (units.code.as_deref(), units.system.as_deref()),
        (Some("kg"), Some("UCUM"))
    );
}

#[test]
fn a_date_outside_the_trial_period_is_handed_over_with_its_offset() {
    let input = sample_with(
        "F|||20260302071500+0100\nOBX|2",
        "F|||19990302071500+0100\nOBX|2",
    );
    let m = split_messages(&input)[0].parse(&input).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let mut obs = oru.observations();
    let x = obs.next().unwrap().2.obx.clone().unwrap();
    let when = x.observation_datetime.unwrap();
    assert_eq!(when.year(), 1999);
    assert_eq!(
        when.to_fhir_datetime().unwrap(),
        "1999-03-02T07:15:00+01:00"
    );
    // The other OBX keeps its own date.
    let y = obs.next().unwrap().2.obx.clone().unwrap();
    assert_eq!(y.observation_datetime.unwrap().year(), 2026);
}

#[test]
fn malformed_lines_and_segments_are_rejected_with_where() {
    // A garbage line between the two messages: one rejected item, with its
    // line; both messages still parse.
    let input = sample_with(
        "\nMSH|^~\\&|LIS|CENTRAL-LAB|CLINFLOW|CARDIO-01|20260302101500",
        "\nthis is not HL7\nMSH|^~\\&|LIS|CENTRAL-LAB|CLINFLOW|CARDIO-01|20260302101500",
    );
    let pieces = split_messages(&input);
    assert_eq!(
        pieces.iter().map(|p| (p.kind, p.line)).collect::<Vec<_>>(),
        vec![
            (PieceKind::Message, 1),
            (PieceKind::Garbage, 7),
            (PieceKind::Message, 8)
        ]
    );
    assert_eq!(pieces[1].bytes(&input), b"this is not HL7");
    assert!(pieces[0].parse(&input).is_ok() && pieces[2].parse(&input).is_ok());

    // Garbage before the first MSH.
    let mut input = b"%%% export from LIS %%%\n".to_vec();
    input.extend_from_slice(SAMPLE);
    let kinds: Vec<_> = split_messages(&input).iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        [PieceKind::Garbage, PieceKind::Message, PieceKind::Message]
    );

    // A malformed segment inside a message: the message is rejected with the
    // line, the segment's index and the byte; the other message is not.
    let input = sample_with("\nOBX|2|NM|4548-4", "\nOBX 2 NM 4548-4");
    let pieces = split_messages(&input);
    assert_eq!(pieces.len(), 2);
    let e = pieces[0].parse(&input).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidSegment { .. }));
    assert_eq!(e.location().line, 5);
    assert_eq!(e.location().segment_index, Some(5));
    assert_eq!(
        e.location().offset,
        input.windows(8).position(|w| w == b"OBX 2 NM").unwrap()
    );
    assert!(e.to_string().contains("line 5"), "{e}");
    assert!(pieces[1].parse(&input).is_ok());
    // Its reject ACK still echoes MSH-10.
    let id = salvage_control_id(pieces[0].bytes(&input));
    assert_eq!(id.as_deref(), Some("LAB-20260302-0001"));
    let ack = build_reject_ack_without_message(
        id.as_deref(),
        &[AckError::from_parse_error(&e)],
        &now(),
        "R-2",
    );
    let segs = segments_of(&ack);
    assert_eq!(segs[1], "MSA|AR|LAB-20260302-0001");
    assert!(
        segs[2].starts_with("ERR|||102^Data type error^HL70357|E||||not a segment"),
        "{}",
        segs[2]
    );

    // A truncated header.
    for cut in ["MSH", "MSH|", "MSH|^~", "MSH|^~\\&|LIS|CENTRAL-LAB"] {
        let e = Message::parse(cut.as_bytes()).unwrap_err();
        assert_eq!(e.location().segment_index, Some(1), "{cut}");
        assert_eq!(e.location().line, 1, "{cut}");
    }

    // A malformed value: only its OBX is rejected, the other is kept.
    let input = sample_with(
        "|NM|4548-4^Hemoglobin A1c/Hemoglobin.total in Blood^LN|",
        "|NM||",
    );
    let m = split_messages(&input)[0].parse(&input).unwrap();
    let oru = OruR01::read(&m).unwrap();
    let obs: Vec<_> = oru.observations().map(|(_, _, o)| o).collect();
    assert!(obs[0].obx.is_ok());
    let e = obs[1].obx.as_ref().unwrap_err();
    assert_eq!(
        e.kind(),
        &StructureErrorKind::MissingField { field: "OBX-3" }
    );
    assert_eq!(e.location().line, 5);
    assert_eq!(e.location().path().unwrap(), "OBX-3");
}
