//! Pixel analysis of one series, fed one instance at a time
//! ([`SeriesAnalyser`]), so that only one frame's decoded pixels are held
//! beyond a small per-series state.
//!
//! Per series: an exact intensity histogram (of modality-LUT values: CT in
//! HU), mean and standard deviation, an automatic window (1st to 99th
//! percentile), for CT and MR a noise estimate (Immerkær's fast noise
//! variance, the median over frames) and a signal-to-noise ratio (the mean
//! above the series mean, less the mean below it, over the noise), slice
//! spacing along the slice normal and its consistency, missing instance
//! numbers, and a thumbnail of the middle instance's middle frame.
//!
//! Invariant: a decoder panic is caught and becomes an [`AnalysisError`];
//! a frame larger than [`MAX_DECODED_BYTES`] is refused before decoding.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use dicom_pixeldata::PixelDecoder;

use crate::error::AnalysisError;
use crate::parse::{Instance, InstanceMeta};

/// Bins of [`Histogram`].
pub const BINS: usize = 64;
/// Largest decoded size of one instance the analyser decodes.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;
/// Longest side of the thumbnail, px.
pub const THUMBNAIL: u32 = 128;
/// Distinct values tracked exactly before values are binned coarser.
const MAX_DISTINCT: usize = 1 << 18;
/// Missing instance numbers listed at most.
const MAX_MISSING: usize = 1000;

/// Decoded pixel bytes analysing `meta`'s instance may hold at once: every
/// frame in its stored sample size (some decoders decode all frames), plus
/// one frame as `f64` values. 0 without pixel data.
pub fn decoded_bytes_estimate(meta: &InstanceMeta) -> u64 {
    if !meta.has_pixel_data {
        return 0;
    }
    let rows = u64::from(meta.rows.unwrap_or(0));
    let cols = u64::from(meta.columns.unwrap_or(0));
    let samples = u64::from(meta.samples_per_pixel.max(1));
    let sample_bytes = u64::from(meta.bits_allocated.max(8)).div_ceil(8);
    let frame = rows.saturating_mul(cols).saturating_mul(samples);
    frame
        .saturating_mul(u64::from(meta.frames.max(1)))
        .saturating_mul(sample_bytes)
        .saturating_add(frame.saturating_mul(8))
}

/// An intensity histogram: `bins` equal bins over `[min, max]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub bins: Vec<u64>,
}

/// What the analysis of a series found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesAnalysis {
    pub series_uid: String,
    pub modality: String,
    pub instances: u32,
    pub frames: u32,
    pub histogram: Histogram,
    pub mean: f64,
    pub std_dev: f64,
    pub window_center: f64,
    pub window_width: f64,
    pub noise: Option<f64>,
    pub snr: Option<f64>,
    pub slice_spacing: Option<f64>,
    pub spacing_consistent: bool,
    pub missing_instances: Vec<i64>,
    #[serde(skip)]
    pub thumbnail_png: Vec<u8>,
}

/// A downscaled frame kept for the thumbnail.
#[derive(Debug, Clone)]
struct Thumb {
    width: u32,
    height: u32,
    /// Grey values (modality LUT applied), or RGB bytes.
    grey: Vec<f32>,
    rgb: Option<Vec<u8>>,
}

/// Accumulates a series' instances; see the module documentation.
#[derive(Debug)]
pub struct SeriesAnalyser {
    series_uid: String,
    modality: Option<String>,
    colour: Option<bool>,
    instances: u32,
    frames: u32,
    /// Value (quantised by `step`) -> count.
    values: BTreeMap<i64, u64>,
    step: f64,
    count: u64,
    sum: f64,
    sum_sq: f64,
    noise: Vec<f64>,
    /// (position along the normal or slice location) per instance.
    positions: Vec<f64>,
    numbers: Vec<i64>,
    /// The instance whose frame becomes the thumbnail (0-based feed order).
    thumb_at: usize,
    thumb: Option<Thumb>,
    /// Instances fed so far.
    fed: usize,
}

impl SeriesAnalyser {
    pub fn new(series_uid: &str) -> SeriesAnalyser {
        SeriesAnalyser {
            series_uid: series_uid.to_string(),
            modality: None,
            colour: None,
            instances: 0,
            frames: 0,
            values: BTreeMap::new(),
            step: 1e-3,
            count: 0,
            sum: 0.0,
            sum_sq: 0.0,
            noise: Vec::new(),
            positions: Vec::new(),
            numbers: Vec::new(),
            thumb_at: 0,
            thumb: None,
            fed: 0,
        }
    }

