//! Settings restored from a PNG: the `parameters` text our studio and AUTOMATIC1111 write
//! ("<prompt>\nNegative prompt: <text>\nSteps: 8, Sampler: Euler, ..., Seed: 42, Size: 1024x1024,
//! ..."), read from the PNG's tEXt or iTXt chunk, turned into form settings with a note of what
//! could not be used. Pure functions, shared by the browser (the Generate tab) and the tests.

use crate::types::{limits, take_lora_tags, AspectRatio, LoraChoice, Style};

/// What a PNG's parameters gave, and what of them could not be used (in words for the user).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Restored {
    pub prompt: String,
    pub negative_prompt: String,
    pub style: Style,
    pub ratio: Option<AspectRatio>,
    pub steps: Option<u32>,
    pub seed: Option<u64>,
    pub strength: Option<f32>,
    /// LoRAs named in the prompt's `<lora:name:weight>` tags (the page checks its folder has them).
    pub loras: Vec<LoraChoice>,
    /// A1111's "Variation seed strength" (ours: the variation).
    pub variation: Option<f32>,
    /// What was restored, e.g. ["prompt", "style", "steps", "seed"].
    pub restored: Vec<&'static str>,
    /// What was not, with the reason.
    pub not_restored: Vec<String>,
}

/// The text of a PNG's `keyword` chunk (tEXt, or uncompressed iTXt), if the bytes are a PNG that
/// has one.
pub fn png_text(bytes: &[u8], keyword: &str) -> Option<String> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if bytes.len() < 8 || bytes[..8] != SIGNATURE {
        return None;
    }
    let mut off = 8usize;
    while off + 12 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[off..off + 4].try_into().ok()?) as usize;
        let kind = &bytes[off + 4..off + 8];
        // checked: on wasm32 (usize = u32) `8 + len` of a hostile length would wrap
        let end = off.checked_add(8)?.checked_add(len)?;
        let data = bytes.get(off + 8..end)?;
        if kind == b"IEND" {
            break;
        }
        if let Some(nul) = data.iter().position(|&b| b == 0) {
            if &data[..nul] == keyword.as_bytes() {
                match kind {
                    // Latin-1
                    b"tEXt" => return Some(data[nul + 1..].iter().map(|&b| b as char).collect()),
                    b"iTXt" => {
                        // keyword \0 compressed-flag method language \0 translated \0 text
                        let rest = data.get(nul + 1..)?;
                        if *rest.first()? != 0 {
                            return None; // compressed: not written by us or A1111
                        }
                        let rest = rest.get(2..)?;
                        let lang_end = rest.iter().position(|&b| b == 0)?;
                        let rest = rest.get(lang_end + 1..)?;
                        let tr_end = rest.iter().position(|&b| b == 0)?;
                        return String::from_utf8(rest[tr_end + 1..].to_vec()).ok();
                    }
                    _ => {}
                }
            }
        }
        off = end.checked_add(4)?;
    }
    None
}

/// "Key: value, Key: "quoted, value", ..." of an infotext's last line.
fn settings_pairs(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(": ") else { break };
        let key = rest[..colon].trim().to_string();
        rest = &rest[colon + 2..];
        let value = if let Some(q) = rest.strip_prefix('"') {
            let end = q.find('"').unwrap_or(q.len());
            let v = q[..end].to_string();
            rest = q.get(end + 1..).unwrap_or("");
            v
        } else {
            let end = rest.find(", ").unwrap_or(rest.len());
            let v = rest[..end].to_string();
            rest = &rest[end..];
            v
        };
        rest = rest.trim_start_matches(',').trim_start();
        out.push((key, value));
    }
    out
}

