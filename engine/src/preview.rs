//! Live previews without extra weights: the denoised latent projected to RGB with the published
//! Flux latent-to-RGB factors (16 x 3 plus a bias), one pixel per latent pixel.

use candle_core::{DType, Result, Tensor};

/// Rows are latent channels, columns R, G, B.
const LATENT_RGB: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const LATENT_RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// `x0` is one denoised latent (16, h, w) (any dtype/device). Returns an h x w RGB image.
pub fn latent_to_rgb(x0: &Tensor) -> Result<image::RgbImage> {
    let (c, h, w) = x0.dims3()?;
    if c != LATENT_RGB.len() {
        candle_core::bail!("preview expects {} latent channels, got {c}", LATENT_RGB.len());
    }
    let data: Vec<f32> = x0.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let mut rgb = LATENT_RGB_BIAS;
            for (ch, row) in LATENT_RGB.iter().enumerate() {
                let v = data[ch * h * w + y * w + x];
                for k in 0..3 {
                    rgb[k] += v * row[k];
                }
            }
            let px = rgb.map(|v| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8);
            img.put_pixel(x as u32, y as u32, image::Rgb(px));
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn zero_latent_gives_the_bias_colour() {
        let z = Tensor::zeros((16, 4, 6), DType::F32, &Device::Cpu).unwrap();
        let img = latent_to_rgb(&z).unwrap();
        assert_eq!(img.dimensions(), (6, 4));
        let want = LATENT_RGB_BIAS.map(|v| ((v + 1.0) * 127.5).round() as u8);
        assert_eq!(img.get_pixel(3, 2).0, want);
    }

    #[test]
    fn channel_one_drives_its_row() {
        let mut v = vec![0f32; 16];
        v[4] = 5.0; // row [0.0859, 0.0721, 0.0329]
        let z = Tensor::from_vec(v, (16, 1, 1), &Device::Cpu).unwrap();
        let px = latent_to_rgb(&z).unwrap().get_pixel(0, 0).0;
        let want = [0.0859f32, 0.0721, 0.0329]
            .iter()
            .zip(LATENT_RGB_BIAS)
            .map(|(r, b)| (((5.0 * r + b).clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8)
            .collect::<Vec<_>>();
        assert_eq!(px.to_vec(), want);
    }
}
