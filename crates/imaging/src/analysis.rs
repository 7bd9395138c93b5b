//! Pixel analysis of one series, fed an instance at a time: intensity histogram and
//! moments, an automatic window, noise and SNR (CT and MR), slice spacing and its
//! consistency, gaps in instance numbers, and a thumbnail.
//!
//! Memory: one instance's decoded frame is held at a time (frames are decoded one by
//! one), plus per instance a few scalars and its thumbnail PNG (a few KiB), so a series
//! of any length costs little beyond its largest frame. See [`decoded_bytes_estimate`].
//!
//! Values: monochrome samples are masked to Bits Stored, sign-extended when Pixel
//! Representation is 1, then rescaled by Rescale Slope / Intercept (so CT is in HU).
//! Colour images are analysed on their luminance (0.299 R + 0.587 G + 0.114 B) and
//! keep their colour in the thumbnail. Palette colour images are analysed on their
//! indices.

use crate::error::AnalysisError;
use crate::parse::{Instance, InstanceMeta};
use crate::thumbnail::{downscale, encode_png, Image8};
use crate::values::float;
use dicom_core::DicomValue;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_pixeldata::{DecodedPixelData, PixelDecoder, PixelRepresentation, PlanarConfiguration};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Bins of [`Histogram::bins`].
pub const HISTOGRAM_BINS: usize = 64;
/// Bins of the internal histogram percentiles are read from.
const FINE_BINS: usize = 4096;
/// Largest decoded frame accepted, bytes: bigger declared frames are refused before any
/// decoder allocates for them.
pub const MAX_FRAME_BYTES: u64 = 256 << 20;
/// At most this many missing instance numbers are listed (the count is always exact).
pub const MAX_LISTED_GAPS: usize = 10_000;

/// Upper bound of the memory decoding and analysing one instance needs, bytes, for the
/// caller's semaphore weight; 0 without pixel data.
///
/// Frames are decoded one at a time, so the bound is per frame. With
/// `n = rows * columns * samples_per_pixel`:
/// `n * max(ceil(bits_allocated / 8), 2)` for the decoded frame, plus `n * 16` for its
/// f64 values and the working copy percentiles and noise need. The encoded instance
/// itself is the caller's to count.
pub fn decoded_bytes_estimate(meta: &InstanceMeta) -> u64 {
    if !meta.has_pixel_data {
        return 0;
    }
    let n = u64::from(meta.rows.unwrap_or(0))
        .saturating_mul(u64::from(meta.columns.unwrap_or(0)))
        .saturating_mul(u64::from(meta.samples_per_pixel.max(1)));
    let sample_bytes = u64::from(meta.bits_allocated.div_ceil(8).max(2));
    n.saturating_mul(sample_bytes)
        .saturating_add(n.saturating_mul(16))
}

/// Intensity histogram: `bins.len()` equal bins over `[min, max]` of the analysed values.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Histogram {
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Sample counts per bin, lowest first.
    pub bins: Vec<u64>,
}

/// The analysis of one series.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesAnalysis {
    /// Series Instance UID.
    pub series_uid: String,
    /// Modality of the series.
    pub modality: String,
    /// Instances added (with or without pixel data).
    pub instances: u32,
    /// Frames analysed.
    pub frames: u32,
    /// Histogram of all analysed values.
    pub histogram: Histogram,
    /// Mean of all analysed values.
    pub mean: f64,
    /// Population standard deviation of all analysed values.
    pub std_dev: f64,
    /// Automatic window centre: midpoint of the 1st and 99th percentiles.
    pub window_center: f64,
    /// Automatic window width: 99th minus 1st percentile (1 when they coincide).
    pub window_width: f64,
    /// CT and MR: noise standard deviation, Immerkaer's estimate on each instance's
    /// middle frame, median over instances.
    pub noise: Option<f64>,
    /// CT and MR: mean of the foreground (above the frame's Otsu threshold) over the
    /// noise, per middle frame, median over instances.
    pub snr: Option<f64>,
    /// Median distance between adjacent slices, mm: along the slice normal from Image
    /// Position / Orientation (Patient), else from Slice Location.
    pub slice_spacing: Option<f64>,
    /// Whether every slice distance is within 10% of the median (true when there is
    /// nothing to compare).
    pub spacing_consistent: bool,
    /// Instance numbers missing between the lowest and highest seen (at most
    /// [`MAX_LISTED_GAPS`] listed).
    pub missing_instances: Vec<i64>,
    /// How many instance numbers are missing (exact, even when the list is capped).
    pub missing_instance_count: u64,
    /// PNG of the middle instance's middle frame: monochrome windowed to that frame's
    /// 1st..99th percentiles as 8-bit grey, colour as 8-bit RGB; longest side at most
    /// 128 pixels.
    #[serde(skip)]
    pub thumbnail_png: Vec<u8>,
}