/// Parses a `parameters` text (ours or A1111's) into settings for the studio's form.
pub fn parse_parameters(text: &str) -> Restored {
    let mut r = Restored::default();
    let lines: Vec<&str> = text.lines().collect();
    let settings_at = lines.iter().rposition(|l| l.starts_with("Steps: ")).unwrap_or(lines.len());
    let neg_at = lines[..settings_at].iter().position(|l| l.starts_with("Negative prompt: "));
    let prompt_end = neg_at.unwrap_or(settings_at);
    let mut prompt = lines[..prompt_end].join("\n").trim().to_string();
    if let Some(n) = neg_at {
        let neg = lines[n..settings_at].join("\n");
        r.negative_prompt = neg.trim_start_matches("Negative prompt: ").trim().to_string();
    }
    // LoRA tags (ours and A1111's) follow the prompt: they become the LoRA list.
    if let Ok((without_tags, loras)) = take_lora_tags(&prompt) {
        if !loras.is_empty() {
            prompt = without_tags;
            r.loras = loras;
        }
    }
    // Our styles append a suffix to the prompt: recognise it and restore the style instead.
    if let Some(style) = Style::ALL.into_iter().find(|s| *s != Style::None && prompt.ends_with(s.suffix())) {
        prompt.truncate(prompt.len() - style.suffix().len());
        r.style = style;
        r.restored.push("style");
    }
    if prompt.is_empty() {
        r.not_restored.push("the prompt (the PNG's text has none)".into());
    } else {
        let n = prompt.chars().count();
        if n > limits::MAX_PROMPT_CHARS {
            prompt = prompt.chars().take(limits::MAX_PROMPT_CHARS).collect();
            r.not_restored.push(format!("the end of the prompt ({n} characters; the studio takes {})", limits::MAX_PROMPT_CHARS));
        }
        r.prompt = prompt;
        r.restored.insert(0, "prompt");
    }
    if !r.negative_prompt.is_empty() {
        r.restored.push("negative prompt");
    }
    if !r.loras.is_empty() {
        r.restored.push("LoRAs");
    }
    if settings_at == lines.len() {
        r.not_restored.push("size, steps and seed (no settings line)".into());
        return r;
    }
    for (key, value) in settings_pairs(lines[settings_at]) {
        match key.as_str() {
            "Steps" => match value.parse::<u32>() {
                Ok(s) if (limits::MIN_STEPS..=limits::MAX_STEPS).contains(&s) => {
                    r.steps = Some(s);
                    r.restored.push("steps");
                }
                _ => r.not_restored.push(format!("steps {value} (the studio runs {}-{})", limits::MIN_STEPS, limits::MAX_STEPS)),
            },
            "Seed" => match value.parse::<u64>() {
                Ok(s) if s <= limits::MAX_SEED => {
                    r.seed = Some(s);
                    r.restored.push("seed");
                }
                _ => r.not_restored.push(format!("seed {value} (seeds are 0-{})", limits::MAX_SEED)),
            },
            "Size" => {
                let parsed = value.split_once('x').and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
                match parsed.and_then(|(w, h)| AspectRatio::find(w, h)) {
                    Some(ar) => {
                        r.ratio = Some(ar);
                        r.restored.push("size");
                    }
                    None => r.not_restored.push(format!("size {value} (not one of the studio's 18 sizes)")),
                }
            }
            "Denoising strength" => {
                if let Ok(s) = value.parse::<f32>() {
                    if (limits::MIN_STRENGTH..=limits::MAX_STRENGTH).contains(&s) {
                        r.strength = Some(s);
                    }
                }
            }
            "Variation seed strength" => match value.parse::<f32>() {
                Ok(v) if (0.0..=1.0).contains(&v) => {
                    r.variation = Some(v);
                    r.restored.push("variation");
                }
                _ => r.not_restored.push(format!("variation {value} (0-1)")),
            },
            "Sampler" if value != "Euler" => r.not_restored.push(format!("sampler {value} (this model runs Euler)")),
            "CFG scale" if value.parse::<f32>().map(|c| c > 1.0).unwrap_or(false) => {
                r.not_restored.push(format!("CFG scale {value} (Turbo runs without guidance)"))
            }
            _ => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_with(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        for (k, d) in [(&b"IHDR"[..], &[0u8; 13][..]), (kind, data), (&b"IEND"[..], &[][..])] {
            v.extend((d.len() as u32).to_be_bytes());
            v.extend(k);
            v.extend(d);
            v.extend([0, 0, 0, 0]); // CRC (not checked here)
        }
        v
    }

    #[test]
    fn reads_text_and_uncompressed_itxt_chunks() {
        let t = png_with(b"tEXt", b"parameters\0a fox\nSteps: 8");
        assert_eq!(png_text(&t, "parameters").as_deref(), Some("a fox\nSteps: 8"));
        let i = png_with(b"iTXt", "parameters\0\0\0\0\0ein Fuchs – übermütig".as_bytes());
        assert_eq!(png_text(&i, "parameters").as_deref(), Some("ein Fuchs – übermütig"));
        assert_eq!(png_text(&t, "other"), None);
        assert_eq!(png_text(b"GIF89a....", "parameters"), None);
        // a truncated chunk is not read past the end
        let mut cut = t.clone();
        cut.truncate(30);
        assert_eq!(png_text(&cut, "parameters"), None);
    }

    #[test]
    fn our_parameters_restore_everything_with_the_style() {
        let text = format!(
            "a lighthouse at dusk{}\nNegative prompt: blurry, text\nSteps: 8, Sampler: Euler, Schedule type: Simple, CFG scale: 0, Seed: 1234, Size: 1344x768, Model: Tongyi-MAI/Z-Image-Turbo",
            Style::Cinematic.suffix()
        );
        let r = parse_parameters(&text);
        assert_eq!(r.prompt, "a lighthouse at dusk");
        assert_eq!(r.style, Style::Cinematic);
        assert_eq!(r.negative_prompt, "blurry, text");
        assert_eq!((r.steps, r.seed), (Some(8), Some(1234)));
        assert_eq!(r.ratio.map(|a| (a.width, a.height)), Some((1344, 768)));
        assert!(r.not_restored.is_empty(), "{:?}", r.not_restored);
        assert_eq!(r.restored, vec!["prompt", "style", "negative prompt", "steps", "seed", "size"]);
    }

    #[test]
    fn a1111_parameters_say_what_was_not_restored() {
        let text = "masterpiece, a castle\non a hill\nNegative prompt: lowres\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 5000000000, Size: 512x768, Model hash: abc, Lora hashes: \"x: 1, y: 2\", Version: v1.9";
        let r = parse_parameters(text);
        assert_eq!(r.prompt, "masterpiece, a castle\non a hill");
        assert_eq!(r.negative_prompt, "lowres");
        assert_eq!((r.steps, r.seed, r.ratio), (None, None, None));
        let notes = r.not_restored.join("; ");
        for needle in ["steps 30", "seed 5000000000", "size 512x768", "sampler DPM++ 2M", "CFG scale 7"] {
            assert!(notes.contains(needle), "{needle} in {notes}");
        }
    }

    #[test]
    fn lora_tags_become_the_lora_list() {
        let text = "a fox <lora:ink style:0.7> <lora:detail:-1>\nSteps: 8, Sampler: Euler, Seed: 3, Size: 1024x1024, Variation seed: 3, Variation seed strength: 0.4, Lora hashes: \"ink style: 0123456789ab, detail: ba9876543210\"";
        let r = parse_parameters(text);
        assert_eq!(r.variation, Some(0.4));
        assert_eq!(r.prompt, "a fox");
        assert_eq!(r.loras, vec![LoraChoice::new("ink style", 0.7), LoraChoice::new("detail", -1.0)]);
        assert!(r.restored.contains(&"LoRAs"));
    }

    #[test]
    fn text_without_a_settings_line_restores_the_prompt_only() {
        let r = parse_parameters("just a prompt");
        assert_eq!(r.prompt, "just a prompt");
        assert_eq!(r.restored, vec!["prompt"]);
        assert_eq!(r.not_restored.len(), 1);
    }
}
