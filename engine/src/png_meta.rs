//! PNG output with the generation parameters in a `parameters` text chunk, in the AUTOMATIC1111
//! format other tools read, and reading it back.

use crate::error::{Error, Result};

/// What produced an image; rendered as the A1111 `parameters` text.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub model: String,
    /// Image-to-image only.
    pub strength: Option<f32>,
    pub guidance_scale: f32,
    /// LoRAs merged into the weights, in order.
    pub loras: Vec<LoraUse>,
    /// (variation seed, strength) when the conditioning was varied (A1111's "Variation seed" and
    /// "Variation seed strength").
    pub variation: Option<(u64, f32)>,
}

/// A LoRA as the parameters name it: A1111's `<lora:name:scale>` after the prompt and
/// `Lora hashes: "name: <first 12 hex of sha256>"` in the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraUse {
    pub name: String,
    pub scale: f32,
    pub sha256: String,
}

impl Parameters {
    /// "{prompt}\nNegative prompt: {neg}\nSteps: 8, Sampler: Euler, ..." (negative line omitted when empty).
    pub fn to_a1111(&self) -> String {
        let mut s = self.prompt.clone();
        for l in &self.loras {
            s.push_str(&format!(" <lora:{}:{}>", l.name, l.scale));
        }
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(&self.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: Euler, Schedule type: Simple, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps, self.guidance_scale, self.seed, self.width, self.height, self.model
        ));
        if let Some(st) = self.strength {
            s.push_str(&format!(", Denoising strength: {st}"));
        }
        if let Some((seed, strength)) = self.variation.filter(|(_, v)| *v > 0.0) {
            s.push_str(&format!(", Variation seed: {seed}, Variation seed strength: {strength}"));
        }
        if !self.loras.is_empty() {
            let hashes: Vec<String> = self.loras.iter().map(|l| format!("{}: {}", l.name, &l.sha256[..l.sha256.len().min(12)])).collect();
            s.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
        }
        s
    }
}

/// Encodes an RGB image as PNG carrying `params` in a `parameters` chunk (tEXt when the text is
/// Latin-1, iTXt UTF-8 otherwise, as A1111 does).
pub fn encode_png(img: &image::RgbImage, params: &Parameters) -> Result<Vec<u8>> {
    let text = params.to_a1111();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // fdeflate: about ten times faster than the default zlib level, files ~15% larger.
        enc.set_compression(png::Compression::Fast);
        let latin1 = text.chars().all(|c| (c as u32) < 256);
        let r = if latin1 {
            enc.add_text_chunk("parameters".into(), text)
        } else {
            enc.add_itxt_chunk("parameters".into(), text)
        };
        r.map_err(|e| Error::Image(format!("png text chunk: {e}")))?;
        let mut w = enc.write_header().map_err(|e| Error::Image(format!("png header: {e}")))?;
        w.write_image_data(img.as_raw()).map_err(|e| Error::Image(format!("png data: {e}")))?;
    }
    Ok(out)
}

/// The `parameters` text of a PNG, if it has one.
pub fn read_parameters(png_bytes: &[u8]) -> Option<String> {
    let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = dec.read_info().ok()?;
    let info = reader.info();
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return Some(t.text.clone());
    }
    if let Some(t) = info.compressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return t.get_text().ok();
    }
    info.utf8_text.iter().find(|t| t.keyword == "parameters").and_then(|t| t.get_text().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(prompt: &str, neg: &str, strength: Option<f32>) -> Parameters {
        Parameters {
            prompt: prompt.into(),
            negative_prompt: neg.into(),
            steps: 8,
            seed: 42,
            width: 64,
            height: 48,
            model: "tiny".into(),
            strength,
            guidance_scale: 0.0,
            loras: vec![],
            variation: None,
        }
    }

    #[test]
    fn round_trip_latin1_and_utf8() {
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7]));
        for p in [params("a cat", "", None), params("一只猫 🐱", "blurry", Some(0.6))] {
            let bytes = encode_png(&img, &p).unwrap();
            assert_eq!(read_parameters(&bytes).unwrap(), p.to_a1111());
            let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(back, img);
        }
    }

    #[test]
    fn a1111_text_layout() {
        let t = params("a cat", "", None).to_a1111();
        assert_eq!(t, "a cat\nSteps: 8, Sampler: Euler, Schedule type: Simple, CFG scale: 0, Seed: 42, Size: 64x48, Model: tiny");
        let t = params("a cat", "dog", Some(0.6)).to_a1111();
        assert!(t.starts_with("a cat\nNegative prompt: dog\nSteps: 8"));
        assert!(t.ends_with(", Denoising strength: 0.6"));
        let mut p = params("a cat", "", None);
        p.loras = vec![
            LoraUse { name: "ink style".into(), scale: 0.8, sha256: "0123456789abcdef".into() },
            LoraUse { name: "detail".into(), scale: -1.0, sha256: "fedcba9876543210".into() },
        ];
        let t = p.to_a1111();
        assert!(t.starts_with("a cat <lora:ink style:0.8> <lora:detail:-1>\nSteps: 8"), "{t}");
        assert!(t.ends_with(", Lora hashes: \"ink style: 0123456789ab, detail: fedcba987654\""), "{t}");
        p.variation = Some((77, 0.35));
        assert!(p.to_a1111().contains(", Model: tiny, Variation seed: 77, Variation seed strength: 0.35, Lora hashes"), "{}", p.to_a1111());
    }

    #[test]
    fn no_chunk_no_parameters() {
        let mut out = Vec::new();
        image::RgbImage::new(2, 2)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(read_parameters(&out), None);
        assert_eq!(read_parameters(b"not a png"), None);
    }
}