/// Accumulates a series' analysis one instance at a time.
pub struct SeriesAnalyser {
    series_uid: String,
    modality: Option<String>,
    /// Samples per pixel of the first instance with pixels: colour and grey don't mix.
    samples: Option<u32>,
    instances: u32,
    frames: u32,
    histogram: FineHistogram,
    moments: Moments,
    slices: Vec<SliceGeometry>,
    /// One per instance with pixel data, in arrival order.
    pictures: Vec<Picture>,
}

/// Where an instance sits in the series.
struct SliceGeometry {
    instance_number: Option<i64>,
    position: Option<[f64; 3]>,
    orientation: Option<[f64; 6]>,
    slice_location: Option<f64>,
}

/// What is kept of each instance with pixels.
struct Picture {
    instance_number: Option<i64>,
    arrival: u32,
    png: Vec<u8>,
    noise: Option<f64>,
    snr: Option<f64>,
}

impl SeriesAnalyser {
    /// An empty analysis of series `series_uid`.
    pub fn new(series_uid: &str) -> Self {
        SeriesAnalyser {
            series_uid: series_uid.to_string(),
            modality: None,
            samples: None,
            instances: 0,
            frames: 0,
            histogram: FineHistogram::default(),
            moments: Moments::default(),
            slices: Vec::new(),
            pictures: Vec::new(),
        }
    }

    /// A hint that about `n` instances will be added, so per-instance state is allocated
    /// once. Purely an optimisation: adding more or fewer is fine.
    pub fn expect_instances(&mut self, n: usize) {
        let n = n.min(1 << 16);
        self.slices.reserve(n);
        self.pictures.reserve(n);
    }

    /// Adds one instance. On error the analysis is unchanged, so the caller may skip the
    /// instance and go on, or give up.
    pub fn add(&mut self, instance: &Instance) -> Result<(), AnalysisError> {
        let meta = &instance.meta;
        if meta.series_uid != self.series_uid {
            return Err(AnalysisError::new(
                AnalysisError::INCONSISTENT,
                "instance belongs to another series",
            ));
        }
        if let Some(modality) = &self.modality {
            if *modality != meta.modality {
                return Err(AnalysisError::new(
                    AnalysisError::INCONSISTENT,
                    format!(
                        "instance modality {} differs from the series' {modality}",
                        meta.modality
                    ),
                ));
            }
        }
        let mut picture = None;
        if meta.has_pixel_data {
            if let Some(samples) = self.samples {
                if samples != meta.samples_per_pixel {
                    return Err(AnalysisError::new(
                        AnalysisError::INCONSISTENT,
                        "instance mixes colour and greyscale with the series",
                    ));
                }
            }
            let modality = meta.modality.clone();
            let mut histogram = self.histogram.clone();
            let mut moments = self.moments.clone();
            let analysed = catch_unwind(AssertUnwindSafe(|| {
                analyse_instance(instance, &modality, &mut histogram, &mut moments)
            }))
            .unwrap_or_else(|_| {
                Err(AnalysisError::new(
                    AnalysisError::DECODE,
                    "the pixel decoder failed on malformed data",
                ))
            })?;
            self.histogram = histogram;
            self.moments = moments;
            self.frames = self.frames.saturating_add(analysed.frames);
            self.samples = Some(meta.samples_per_pixel);
            picture = Some(Picture {
                instance_number: meta.instance_number,
                arrival: self.instances,
                png: analysed.png,
                noise: analysed.noise,
                snr: analysed.snr,
            });
        }
        self.modality = Some(meta.modality.clone());
        self.pictures.extend(picture);
        self.slices.push(SliceGeometry {
            instance_number: meta.instance_number,
            position: meta.image_position,
            orientation: meta.image_orientation,
            slice_location: meta.slice_location,
        });
        self.instances = self.instances.saturating_add(1);
        Ok(())
    }

