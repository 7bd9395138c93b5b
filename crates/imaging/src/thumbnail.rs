//! Thumbnails: box-filter downscaling and PNG encoding of 8-bit grey or RGB frames.

/// Longest side of a thumbnail, pixels. Smaller images keep their size.
pub const THUMBNAIL_SIDE: usize = 128;

/// An 8-bit image: `channels` (1 or 3) interleaved samples per pixel, row-major.
pub(crate) struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

/// Shrinks `image` so its longest side is at most [`THUMBNAIL_SIDE`], averaging the
/// source pixels each output pixel covers.
pub(crate) fn downscale(image: Image8) -> Image8 {
    let longest = image.width.max(image.height);
    if longest <= THUMBNAIL_SIDE || image.width == 0 || image.height == 0 {
        return image;
    }
    let width = (image.width * THUMBNAIL_SIDE).div_ceil(longest).max(1);
    let height = (image.height * THUMBNAIL_SIDE).div_ceil(longest).max(1);
    let c = image.channels;
    let mut data = Vec::with_capacity(width * height * c);
    for y in 0..height {
        let (y0, y1) = span(y, height, image.height);
        for x in 0..width {
            let (x0, x1) = span(x, width, image.width);
            for ch in 0..c {
                let mut sum = 0u64;
                for sy in y0..y1 {
                    let row = sy * image.width;
                    for sx in x0..x1 {
                        sum += u64::from(image.data[(row + sx) * c + ch]);
                    }
                }
                let n = ((y1 - y0) * (x1 - x0)) as u64;
                data.push(((sum + n / 2) / n) as u8);
            }
        }
    }
    Image8 {
        width,
        height,
        channels: c,
        data,
    }
}

/// Source range `[start, end)` (never empty) covered by output index `i` of `out`.
fn span(i: usize, out: usize, src: usize) -> (usize, usize) {
    let start = i * src / out;
    let end = ((i + 1) * src / out).max(start + 1).min(src);
    (start.min(src - 1), end)
}

/// The image as a PNG file.
pub(crate) fn encode_png(image: &Image8) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let width = u32::try_from(image.width).unwrap_or(u32::MAX);
    let height = u32::try_from(image.height).unwrap_or(u32::MAX);
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(if image.channels == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&image.data)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downscale_keeps_aspect_and_averages() {
        let image = Image8 {
            width: 512,
            height: 256,
            channels: 1,
            data: (0..512 * 256)
                .map(|i| if (i % 512) < 256 { 0 } else { 200 })
                .collect(),
        };
        let small = downscale(image);
        assert_eq!((small.width, small.height), (128, 64));
        assert_eq!(small.data[0], 0);
        assert_eq!(small.data[127], 200);
    }

    #[test]
    fn small_images_are_kept() {
        let image = Image8 {
            width: 3,
            height: 2,
            channels: 3,
            data: vec![7; 18],
        };
        let same = downscale(image);
        assert_eq!((same.width, same.height, same.data.len()), (3, 2, 18));
    }
}