    /// Tells the analyser how many instances will be fed, so that the
    /// middle one gives the thumbnail (without it, the first does).
    pub fn expect_instances(&mut self, n: usize) {
        self.thumb_at = n / 2;
    }

    /// Decodes and accumulates one instance; an instance without pixel
    /// data only counts towards the series geometry.
    pub fn add(&mut self, instance: &Instance) -> Result<(), AnalysisError> {
        let meta = &instance.meta;
        if meta.series_uid != self.series_uid {
            return Err(AnalysisError::new(
                AnalysisError::INCONSISTENT,
                "the instance belongs to another series",
            ));
        }
        match &self.modality {
            Some(m) if *m != meta.modality => {
                return Err(AnalysisError::new(
                    AnalysisError::INCONSISTENT,
                    format!("the series mixes modalities {m} and {}", meta.modality),
                ))
            }
            _ => self.modality = Some(meta.modality.clone()),
        }
        let fed = self.fed;
        self.fed += 1;
        if let Some(n) = meta.instance_number {
            self.numbers.push(n);
        }
        if let Some(p) = position(meta) {
            self.positions.push(p);
        }
        if !meta.has_pixel_data {
            return Ok(());
        }
        let estimate = decoded_bytes_estimate(meta);
        if estimate > MAX_DECODED_BYTES {
            return Err(AnalysisError::new(
                AnalysisError::TOO_LARGE,
                format!("the instance would decode to {estimate} bytes, more than the {MAX_DECODED_BYTES} allowed"),
            ));
        }
        let (rows, cols) = (meta.rows.unwrap_or(0), meta.columns.unwrap_or(0));
        if rows == 0 || cols == 0 {
            return Err(AnalysisError::new(
                AnalysisError::UNSUPPORTED_PIXELS,
                "the instance has pixel data but no Rows or Columns",
            ));
        }
        let samples = meta.samples_per_pixel.max(1);
        let colour = samples == 3;
        if samples != 1 && samples != 3 {
            return Err(AnalysisError::new(
                AnalysisError::UNSUPPORTED_PIXELS,
                format!("{samples} samples per pixel are not analysed"),
            ));
        }
        if *self.colour.get_or_insert(colour) != colour {
            return Err(AnalysisError::new(
                AnalysisError::INCONSISTENT,
                "the series mixes colour and greyscale instances",
            ));
        }
        let want_thumb = fed == self.thumb_at || self.thumb.is_none();
        let frames = meta.frames.max(1);
        let noisy = matches!(meta.modality.as_str(), "CT" | "MR");
        for frame in 0..frames {
            let values = decode_frame(instance, frame, &meta.transfer_syntax)?;
            let expected = rows as usize * cols as usize * samples as usize;
            if values.len() < expected {
                return Err(AnalysisError::new(
                    AnalysisError::DECODE,
                    format!(
                        "frame {frame} decoded to {} samples, {expected} expected",
                        values.len()
                    ),
                ));
            }
            let grey: Vec<f64> = if colour {
                values[..expected]
                    .chunks_exact(3)
                    .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
                    .collect()
            } else {
                values[..expected].to_vec()
            };
            self.accumulate(&grey);
            if noisy {
                if let Some(n) = immerkaer(&grey, cols as usize, rows as usize) {
                    self.noise.push(n);
                }
            }
            if want_thumb && frame == frames / 2 {
                let rgb = colour.then(|| {
                    values[..expected]
                        .iter()
                        .map(|v| v.clamp(0.0, 255.0) as u8)
                        .collect::<Vec<u8>>()
                });
                self.thumb = Some(downscale(&grey, rgb.as_deref(), cols, rows));
            }
        }
        self.frames += frames;
        self.instances += 1;
        Ok(())
    }

    fn accumulate(&mut self, grey: &[f64]) {
        for &v in grey {
            if !v.is_finite() {
                continue;
            }
            self.count += 1;
            self.sum += v;
            self.sum_sq += v * v;
            *self
                .values
                .entry((v / self.step).round() as i64)
                .or_insert(0) += 1;
        }
        while self.values.len() > MAX_DISTINCT {
            // Coarser bins: each key's value is kept within one step.
            self.step *= 2.0;
            let old = std::mem::take(&mut self.values);
            for (k, c) in old {
                *self.values.entry(k.div_euclid(2)).or_insert(0) += c;
            }
        }
    }