    /// The analysis; an error when no instance with pixel data was added.
    pub fn finish(mut self) -> Result<SeriesAnalysis, AnalysisError> {
        if self.pictures.is_empty() || self.moments.count == 0 {
            return Err(AnalysisError::new(
                AnalysisError::NO_PIXELS,
                "the series has no instance with analysable pixel data",
            ));
        }
        let (min, max) = (self.moments.min, self.moments.max);
        let p1 = self.histogram.quantile(0.01, min, max);
        let p99 = self.histogram.quantile(0.99, min, max);
        let width = p99 - p1;
        self.pictures
            .sort_by_key(|p| (p.instance_number.unwrap_or(i64::MAX), p.arrival));
        let middle = self.pictures.len() / 2;
        let thumbnail_png = std::mem::take(&mut self.pictures[middle].png);
        let noise = median(self.pictures.iter().filter_map(|p| p.noise).collect());
        let snr = median(self.pictures.iter().filter_map(|p| p.snr).collect());
        let (slice_spacing, spacing_consistent) = slice_spacing(&self.slices);
        let (missing_instances, missing_instance_count) = gaps(&self.slices);
        Ok(SeriesAnalysis {
            series_uid: self.series_uid,
            modality: self.modality.unwrap_or_else(|| "OT".to_string()),
            instances: self.instances,
            frames: self.frames,
            histogram: self.histogram.coarse(min, max),
            mean: self.moments.mean,
            std_dev: self.moments.std_dev(),
            window_center: (p1 + p99) / 2.0,
            window_width: if width > 0.0 { width } else { 1.0 },
            noise,
            snr,
            slice_spacing,
            spacing_consistent,
            missing_instances,
            missing_instance_count,
            thumbnail_png,
        })
    }
}

struct InstanceResult {
    frames: u32,
    png: Vec<u8>,
    noise: Option<f64>,
    snr: Option<f64>,
}

/// Decodes and analyses every frame of `instance` into `histogram` and `moments`.
fn analyse_instance(
    instance: &Instance,
    modality: &str,
    histogram: &mut FineHistogram,
    moments: &mut Moments,
) -> Result<InstanceResult, AnalysisError> {
    let layout = Layout::check(instance)?;
    let frames = instance.meta.frames;
    let middle = frames / 2;
    let mut result = InstanceResult {
        frames,
        png: Vec::new(),
        noise: None,
        snr: None,
    };
    for frame in 0..frames {
        let decoded = instance
            .object
            .decode_pixel_data_frame(frame)
            .map_err(|e| {
                AnalysisError::new(
                    AnalysisError::DECODE,
                    format!("frame {frame} does not decode: {e}"),
                )
            })?;
        let frame_values = layout.values(&decoded)?;
        let luminance = frame_values.luminance();
        moments.add(&luminance);
        histogram.add(&luminance, moments.min, moments.max);
        if frame == middle {
            if modality == "CT" || modality == "MR" {
                result.noise = immerkaer_noise(&luminance, layout.rows, layout.columns);
                result.snr = result.noise.and_then(|noise| {
                    let foreground = foreground_mean(&luminance)?;
                    (noise > 0.0)
                        .then(|| foreground.abs() / noise)
                        .filter(|s| s.is_finite())
                });
            }
            let image = downscale(frame_values.to_image8(&layout, &luminance));
            result.png = encode_png(&image).map_err(|e| {
                AnalysisError::new(AnalysisError::DECODE, format!("thumbnail: {e}"))
            })?;
        }
    }
    Ok(result)
}

/// The pixel layout of an instance, checked before anything is decoded.
struct Layout {
    rows: usize,
    columns: usize,
    samples: usize,
    bits_stored: u32,
    high_bit: u32,
    signed: bool,
    slope: f64,
    intercept: f64,
    photometric: String,
    /// 32-bit samples of a big endian dataset held as 16-bit words: the words of each
    /// sample come out swapped.
    swap_words: bool,
}

