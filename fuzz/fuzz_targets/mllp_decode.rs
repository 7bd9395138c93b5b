//! Fuzzes the MLLP decoder: any stream, cut into reads of any sizes, gives
//! the same frames and errors as the stream fed at once, and no frame over
//! the maximum.
#![no_main]

use clinflow_hl7v2::{FrameError, MllpDecoder};
use libfuzzer_sys::fuzz_target;

fn run(max: usize, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut dec = MllpDecoder::new(max);
    let mut out: Vec<_> = chunks.iter().flat_map(|c| dec.feed(c)).collect();
    out.extend(dec.finish().map(Err));
    out
}

fuzz_target!(|data: &[u8]| {
    // First byte: maximum frame size; second: read size; the rest: the stream.
    let (Some(&max), Some(&step), Some(stream)) = (data.first(), data.get(1), data.get(2..)) else {
        return;
    };
    let max = usize::from(max);
    let whole = run(max, &[stream]);
    let chunks: Vec<&[u8]> = stream.chunks(usize::from(step).max(1)).collect();
    assert_eq!(run(max, &chunks), whole);
    for frame in whole.iter().flatten() {
        assert!(frame.len() <= max);
    }
});