    /// The value at quantile `q` (0..=1) of every pixel seen.
    fn quantile(&self, q: f64) -> f64 {
        let target = ((self.count as f64 - 1.0) * q).round() as u64;
        let mut seen = 0;
        for (&k, &c) in &self.values {
            seen += c;
            if seen > target {
                return k as f64 * self.step;
            }
        }
        self.values
            .keys()
            .next_back()
            .map_or(0.0, |&k| k as f64 * self.step)
    }

    pub fn finish(self) -> Result<SeriesAnalysis, AnalysisError> {
        if self.count == 0 {
            return Err(AnalysisError::new(
                AnalysisError::NO_PIXELS,
                "the series has no instance with pixel data",
            ));
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        let std_dev = (self.sum_sq / n - mean * mean).max(0.0).sqrt();
        let min = self
            .values
            .keys()
            .next()
            .map_or(0.0, |&k| k as f64 * self.step);
        let max = self
            .values
            .keys()
            .next_back()
            .map_or(0.0, |&k| k as f64 * self.step);
        let mut bins = vec![0u64; BINS];
        let span = (max - min).max(f64::MIN_POSITIVE);
        for (&k, &c) in &self.values {
            let v = k as f64 * self.step;
            let b = (((v - min) / span) * BINS as f64) as usize;
            bins[b.min(BINS - 1)] += c;
        }
        let (p1, p99) = (self.quantile(0.01), self.quantile(0.99));
        let window_center = (p1 + p99) / 2.0;
        let window_width = (p99 - p1).max(1.0);
        let noise = median(self.noise.clone());
        let snr = noise.filter(|n| *n > 0.0).map(|noise| {
            let (mut hi, mut hi_n, mut lo, mut lo_n) = (0.0, 0u64, 0.0, 0u64);
            for (&k, &c) in &self.values {
                let v = k as f64 * self.step;
                if v >= mean {
                    hi += v * c as f64;
                    hi_n += c;
                } else {
                    lo += v * c as f64;
                    lo_n += c;
                }
            }
            let fg = if hi_n > 0 { hi / hi_n as f64 } else { mean };
            let bg = if lo_n > 0 { lo / lo_n as f64 } else { mean };
            (fg - bg) / noise
        });
        let (slice_spacing, spacing_consistent) = spacing(self.positions.clone());
        let missing_instances = missing(self.numbers.clone());
        let thumbnail_png = self
            .thumb
            .as_ref()
            .map(|t| render(t, window_center, window_width))
            .transpose()?
            .unwrap_or_default();
        Ok(SeriesAnalysis {
            series_uid: self.series_uid,
            modality: self.modality.unwrap_or_else(|| "OT".into()),
            instances: self.instances,
            frames: self.frames,
            histogram: Histogram { min, max, bins },
            mean,
            std_dev,
            window_center,
            window_width,
            noise,
            snr,
            slice_spacing,
            spacing_consistent,
            missing_instances,
            thumbnail_png,
        })
    }
}

/// The transfer syntaxes this build has no pixel decoder for.
fn undecodable(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" // JPEG-LS
            | "1.2.840.10008.1.2.4.110" | "1.2.840.10008.1.2.4.111" | "1.2.840.10008.1.2.4.112" // JPEG XL
            | "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" // HTJ2K
            | "1.2.840.10008.1.2.4.100" | "1.2.840.10008.1.2.4.101" | "1.2.840.10008.1.2.4.102"
            | "1.2.840.10008.1.2.4.103" | "1.2.840.10008.1.2.4.104" | "1.2.840.10008.1.2.4.105"
            | "1.2.840.10008.1.2.4.106" | "1.2.840.10008.1.2.4.107" | "1.2.840.10008.1.2.4.108" // MPEG/HEVC
    )
}

/// One frame's samples with the modality LUT applied.
fn decode_frame(instance: &Instance, frame: u32, ts: &str) -> Result<Vec<f64>, AnalysisError> {
    if undecodable(ts) {
        return Err(AnalysisError::new(
            AnalysisError::UNSUPPORTED_TRANSFER_SYNTAX,
            format!("no pixel decoder for transfer syntax {ts} in this build"),
        ));
    }
    let object = &instance.object;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let decoded = object.decode_pixel_data_frame(frame)?;
        decoded.to_vec_frame::<f64>(0)
    }));
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let text = e.to_string();
            let kind = if text.contains("nsupported") || text.contains("not supported") {
                AnalysisError::UNSUPPORTED_TRANSFER_SYNTAX
            } else {
                AnalysisError::DECODE
            };
            Err(AnalysisError::new(
                kind,
                format!("decoding frame {frame} failed: {text}"),
            ))
        }
        Err(_) => Err(AnalysisError::new(
            AnalysisError::DECODE,
            format!("the pixel decoder panicked on frame {frame}"),
        )),
    }
}