impl Layout {
    fn check(instance: &Instance) -> Result<Layout, AnalysisError> {
        let meta = &instance.meta;
        let obj = &instance.object;
        let unsupported = |why: String| AnalysisError::new(AnalysisError::UNSUPPORTED_PIXELS, why);
        if obj.get(tags::PIXEL_DATA).is_none() {
            return Err(unsupported("only integer Pixel Data is analysed".into()));
        }
        let (rows, columns) = match (meta.rows, meta.columns) {
            (Some(r), Some(c)) if r > 0 && c > 0 => (r as usize, c as usize),
            _ => return Err(unsupported("Rows or Columns is missing or zero".into())),
        };
        let samples = meta.samples_per_pixel as usize;
        if samples != 1 && samples != 3 {
            return Err(unsupported(format!("{samples} samples per pixel")));
        }
        let bits_allocated = meta.bits_allocated;
        if !matches!(bits_allocated, 1 | 8 | 16 | 32) {
            return Err(unsupported(format!("{bits_allocated} bits allocated")));
        }
        let frame_bytes = (rows as u64)
            .saturating_mul(columns as u64)
            .saturating_mul(samples as u64)
            .saturating_mul(u64::from(bits_allocated.div_ceil(8)));
        if frame_bytes > MAX_FRAME_BYTES {
            return Err(AnalysisError::new(
                AnalysisError::TOO_LARGE,
                format!("a frame of {frame_bytes} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"),
            ));
        }
        let photometric = crate::values::first(obj, tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap_or_else(|| "MONOCHROME2".to_string())
            .to_ascii_uppercase();
        let ts = &meta.transfer_syntax;
        let registered = TransferSyntaxRegistry.get(ts).ok_or_else(|| {
            AnalysisError::new(
                AnalysisError::UNSUPPORTED_TRANSFER_SYNTAX,
                format!("unknown transfer syntax {ts}"),
            )
        })?;
        match obj.get(tags::PIXEL_DATA).map(|e| e.value()) {
            Some(DicomValue::Primitive(value)) => {
                if photometric.starts_with("YBR") && photometric != "YBR_FULL" {
                    return Err(unsupported(format!("uncompressed {photometric}")));
                }
                let needed = if bits_allocated == 1 {
                    (rows * columns * samples).div_ceil(8) as u64
                } else {
                    frame_bytes
                }
                .saturating_mul(u64::from(meta.frames));
                let have = value.calculate_byte_len() as u64;
                if have < needed {
                    return Err(AnalysisError::new(
                        AnalysisError::DECODE,
                        format!("pixel data has {have} bytes, the declared frames need {needed}"),
                    ));
                }
            }
            Some(DicomValue::PixelSequence(seq)) => {
                if !registered.can_decode_all() {
                    return Err(AnalysisError::new(
                        AnalysisError::UNSUPPORTED_TRANSFER_SYNTAX,
                        format!(
                            "no decoder for transfer syntax {ts} ({})",
                            registered.name()
                        ),
                    ));
                }
                for fragment in seq.fragments() {
                    check_codestream(fragment, rows, columns)?;
                }
            }
            _ => return Err(unsupported("Pixel Data is not a pixel value".into())),
        }
        let int = |tag| crate::values::int(obj, tag).and_then(|v| u32::try_from(v).ok());
        let bits_stored = int(tags::BITS_STORED)
            .filter(|&b| b >= 1 && b <= bits_allocated)
            .unwrap_or(bits_allocated);
        let high_bit = int(tags::HIGH_BIT)
            .filter(|&h| h + 1 >= bits_stored && h < bits_allocated)
            .unwrap_or(bits_stored - 1);
        let monochrome = photometric.starts_with("MONOCHROME");
        let slope = float(obj, tags::RESCALE_SLOPE).filter(|s| *s != 0.0);
        Ok(Layout {
            rows,
            columns,
            samples,
            bits_stored,
            high_bit,
            signed: int(tags::PIXEL_REPRESENTATION) == Some(1),
            slope: if monochrome {
                slope.unwrap_or(1.0)
            } else {
                1.0
            },
            intercept: if monochrome {
                float(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0)
            } else {
                0.0
            },
            photometric,
            swap_words: bits_allocated == 32
                && meta.transfer_syntax == "1.2.840.10008.1.2.2"
                && matches!(
                    obj.get(tags::PIXEL_DATA).map(|e| e.value()),
                    Some(DicomValue::Primitive(dicom_core::PrimitiveValue::U16(_)))
                ),
        })
    }

    /// The values of one decoded frame.
    fn values(&self, decoded: &DecodedPixelData) -> Result<FrameValues, AnalysisError> {
        let n = self.rows * self.columns * self.samples;
        let data = decoded.data();
        let bits = u32::from(decoded.bits_allocated());
        // 1-bit data comes out of the decoder as one byte (0 or 255) per sample.
        let bytes_per = if bits == 1 {
            1
        } else {
            bits.div_ceil(8) as usize
        };
        if data.len() < n * bytes_per
            || decoded.rows() as usize != self.rows
            || decoded.columns() as usize != self.columns
        {
            return Err(AnalysisError::new(
                AnalysisError::DECODE,
                format!(
                    "decoded frame has {} bytes, {}x{}x{} samples need {}",
                    data.len(),
                    self.rows,
                    self.columns,
                    self.samples,
                    n * bytes_per
                ),
            ));
        }
        let signed = decoded.pixel_representation() == PixelRepresentation::Signed || self.signed;
        let (stored, shift) = if bits == 1 {
            (8, 0)
        } else {
            (self.bits_stored, self.high_bit + 1 - self.bits_stored)
        };
        let mask: u64 = if stored >= 32 {
            u64::from(u32::MAX)
        } else {
            (1u64 << stored) - 1
        };
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            let raw = match bytes_per {
                1 => u64::from(data[i]),
                2 => u64::from(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])),
                _ => {
                    let b = &data[4 * i..4 * i + 4];
                    let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    u64::from(if self.swap_words {
                        v.rotate_left(16)
                    } else {
                        v
                    })
                }
            };
            let v = (raw >> shift) & mask;
            let v = if signed && bits != 1 && (v >> (stored - 1)) & 1 == 1 {
                v as i64 - (1i64 << stored)
            } else {
                v as i64
            };
            let v = if bits == 1 {
                (v / 255) as f64
            } else {
                v as f64
            };
            values.push(v * self.slope + self.intercept);
        }
        let mut colour = self.samples == 3;
        if colour && decoded.planar_configuration() != PlanarConfiguration::Standard {
            let pixels = self.rows * self.columns;
            let planar = std::mem::take(&mut values);
            values = (0..n).map(|i| planar[(i % 3) * pixels + i / 3]).collect();
        }
        // Decoders hand colour back as RGB; only uncompressed YBR_FULL is left to convert.
        let photometric = decoded
            .photometric_interpretation()
            .as_str()
            .to_ascii_uppercase();
        if colour && photometric == "YBR_FULL" {
            let half = f64::from(1u32 << (self.bits_stored.min(31) - 1));
            for px in values.chunks_exact_mut(3) {
                let (y, cb, cr) = (px[0], px[1] - half, px[2] - half);
                px[0] = y + 1.402 * cr;
                px[1] = y - 0.344_136 * cb - 0.714_136 * cr;
                px[2] = y + 1.772 * cb;
            }
        }
        if self.samples == 1 {
            colour = false;
        }
        Ok(FrameValues {
            values,
            colour,
            inverted: self.photometric == "MONOCHROME1",
            max_sample: mask as f64,
        })
    }
}