/// Immerkær (1996): σ = √(π/2) / (6 (W−2)(H−2)) · Σ |I ∗ N|, with N the
/// difference of two Laplacians; insensitive to smooth structure.
fn immerkaer(img: &[f64], w: usize, h: usize) -> Option<f64> {
    if w < 3 || h < 3 {
        return None;
    }
    let at = |x: usize, y: usize| img[y * w + x];
    let mut sum = 0.0;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let v = at(x - 1, y - 1) - 2.0 * at(x, y - 1) + at(x + 1, y - 1) - 2.0 * at(x - 1, y)
                + 4.0 * at(x, y)
                - 2.0 * at(x + 1, y)
                + at(x - 1, y + 1)
                - 2.0 * at(x, y + 1)
                + at(x + 1, y + 1);
            sum += v.abs();
        }
    }
    let sigma = (std::f64::consts::PI / 2.0).sqrt() * sum / (6.0 * (w - 2) as f64 * (h - 2) as f64);
    sigma.is_finite().then_some(sigma)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    })
}

/// Where an instance lies along its slice normal (from Image Position and
/// Orientation), else its Slice Location.
fn position(meta: &InstanceMeta) -> Option<f64> {
    if let (Some(p), Some(o)) = (meta.image_position, meta.image_orientation) {
        let n = [
            o[1] * o[5] - o[2] * o[4],
            o[2] * o[3] - o[0] * o[5],
            o[0] * o[4] - o[1] * o[3],
        ];
        let d = p[0] * n[0] + p[1] * n[1] + p[2] * n[2];
        if d.is_finite() && n.iter().any(|c| *c != 0.0) {
            return Some(d);
        }
    }
    meta.slice_location.filter(|s| s.is_finite())
}

/// The median spacing between distinct positions and whether every
/// spacing is within 10% of it.
fn spacing(mut positions: Vec<f64>) -> (Option<f64>, bool) {
    positions.sort_by(f64::total_cmp);
    positions.dedup_by(|a, b| (*a - *b).abs() < 1e-6);
    let gaps: Vec<f64> = positions.windows(2).map(|w| w[1] - w[0]).collect();
    let Some(m) = median(gaps.clone()) else {
        return (None, true);
    };
    let consistent = gaps.iter().all(|g| (g - m).abs() <= 0.1 * m.abs());
    (Some(m), consistent)
}

/// Instance numbers absent between the smallest and the largest.
fn missing(mut numbers: Vec<i64>) -> Vec<i64> {
    numbers.sort_unstable();
    numbers.dedup();
    let mut out = Vec::new();
    for w in numbers.windows(2) {
        let mut n = w[0] + 1;
        while n < w[1] && out.len() < MAX_MISSING {
            out.push(n);
            n += 1;
        }
    }
    out
}

/// Box-averages a frame to at most [`THUMBNAIL`] px on its longer side.
fn downscale(grey: &[f64], rgb: Option<&[u8]>, w: u32, h: u32) -> Thumb {
    let scale = (w.max(h) as f64 / THUMBNAIL as f64).max(1.0);
    let tw = ((w as f64 / scale).round() as u32).max(1);
    let th = ((h as f64 / scale).round() as u32).max(1);
    let mut out = Vec::with_capacity((tw * th) as usize);
    let mut out_rgb = rgb.map(|_| Vec::with_capacity((tw * th * 3) as usize));
    for ty in 0..th {
        let (y0, y1) = span(ty, th, h);
        for tx in 0..tw {
            let (x0, x1) = span(tx, tw, w);
            let (mut s, mut c, mut rs) = (0.0, 0.0, [0.0f64; 3]);
            for y in y0..y1 {
                for x in x0..x1 {
                    let i = (y * w + x) as usize;
                    s += grey[i];
                    c += 1.0;
                    if let Some(rgb) = rgb {
                        for (k, acc) in rs.iter_mut().enumerate() {
                            *acc += f64::from(rgb[i * 3 + k]);
                        }
                    }
                }
            }
            out.push((s / c) as f32);
            if let Some(o) = out_rgb.as_mut() {
                o.extend(rs.iter().map(|v| (v / c).round() as u8));
            }
        }
    }
    Thumb {
        width: tw,
        height: th,
        grey: out,
        rgb: out_rgb,
    }
}