/// Checks that a JPEG or JPEG 2000 codestream does not declare an image larger than the
/// dataset's Rows and Columns, so a decoder never allocates for a bigger one.
fn check_codestream(fragment: &[u8], rows: usize, columns: usize) -> Result<(), AnalysisError> {
    let too_big = |h: usize, w: usize| {
        Err(AnalysisError::new(
            AnalysisError::DECODE,
            format!("codestream declares {w}x{h}, larger than the {columns}x{rows} image"),
        ))
    };
    let be16 = |b: &[u8], i: usize| {
        b.get(i..i + 2)
            .map(|s| usize::from(u16::from_be_bytes([s[0], s[1]])))
    };
    let be32 = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    if fragment.starts_with(&[0xFF, 0xD8]) {
        // JPEG: walk marker segments to the first SOFn.
        let mut i = 2;
        while let (Some(&0xFF), Some(&marker)) = (fragment.get(i), fragment.get(i + 1)) {
            let Some(len) = be16(fragment, i + 2) else {
                break;
            };
            let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
            if is_sof {
                if let (Some(h), Some(w)) = (be16(fragment, i + 5), be16(fragment, i + 7)) {
                    if h > rows || w > columns {
                        return too_big(h, w);
                    }
                }
                break;
            }
            i += 2 + len;
        }
    } else if let Some(siz) = fragment
        .windows(4)
        .take(4096)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])
    {
        // JPEG 2000: SIZ follows SOC; Xsiz, Ysiz, XOsiz, YOsiz after Lsiz and Rsiz.
        let at = siz + 4;
        if let (Some(x), Some(y), Some(x0), Some(y0)) = (
            be32(fragment, at + 4),
            be32(fragment, at + 8),
            be32(fragment, at + 12),
            be32(fragment, at + 16),
        ) {
            let (w, h) = (x.saturating_sub(x0), y.saturating_sub(y0));
            if h > rows || w > columns {
                return too_big(h, w);
            }
        }
    }
    Ok(())
}

/// One frame's values: rescaled monochrome values, or interleaved RGB samples.
struct FrameValues {
    values: Vec<f64>,
    colour: bool,
    inverted: bool,
    /// Largest possible stored sample (for scaling colour to 8 bits).
    max_sample: f64,
}

impl FrameValues {
    fn luminance(&self) -> Vec<f64> {
        if self.colour {
            self.values
                .chunks_exact(3)
                .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
                .collect()
        } else {
            self.values.clone()
        }
    }

    fn to_image8(&self, layout: &Layout, luminance: &[f64]) -> Image8 {
        let (data, channels) = if self.colour {
            let scale = 255.0 / self.max_sample.max(1.0);
            let data = self
                .values
                .iter()
                .map(|v| (v * scale).round().clamp(0.0, 255.0) as u8)
                .collect();
            (data, 3)
        } else {
            let mut sorted = luminance.to_vec();
            sorted.sort_unstable_by(f64::total_cmp);
            let lo = percentile_sorted(&sorted, 0.01);
            let hi = percentile_sorted(&sorted, 0.99);
            let span = if hi > lo { hi - lo } else { 1.0 };
            let data = luminance
                .iter()
                .map(|v| {
                    let g = ((v - lo) / span * 255.0).round().clamp(0.0, 255.0) as u8;
                    if self.inverted {
                        255 - g
                    } else {
                        g
                    }
                })
                .collect();
            (data, 1)
        };
        Image8 {
            width: layout.columns,
            height: layout.rows,
            channels,
            data,
        }
    }
}

fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Immerkaer (1996), "Fast noise variance estimation": the mean absolute response to
/// the Laplacian difference mask, which cancels image structure up to second order,
/// scaled to a Gaussian standard deviation: sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * N|.
fn immerkaer_noise(values: &[f64], rows: usize, columns: usize) -> Option<f64> {
    if rows < 3 || columns < 3 {
        return None;
    }
    let at = |y: usize, x: usize| values[y * columns + x];
    let mut sum = 0.0;
    for y in 1..rows - 1 {
        for x in 1..columns - 1 {
            let response = at(y - 1, x - 1) - 2.0 * at(y - 1, x) + at(y - 1, x + 1)
                - 2.0 * at(y, x - 1)
                + 4.0 * at(y, x)
                - 2.0 * at(y, x + 1)
                + at(y + 1, x - 1)
                - 2.0 * at(y + 1, x)
                + at(y + 1, x + 1);
            sum += response.abs();
        }
    }
    let n = ((rows - 2) * (columns - 2)) as f64;
    let sigma = (std::f64::consts::PI / 2.0).sqrt() * sum / (6.0 * n);
    sigma.is_finite().then_some(sigma)
}

/// Mean of the values above the frame's Otsu threshold (256 bins over its range).
fn foreground_mean(values: &[f64]) -> Option<f64> {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if max.partial_cmp(&min) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    const BINS: usize = 256;
    let bin = |v: f64| (((v - min) / (max - min) * BINS as f64) as usize).min(BINS - 1);
    let mut counts = [0u64; BINS];
    for &v in values {
        counts[bin(v)] += 1;
    }
    let total = values.len() as f64;
    let sum_all: f64 = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * c as f64)
        .sum();
    let (mut weight_bg, mut sum_bg) = (0.0, 0.0);
    let (mut best, mut threshold) = (-1.0, 0);
    for (i, &c) in counts.iter().enumerate() {
        weight_bg += c as f64;
        sum_bg += i as f64 * c as f64;
        let weight_fg = total - weight_bg;
        if weight_bg == 0.0 || weight_fg == 0.0 {
            continue;
        }
        let between =
            weight_bg * weight_fg * (sum_bg / weight_bg - (sum_all - sum_bg) / weight_fg).powi(2);
        if between > best {
            best = between;
            threshold = i;
        }
    }
    let foreground: Vec<f64> = values
        .iter()
        .copied()
        .filter(|&v| bin(v) > threshold)
        .collect();
    (!foreground.is_empty()).then(|| foreground.iter().sum::<f64>() / foreground.len() as f64)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Median slice distance and whether all distances are within 10% of it.