/// The source pixels `[start, end)` target pixel `t` of `n` covers.
fn span(t: u32, n: u32, size: u32) -> (u32, u32) {
    let start = (u64::from(t) * u64::from(size) / u64::from(n)) as u32;
    let end = ((u64::from(t) + 1) * u64::from(size) / u64::from(n)) as u32;
    (start, end.max(start + 1).min(size))
}

/// The thumbnail as PNG: grey values windowed to 8 bits, or RGB as is.
fn render(t: &Thumb, center: f64, width: f64) -> Result<Vec<u8>, AnalysisError> {
    let mut png_bytes = Vec::new();
    let err = |e: png::EncodingError| {
        AnalysisError::new(AnalysisError::DECODE, format!("writing the thumbnail: {e}"))
    };
    {
        let mut enc = png::Encoder::new(&mut png_bytes, t.width, t.height);
        enc.set_depth(png::BitDepth::Eight);
        let data: Vec<u8> = match &t.rgb {
            Some(rgb) => {
                enc.set_color(png::ColorType::Rgb);
                rgb.clone()
            }
            None => {
                enc.set_color(png::ColorType::Grayscale);
                let lo = center - width / 2.0;
                t.grey
                    .iter()
                    .map(|&v| (((f64::from(v) - lo) / width) * 255.0).clamp(0.0, 255.0) as u8)
                    .collect()
            }
        };
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(&data).map_err(err)?;
    }
    Ok(png_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_of_a_flat_image_is_zero_and_grows_with_noise() {
        let flat = vec![100.0; 32 * 32];
        assert_eq!(immerkaer(&flat, 32, 32), Some(0.0));
        // A ramp is smooth: the Laplacian difference ignores it.
        let ramp: Vec<f64> = (0..32 * 32).map(|i| (i % 32) as f64 * 3.0).collect();
        assert!(immerkaer(&ramp, 32, 32).unwrap() < 1e-9);
        let checker: Vec<f64> = (0..32 * 32)
            .map(|i| {
                if (i % 32 + i / 32) % 2 == 0 {
                    10.0
                } else {
                    -10.0
                }
            })
            .collect();
        assert!(immerkaer(&checker, 32, 32).unwrap() > 1.0);
        assert_eq!(immerkaer(&[1.0, 2.0], 2, 1), None);
    }

    #[test]
    fn spacing_and_missing_numbers() {
        assert_eq!(spacing(vec![10.0, 0.0, 5.0]), (Some(5.0), true));
        assert!(!spacing(vec![0.0, 5.0, 20.0]).1);
        assert_eq!(spacing(vec![3.0]), (None, true));
        assert_eq!(missing(vec![1, 2, 4, 7]), vec![3, 5, 6]);
        assert!(missing(vec![]).is_empty());
    }

    #[test]
    fn downscaling_keeps_the_aspect_and_bounds_the_size() {
        let grey = vec![0.0; 512 * 256];
        let t = downscale(&grey, None, 512, 256);
        assert_eq!((t.width, t.height), (128, 64));
        let t = downscale(&[1.0; 4], None, 2, 2);
        assert_eq!((t.width, t.height), (2, 2));
        let png = render(&t, 0.0, 1.0).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
    }

    #[test]
    fn estimates_scale_with_the_geometry() {
        let meta = InstanceMeta {
            sop_class_uid: String::new(),
            sop_instance_uid: String::new(),
            study_uid: String::new(),
            series_uid: String::new(),
            patient_id: String::new(),
            study_date: None,
            study_time: None,
            accession: None,
            modality: "CT".into(),
            series_number: None,
            instance_number: None,
            study_description: None,
            series_description: None,
            transfer_syntax: String::new(),
            rows: Some(512),
            columns: Some(512),
            frames: 1,
            samples_per_pixel: 1,
            bits_allocated: 16,
            has_pixel_data: true,
            image_position: None,
            image_orientation: None,
            slice_location: None,
            pixel_spacing: None,
            slice_thickness: None,
            body_part: None,
        };
        let one = decoded_bytes_estimate(&meta);
        assert_eq!(one, 512 * 512 * 2 + 512 * 512 * 8);
        let ten = decoded_bytes_estimate(&InstanceMeta {
            frames: 10,
            ..meta.clone()
        });
        assert!(ten > one);
        assert_eq!(
            decoded_bytes_estimate(&InstanceMeta {
                has_pixel_data: false,
                ..meta
            }),
            0
        );
    }
}