fn slice_spacing(slices: &[SliceGeometry]) -> (Option<f64>, bool) {
    let normal = slices.iter().find_map(|s| s.orientation).and_then(|o| {
        let n = [
            o[1] * o[5] - o[2] * o[4],
            o[2] * o[3] - o[0] * o[5],
            o[0] * o[4] - o[1] * o[3],
        ];
        let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
        (len > 1e-6).then(|| n.map(|c| c / len))
    });
    let mut along: Vec<f64> = match normal {
        Some(n) => slices
            .iter()
            .filter_map(|s| s.position)
            .map(|p| p[0] * n[0] + p[1] * n[1] + p[2] * n[2])
            .collect(),
        None => Vec::new(),
    };
    if along.len() < 2 {
        along = slices.iter().filter_map(|s| s.slice_location).collect();
    }
    if along.len() < 2 {
        return (None, true);
    }
    along.sort_unstable_by(f64::total_cmp);
    let steps: Vec<f64> = along.windows(2).map(|w| w[1] - w[0]).collect();
    match median(steps.clone()) {
        Some(m) if m > 1e-6 => {
            let consistent = steps.iter().all(|s| (s - m).abs() <= 0.1 * m);
            (Some(m), consistent)
        }
        _ => (None, false),
    }
}

/// Instance numbers missing between the lowest and highest seen, listed up to
/// [`MAX_LISTED_GAPS`], and their exact count.
fn gaps(slices: &[SliceGeometry]) -> (Vec<i64>, u64) {
    let mut numbers: Vec<i64> = slices.iter().filter_map(|s| s.instance_number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    let mut listed = Vec::new();
    let mut count: u64 = 0;
    for pair in numbers.windows(2) {
        let missing = pair[1].abs_diff(pair[0]).saturating_sub(1);
        count = count.saturating_add(missing);
        let mut n = pair[0];
        while listed.len() < MAX_LISTED_GAPS && n < pair[1] - 1 {
            n += 1;
            listed.push(n);
        }
    }
    (listed, count)
}

/// Count, mean and variance (Welford, merged frame by frame), min and max.
#[derive(Clone)]
struct Moments {
    count: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Default for Moments {
    fn default() -> Self {
        Moments {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Moments {
    fn add(&mut self, values: &[f64]) {
        if values.is_empty() {
            return;
        }
        // Moments of the frame, then Chan et al.'s merge: stable for large counts.
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let m2: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
        let total = self.count as f64 + n;
        let delta = mean - self.mean;
        self.mean += delta * n / total;
        self.m2 += m2 + delta * delta * self.count as f64 * n / total;
        self.count += values.len() as u64;
        for &v in values {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }

    fn std_dev(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            (self.m2 / self.count as f64).max(0.0).sqrt()
        }
    }
}

/// A fine histogram whose range grows by doubling (merging bin pairs) to take any
/// value, so it can be filled before the series' range is known. Integer data whose
/// range fits gets one bin per integer, which makes it exact.
#[derive(Clone, Default)]
struct FineHistogram {
    lo: f64,
    width: f64,
    counts: Vec<u64>,
}

impl FineHistogram {
    /// Adds values; `min`/`max` bound them (and size the first range).
    fn add(&mut self, values: &[f64], min: f64, max: f64) {
        if values.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; FINE_BINS];
            let integral = values.iter().all(|v| v.fract() == 0.0);
            if integral && max - min < FINE_BINS as f64 - 1.0 {
                self.width = 1.0;
                self.lo = min - 0.5;
            } else if max > min {
                self.width = (max - min) / (FINE_BINS as f64 - 1.0);
                self.lo = min - self.width / 2.0;
            } else {
                self.width = (min.abs() * 1e-6).max(1e-9);
                self.lo = min - self.width * (FINE_BINS / 2) as f64;
            }
        }
        self.grow_to(min);
        self.grow_to(max);
        for &v in values {
            let i = ((v - self.lo) / self.width) as usize;
            self.counts[i.min(FINE_BINS - 1)] += 1;
        }
    }

    fn hi(&self) -> f64 {
        self.lo + self.width * FINE_BINS as f64
    }

    fn grow_to(&mut self, v: f64) {
        while v < self.lo || v >= self.hi() {
            let mut merged = vec![0u64; FINE_BINS];
            let offset = if v < self.lo { FINE_BINS / 2 } else { 0 };
            for (i, &c) in self.counts.iter().enumerate() {
                merged[offset + i / 2] += c;
            }
            if v < self.lo {
                self.lo -= self.width * FINE_BINS as f64;
            }
            self.width *= 2.0;
            self.counts = merged;
            if !self.width.is_finite() {
                break;
            }
        }
    }

    fn centre(&self, i: usize) -> f64 {
        self.lo + (i as f64 + 0.5) * self.width
    }

    /// The `q` quantile, by linear interpolation inside its bin, within `[min, max]`.
    fn quantile(&self, q: f64, min: f64, max: f64) -> f64 {
        let total: u64 = self.counts.iter().sum();
        let target = q * total as f64;
        let mut seen = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            let c = c as f64;
            if c > 0.0 && seen + c >= target {
                let within = ((target - seen) / c).clamp(0.0, 1.0);
                let v = self.lo + (i as f64 + within) * self.width;
                return v.clamp(min, max);
            }
            seen += c;
        }
        max
    }

    /// [`HISTOGRAM_BINS`] equal bins over `[min, max]`, each fine bin counted at its centre.
    fn coarse(&self, min: f64, max: f64) -> Histogram {
        let mut bins = vec![0u64; HISTOGRAM_BINS];
        let span = max - min;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let x = self.centre(i).clamp(min, max);
            let b = if span > 0.0 {
                (((x - min) / span) * HISTOGRAM_BINS as f64) as usize
            } else {
                0
            };
            bins[b.min(HISTOGRAM_BINS - 1)] += c;
        }
        Histogram { min, max, bins }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_growth_keeps_every_count() {
        let mut h = FineHistogram::default();
        let first: Vec<f64> = (0..100).map(f64::from).collect();
        h.add(&first, 0.0, 99.0);
        let second = [-50_000.0, 70_000.5];
        h.add(&second, -50_000.0, 70_000.5);
        assert_eq!(h.counts.iter().sum::<u64>(), 102);
        let coarse = h.coarse(-50_000.0, 70_000.5);
        assert_eq!(coarse.bins.iter().sum::<u64>(), 102);
        assert_eq!(coarse.bins[0], 1);
        assert_eq!(coarse.bins[HISTOGRAM_BINS - 1], 1);
    }

    #[test]
    fn quantiles_of_integers_are_exact() {
        let mut h = FineHistogram::default();
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        h.add(&values, 1.0, 1000.0);
        let median = h.quantile(0.5, 1.0, 1000.0);
        assert!((median - 500.0).abs() <= 1.0, "{median}");
    }

    #[test]
    fn immerkaer_sees_noise_not_a_ramp() {
        let (rows, cols) = (64, 64);
        let ramp: Vec<f64> = (0..rows * cols).map(|i| (i % cols) as f64 * 3.0).collect();
        assert!(immerkaer_noise(&ramp, rows, cols).unwrap() < 1e-9);
        // Deterministic pseudo-noise of known spread (+-1 in a checkerboard-free pattern).
        let mut state = 12345u64;
        let noisy: Vec<f64> = ramp
            .iter()
            .map(|v| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v + if (state >> 33) & 1 == 1 { 1.0 } else { -1.0 }
            })
            .collect();
        let sigma = immerkaer_noise(&noisy, rows, cols).unwrap();
        assert!((0.7..1.3).contains(&sigma), "{sigma}");
    }

    #[test]
    fn gaps_are_listed_and_counted() {
        let slice = |n| SliceGeometry {
            instance_number: Some(n),
            position: None,
            orientation: None,
            slice_location: None,
        };
        let (listed, count) = gaps(&[slice(1), slice(2), slice(4), slice(7)]);
        assert_eq!(listed, vec![3, 5, 6]);
        assert_eq!(count, 3);
        let (listed, count) = gaps(&[slice(0), slice(i64::MAX)]);
        assert_eq!(listed.len(), MAX_LISTED_GAPS);
        assert_eq!(count, (i64::MAX - 1) as u64);
    }
}
