//! Types shared by the browser and the server: one type per concept.
//!
//! * [`JobRequest`]  — what the user asks for (Generate or Transform), sent through a server function.
//! * [`JobTicket`]   — the answer to a submission (job id + queue position).
//! * [`JobEvent`]    — progress events pushed over the `/ws` websocket.
//! * [`WsClientMsg`] — what the browser sends over the websocket (watch / unwatch a job).
//! * [`JobResult`]   — a finished image (also what a share link shows).
//! * [`JobState`]    — the client-side view of a job, folded from [`JobEvent`]s.
//! * [`UploadInfo`]  — an uploaded Transform input after it was resized.
//! * [`ServerInfo`]  — which model is loaded, whether it is the random-weight tiny model.
//! * [`Readiness`]   — what the server is doing (downloading, loading, ready…): `/readyz`'s JSON.
//! * [`EnhanceRequest`] / [`EnhanceTicket`] / [`EnhanceResult`] — a prompt to rewrite into a
//!   detailed one (the Enhance button, `/api/enhance`, `/v1/chat/completions`), its place in the
//!   queue, and the finished text.

use crate::error::StudioError;
use serde::{Deserialize, Serialize};

/// Limits enforced on the server (and mirrored by the UI).
pub mod limits {
    pub const MIN_STEPS: u32 = 4;
    pub const MAX_STEPS: u32 = 16;
    pub const DEFAULT_STEPS: u32 = 8;
    /// Images one submission of the studio makes at most (seeds seed..seed+n-1).
    pub const MAX_BATCH: u32 = 4;
    /// Seeds are 32-bit like the seed Space's; the server picks one when the request has none.
    pub const MAX_SEED: u64 = u32::MAX as u64;
    /// Characters of prompt the user may type (the style suffix is added on top).
    pub const MAX_PROMPT_CHARS: usize = 2000;
    pub const MIN_STRENGTH: f32 = 0.1;
    pub const MAX_STRENGTH: f32 = 1.0;
    pub const DEFAULT_STRENGTH: f32 = 0.6;
    /// Largest accepted upload, in bytes.
    pub const MAX_UPLOAD_BYTES: usize = 20 * 1024 * 1024;
    /// Transform inputs are resized so both sides fall in this range, in multiples of 16.
    pub const MIN_TRANSFORM_SIDE: u32 = 512;
    pub const MAX_TRANSFORM_SIDE: u32 = 2048;
    /// Accepted upload types.
    pub const UPLOAD_TYPES: &[&str] = &["image/png", "image/jpeg", "image/webp"];
    /// LoRAs one job may apply at once.
    pub const MAX_LORAS: usize = 8;
    /// A LoRA's strength range (the page's slider; every API takes the same).
    pub const MIN_LORA_SCALE: f32 = -2.0;
    pub const MAX_LORA_SCALE: f32 = 2.0;
    /// Largest LoRA file the page may upload, in bytes.
    pub const MAX_LORA_UPLOAD_BYTES: usize = 1024 * 1024 * 1024;
    /// New tokens one enhancement may write (the Enhance button asks for the default).
    pub const MAX_ENHANCE_TOKENS: usize = 1024;
    pub const DEFAULT_ENHANCE_TOKENS: usize = 300;
    /// Characters of instructions (a system message) an enhancement may carry.
    pub const MAX_SYSTEM_CHARS: usize = 8000;
}

/// The seed Space's 10 style presets. Each appends a suffix to the prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    #[default]
    None,
    Photorealistic,
    Cinematic,
    Anime,
    DigitalArt,
    OilPainting,
    Watercolor,
    Render3d,
    Fantasy,
    SciFi,
}

impl Style {
    pub const ALL: [Style; 10] = [
        Style::None,
        Style::Photorealistic,
        Style::Cinematic,
        Style::Anime,
        Style::DigitalArt,
        Style::OilPainting,
        Style::Watercolor,
        Style::Render3d,
        Style::Fantasy,
        Style::SciFi,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Style::None => "None",
            Style::Photorealistic => "Photorealistic",
            Style::Cinematic => "Cinematic",
            Style::Anime => "Anime",
            Style::DigitalArt => "Digital Art",
            Style::OilPainting => "Oil Painting",
            Style::Watercolor => "Watercolor",
            Style::Render3d => "3D Render",
            Style::Fantasy => "Fantasy",
            Style::SciFi => "Sci-Fi",
        }
    }

    /// Stable identifier used in `<select>` values and URLs.
    pub fn slug(self) -> &'static str {
        match self {
            Style::None => "none",
            Style::Photorealistic => "photorealistic",
            Style::Cinematic => "cinematic",
            Style::Anime => "anime",
            Style::DigitalArt => "digital_art",
            Style::OilPainting => "oil_painting",
            Style::Watercolor => "watercolor",
            Style::Render3d => "render3d",
            Style::Fantasy => "fantasy",
            Style::SciFi => "sci_fi",
        }
    }

    pub fn from_slug(s: &str) -> Option<Style> {
        Style::ALL.into_iter().find(|st| st.slug() == s)
    }

    pub fn suffix(self) -> &'static str {
        match self {
            Style::None => "",
            Style::Photorealistic => {
                ", photorealistic, ultra detailed, natural lighting, sharp focus, high resolution photograph"
            }
            Style::Cinematic => {
                ", cinematic film still, dramatic lighting, shallow depth of field, anamorphic lens, color graded"
            }
            Style::Anime => ", anime style, cel shading, vibrant colors, clean line art, anime key visual",
            Style::DigitalArt => ", digital art, highly detailed, vivid colors, polished concept art",
            Style::OilPainting => {
                ", oil painting on canvas, visible brushstrokes, rich impasto texture, classical fine art"
            }
            Style::Watercolor => {
                ", watercolor painting, soft washes, bleeding edges, textured paper, delicate pastel tones"
            }
            Style::Render3d => {
                ", 3D render, global illumination, physically based materials, octane render, highly detailed"
            }
            Style::Fantasy => {
                ", epic fantasy art, magical atmosphere, ethereal glow, intricate details, otherworldly"
            }
            Style::SciFi => {
                ", science fiction, futuristic technology, neon lights, sleek design, high-tech atmosphere"
            }
        }
    }

    /// The prompt the model sees: the user's prompt (trimmed) followed by the style suffix.
    pub fn apply(self, prompt: &str) -> String {
        format!("{}{}", prompt.trim(), self.suffix())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RatioGroup {
    Standard,
    Xl,
    Max,
}

impl RatioGroup {
    pub const ALL: [RatioGroup; 3] = [RatioGroup::Standard, RatioGroup::Xl, RatioGroup::Max];
    pub fn label(self) -> &'static str {
        match self {
            RatioGroup::Standard => "Standard",
            RatioGroup::Xl => "XL",
            RatioGroup::Max => "MAX",
        }
    }
}

/// One of the seed Space's 18 output sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AspectRatio {
    pub group: RatioGroup,
    pub width: u32,
    pub height: u32,
    pub ratio: &'static str,
}

impl AspectRatio {
    pub fn label(&self) -> String {
        format!("{} · {}×{}", self.ratio, self.width, self.height)
    }
    /// `"WxH"`, used as the `<select>` value.
    pub fn key(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }
    pub fn from_key(key: &str) -> Option<AspectRatio> {
        ASPECT_RATIOS.iter().copied().find(|r| r.key() == key)
    }
    pub fn find(width: u32, height: u32) -> Option<AspectRatio> {
        ASPECT_RATIOS.iter().copied().find(|r| r.width == width && r.height == height)
    }
}

const fn ar(group: RatioGroup, width: u32, height: u32, ratio: &'static str) -> AspectRatio {
    AspectRatio { group, width, height, ratio }
}

/// Exactly the seed Space's 18 sizes in its three groups.
pub const ASPECT_RATIOS: [AspectRatio; 18] = [
    ar(RatioGroup::Standard, 1024, 1024, "1:1"),
    ar(RatioGroup::Standard, 1344, 768, "16:9"),
    ar(RatioGroup::Standard, 768, 1344, "9:16"),
    ar(RatioGroup::Standard, 1152, 896, "4:3"),
    ar(RatioGroup::Standard, 896, 1152, "3:4"),
    ar(RatioGroup::Standard, 1536, 640, "21:9"),
    ar(RatioGroup::Standard, 1216, 832, "3:2"),
    ar(RatioGroup::Standard, 832, 1216, "2:3"),
    ar(RatioGroup::Xl, 1536, 1536, "1:1"),
    ar(RatioGroup::Xl, 1920, 1088, "16:9"),
    ar(RatioGroup::Xl, 1088, 1920, "9:16"),
    ar(RatioGroup::Xl, 1536, 1152, "4:3"),
    ar(RatioGroup::Xl, 1152, 1536, "3:4"),
    ar(RatioGroup::Max, 2048, 2048, "1:1"),
    ar(RatioGroup::Max, 2048, 1152, "16:9"),
    ar(RatioGroup::Max, 1152, 2048, "9:16"),
    ar(RatioGroup::Max, 2048, 1536, "4:3"),
    ar(RatioGroup::Max, 1536, 2048, "3:4"),
];

pub const DEFAULT_RATIO: AspectRatio = ASPECT_RATIOS[0];

/// Example prompts that fill the prompt box in one click.
pub const EXAMPLE_PROMPTS: &[(&str, &str)] = &[
    ("Lighthouse", "A lone lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the lantern room"),
    ("Fox", "Portrait of a red fox in fresh snow, soft morning light, frost on its whiskers"),
    ("Tea shop", "A cozy tea shop in a rainy Tokyo alley at night, paper lanterns, reflections on wet cobblestones"),
    ("Astronaut", "An astronaut tending a small greenhouse garden on the Moon, Earth rising in the background"),
    ("Market", "A bustling floating market in Bangkok at sunrise, boats full of tropical fruit and flowers"),
    ("Dragon", "A small friendly dragon reading a book by candlelight in an old library"),
    ("Sign", "A neon sign that reads \"OPEN 24 HOURS\" above a retro diner, 1950s style, night"),
    ("Still life", "Still life of lemons, a glass carafe and a blue ceramic bowl on a linen tablecloth"),
];

/// What to make.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum JobKind {
    /// Text to image at one of the 18 sizes.
    Generate { width: u32, height: u32 },
    /// Image to image from a previous upload (its size is the upload's resized size).
    Transform { upload_id: String, strength: f32 },
}

/// The generation request, as the browser sends it to the `submit_job` server function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub prompt: String,
    #[serde(default)]
    pub style: Style,
    pub steps: u32,
    /// `None` = let the server pick a random seed.
    #[serde(default)]
    pub seed: Option<u64>,
    pub kind: JobKind,
    /// What the image should not show (stored with it; Turbo runs without guidance, where it has
    /// no effect on the image).
    #[serde(default)]
    pub negative_prompt: String,
    /// LoRAs of the server's LoRA folder applied for this job, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraChoice>,
    /// 0-1: how far the text conditioning is moved by a perturbation from the variation seed, so
    /// that seeds give more different compositions; 0 (default) is the plain image.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub variation: f32,
    /// The perturbation's seed (A1111's `subseed`); none: the image's own seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation_seed: Option<u64>,
    /// The prompt the user wrote when `prompt` is its enhanced rewrite (kept in the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_prompt: Option<String>,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

/// One LoRA of a job: a file of the server's LoRA folder by name (its file stem) at a strength.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraChoice {
    pub name: String,
    #[serde(default = "default_lora_scale")]
    pub scale: f32,
    /// The file's sha256 (hex), filled by the server when it accepts the job: a worker with a
    /// different file under that name refuses the job instead of drawing something else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn default_lora_scale() -> f32 {
    1.0
}

impl LoraChoice {
    pub fn new(name: impl Into<String>, scale: f32) -> LoraChoice {
        LoraChoice { name: name.into(), scale, sha256: None }
    }
    /// A1111's prompt tag, `<lora:name:scale>`.
    pub fn prompt_tag(&self) -> String {
        // f32's Display is the shortest text that reads back the same: `1`, `0.8`, `-1.25`
        format!("<lora:{}:{}>", self.name, self.scale)
    }
}

/// A LoRA name a request may use: a file stem without path separators or control characters.
pub fn is_valid_lora_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.chars().any(|c| c == '/' || c == '\\' || c == ':' || c == '<' || c == '>' || c.is_control())
}

/// Checks a job's LoRA list without server state (names, count, scales, no repeats).
pub fn validate_loras(loras: &[LoraChoice]) -> Result<(), StudioError> {
    if loras.len() > limits::MAX_LORAS {
        return Err(StudioError::invalid(format!(
            "At most {} LoRAs per image (got {}).",
            limits::MAX_LORAS,
            loras.len()
        )));
    }
    for (i, l) in loras.iter().enumerate() {
        if !is_valid_lora_name(&l.name) {
            return Err(StudioError::invalid(format!("`{}` is not a LoRA name.", l.name)));
        }
        if !l.scale.is_finite() || l.scale < limits::MIN_LORA_SCALE || l.scale > limits::MAX_LORA_SCALE {
            return Err(StudioError::invalid(format!(
                "The strength of LoRA `{}` must be between {} and {} (got {}).",
                l.name,
                limits::MIN_LORA_SCALE,
                limits::MAX_LORA_SCALE,
                l.scale
            )));
        }
        if loras[..i].iter().any(|o| o.name == l.name) {
            return Err(StudioError::invalid(format!("LoRA `{}` is listed twice.", l.name)));
        }
    }
    Ok(())
}

/// Takes A1111's `<lora:name>` / `<lora:name:weight>` tags out of a prompt: the prompt without
/// them (each with the space before it; the rest of the text as it was) and the LoRAs in order. A weight that is not a number is an error.
pub fn take_lora_tags(prompt: &str) -> Result<(String, Vec<LoraChoice>), StudioError> {
    let mut rest = prompt;
    let mut text = String::with_capacity(prompt.len());
    let mut tags = vec![];
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else { break };
        text.push_str(&rest[..start]);
        // the space that separated the tag from the text goes with it
        if text.ends_with(' ') {
            text.pop();
        }
        let inner = &rest[start + "<lora:".len()..start + len];
        let (name, scale) = match inner.rsplit_once(':') {
            Some((n, w)) => {
                let w = w.trim().parse::<f32>().ok().filter(|w| w.is_finite()).ok_or_else(|| {
                    StudioError::invalid(format!("LoRA tag `<lora:{inner}>`: `{w}` is not a weight."))
                })?;
                (n, w)
            }
            None => (inner, 1.0),
        };
        tags.push(LoraChoice::new(name.trim(), scale));
        rest = &rest[start + len + 1..];
    }
    if tags.is_empty() {
        return Ok((prompt.to_string(), tags));
    }
    text.push_str(rest);
    Ok((text.trim().to_string(), tags))
}

/// A LoRA of the server's folder, as the page lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraInfo {
    pub name: String,
    pub size_bytes: u64,
    /// First 12 hex digits of the file's sha256 (A1111's "Lora hashes").
    pub short_hash: String,
    /// Trigger words from the file's metadata (click to add to the prompt).
    #[serde(default)]
    pub trigger_words: Vec<String>,
    /// e.g. "diffusers/PEFT, rank 32"; or why the file cannot be used.
    pub summary: String,
    /// False when the file cannot be read as a LoRA for this model (`summary` says why).
    pub usable: bool,
}

impl JobRequest {
    /// Checks everything that can be checked without server state. The server calls this on every
    /// request whatever the UI allowed.
    pub fn validate(&self) -> Result<(), StudioError> {
        let prompt = self.prompt.trim();
        if prompt.is_empty() {
            return Err(StudioError::invalid("Please enter a prompt."));
        }
        let chars = prompt.chars().count();
        if chars > limits::MAX_PROMPT_CHARS {
            return Err(StudioError::invalid(format!(
                "The prompt is too long ({chars} characters; at most {}).",
                limits::MAX_PROMPT_CHARS
            )));
        }
        if prompt.chars().any(|c| c == '\0') {
            return Err(StudioError::invalid("The prompt contains a NUL character."));
        }
        let neg_chars = self.negative_prompt.chars().count();
        if neg_chars > limits::MAX_PROMPT_CHARS {
            return Err(StudioError::invalid(format!(
                "The negative prompt is too long ({neg_chars} characters; at most {}).",
                limits::MAX_PROMPT_CHARS
            )));
        }
        if self.negative_prompt.contains('\0') {
            return Err(StudioError::invalid("The negative prompt contains a NUL character."));
        }
        if let Some(written) = &self.written_prompt {
            if written.chars().count() > limits::MAX_PROMPT_CHARS || written.contains('\0') {
                return Err(StudioError::invalid(format!(
                    "The original (written) prompt must be at most {} characters without NUL characters.",
                    limits::MAX_PROMPT_CHARS
                )));
            }
        }
        validate_loras(&self.loras)?;
        if !self.variation.is_finite() || !(0.0..=1.0).contains(&self.variation) {
            return Err(StudioError::invalid(format!("Variation must be between 0 and 1 (got {}).", self.variation)));
        }
        if let Some(s) = self.variation_seed {
            if s > limits::MAX_SEED {
                return Err(StudioError::invalid(format!("The variation seed must be between 0 and {} (got {s}).", limits::MAX_SEED)));
            }
        }
        if !(limits::MIN_STEPS..=limits::MAX_STEPS).contains(&self.steps) {
            return Err(StudioError::invalid(format!(
                "Steps must be between {} and {} (got {}).",
                limits::MIN_STEPS,
                limits::MAX_STEPS,
                self.steps
            )));
        }
        if let Some(seed) = self.seed {
            if seed > limits::MAX_SEED {
                return Err(StudioError::invalid(format!(
                    "The seed must be between 0 and {} (got {seed}).",
                    limits::MAX_SEED
                )));
            }
        }
        match &self.kind {
            JobKind::Generate { width, height } => {
                if AspectRatio::find(*width, *height).is_none() {
                    return Err(StudioError::invalid(format!(
                        "{width}×{height} is not one of the 18 supported sizes."
                    )));
                }
            }
            JobKind::Transform { upload_id, strength } => {
                if !is_valid_id(upload_id) {
                    return Err(StudioError::invalid("Please upload an image first."));
                }
                if !strength.is_finite()
                    || *strength < limits::MIN_STRENGTH - 1e-6
                    || *strength > limits::MAX_STRENGTH + 1e-6
                {
                    return Err(StudioError::invalid(format!(
                        "Strength must be between {} and {} (got {strength}).",
                        limits::MIN_STRENGTH,
                        limits::MAX_STRENGTH
                    )));
                }
            }
        }
        Ok(())
    }

    /// The prompt the model sees (style suffix applied).
    pub fn full_prompt(&self) -> String {
        self.style.apply(&self.prompt)
    }
}

/// Ids of jobs, images and uploads: 128 random bits as 32 lowercase hex digits.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Size a Transform input is resized to: keeps the aspect ratio, both sides in 512..=2048,
/// multiples of 16 (extreme aspect ratios are clamped).
pub fn transform_size(width: u32, height: u32) -> (u32, u32) {
    let (w, h) = (width.max(1) as f64, height.max(1) as f64);
    let (min, max) = (limits::MIN_TRANSFORM_SIDE as f64, limits::MAX_TRANSFORM_SIDE as f64);
    let mut scale = 1.0f64;
    if w.max(h) > max {
        scale = max / w.max(h);
    }
    if w.min(h) * scale < min {
        scale = min / w.min(h);
    }
    // clamped before the cast: an extreme aspect ratio scales the long side past u32 (found by
    // app/tests/properties.rs)
    let side = |x: f64| ((x * scale / 16.0).round() * 16.0).clamp(min, max) as u32;
    (side(w), side(h))
}

/// Answer to a successful submission.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobTicket {
    pub job_id: String,
    /// 1-based place in the waiting line at submission time.
    pub position: usize,
    /// The seed that will be used (picked by the server when the request had none).
    pub seed: u64,
    pub width: u32,
    pub height: u32,
}

/// Time spent in each phase, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimingsMs {
    pub queued_ms: u64,
    pub text_encoding_ms: u64,
    pub vae_encode_ms: u64,
    pub denoising_ms: u64,
    pub vae_decode_ms: u64,
    pub total_ms: u64,
}

/// A finished image. Stored next to the PNG so share links can show it later.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub image_id: String,
    /// Path of the PNG, e.g. `/images/<id>.png`.
    pub image_url: String,
    /// Path of the share page, e.g. `/share/<id>`.
    pub share_url: String,
    pub prompt: String,
    pub style: Style,
    pub seed: u64,
    pub steps: u32,
    pub width: u32,
    pub height: u32,
    /// Set for Transform results.
    pub strength: Option<f32>,
    pub model: String,
    pub tiny_model: bool,
    pub timings: TimingsMs,
    /// The prompt was longer than the text encoder's context and was cut.
    pub prompt_truncated: bool,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    #[serde(default)]
    pub negative_prompt: String,
    /// Which door the request came in by.
    #[serde(default)]
    pub source: JobSource,
    /// The LoRAs applied, with their files' hashes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraChoice>,
    /// The variation strength (0: none) and the seed its perturbation came from.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub variation: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation_seed: Option<u64>,
    /// The prompt the user wrote, when `prompt` (what made the image) is its enhanced rewrite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_prompt: Option<String>,
}

impl JobResult {
    /// "ink style 0.8, detail -1" (empty without LoRAs).
    pub fn loras_text(&self) -> String {
        self.loras.iter().map(|l| format!("{} {}", l.name, l.scale)).collect::<Vec<_>>().join(", ")
    }
}

/// Where a job was submitted: the studio page, `/api/generate`, the OpenAI or the A1111 API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobSource {
    #[default]
    Studio,
    HttpApi,
    #[serde(rename = "openai")]
    OpenAi,
    A1111,
}

impl JobSource {
    pub fn as_str(self) -> &'static str {
        match self {
            JobSource::Studio => "studio",
            JobSource::HttpApi => "http_api",
            JobSource::OpenAi => "openai",
            JobSource::A1111 => "a1111",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            JobSource::Studio => "Studio",
            JobSource::HttpApi => "HTTP API",
            JobSource::OpenAi => "OpenAI API",
            JobSource::A1111 => "A1111 API",
        }
    }
}

/// One image of the history, with its thumbnail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryItem {
    pub result: JobResult,
    /// A small JPEG, e.g. `/thumbs/<id>.jpg`.
    pub thumb_url: String,
}

/// One page of the history, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub items: Vec<HistoryItem>,
    /// Matching images in all pages.
    pub total: u64,
    /// 0-based.
    pub page: u32,
    pub page_size: u32,
}

/// Progress events of one job, pushed over the `/ws` websocket as JSON (`{"type": "...", ...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    /// Waiting; `position` is the 1-based place in line (1 = next).
    Queued { job_id: String, position: usize },
    /// A worker picked the job up.
    Started { job_id: String, width: u32, height: u32, steps: u32, seed: u64 },
    /// One denoising step finished.
    Step {
        job_id: String,
        step: u32,
        total: u32,
        elapsed_ms: u64,
        eta_ms: u64,
        /// Small JPEG of the current estimate as a `data:` URL.
        preview: Option<String>,
    },
    Done { job_id: String, result: JobResult },
    Error { job_id: String, reason: String },
    Cancelled { job_id: String },
    /// The job's worker was lost (a Redis deployment: the process died mid-job); another worker
    /// runs it again from the start. Its steps count again from 0.
    Restarted { job_id: String, reason: String },
    /// A worker began rewriting an enhancement job's prompt (it waited in the queue until now).
    EnhanceStarted { job_id: String },
    /// More of an enhancement's text: `delta` follows what came before; `tokens` new tokens so far.
    EnhanceText { job_id: String, delta: String, tokens: usize },
    /// An enhancement finished (its text whole).
    EnhanceDone { job_id: String, result: EnhanceResult },
}

impl JobEvent {
    pub fn job_id(&self) -> &str {
        match self {
            JobEvent::Queued { job_id, .. }
            | JobEvent::Started { job_id, .. }
            | JobEvent::Step { job_id, .. }
            | JobEvent::Done { job_id, .. }
            | JobEvent::Error { job_id, .. }
            | JobEvent::Cancelled { job_id }
            | JobEvent::Restarted { job_id, .. }
            | JobEvent::EnhanceStarted { job_id }
            | JobEvent::EnhanceText { job_id, .. }
            | JobEvent::EnhanceDone { job_id, .. } => job_id,
        }
    }
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEvent::Done { .. } | JobEvent::Error { .. } | JobEvent::Cancelled { .. } | JobEvent::EnhanceDone { .. }
        )
    }
}

/// Browser → server messages on the websocket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsClientMsg {
    /// Send me this job's events; the server answers at once with its latest state.
    Watch { job_id: String },
    Unwatch { job_id: String },
}

/// Where a job stands, as the UI shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobPhase {
    Queued { position: usize },
    Running { step: u32, total: u32, elapsed_ms: u64, eta_ms: u64 },
    Done(Box<JobResult>),
    Failed(String),
    Cancelled,
}

/// Client-side state of one job, folded from its events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub job_id: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub phase: JobPhase,
    pub preview: Option<String>,
    /// Number of step events seen (the preview changes with each).
    pub steps_seen: u32,
    /// Set once the user pressed Cancel (until the server confirms).
    pub cancel_requested: bool,
}

impl JobState {
    pub fn from_ticket(t: &JobTicket) -> JobState {
        JobState {
            job_id: t.job_id.clone(),
            seed: t.seed,
            width: t.width,
            height: t.height,
            phase: JobPhase::Queued { position: t.position },
            preview: None,
            steps_seen: 0,
            cancel_requested: false,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.phase, JobPhase::Done(_) | JobPhase::Failed(_) | JobPhase::Cancelled)
    }

    /// Applies one event. Events of other jobs are ignored; a finished job stays finished.
    pub fn apply(&mut self, ev: &JobEvent) {
        if ev.job_id() != self.job_id || self.is_terminal() {
            return;
        }
        match ev {
            JobEvent::Queued { position, .. } => {
                self.phase = JobPhase::Queued { position: *position };
            }
            JobEvent::Started { width, height, steps, seed, .. } => {
                self.width = *width;
                self.height = *height;
                self.seed = *seed;
                self.phase =
                    JobPhase::Running { step: 0, total: *steps, elapsed_ms: 0, eta_ms: 0 };
            }
            JobEvent::Step { step, total, elapsed_ms, eta_ms, preview, .. } => {
                self.phase = JobPhase::Running {
                    step: *step,
                    total: *total,
                    elapsed_ms: *elapsed_ms,
                    eta_ms: *eta_ms,
                };
                self.steps_seen += 1;
                if preview.is_some() {
                    self.preview = preview.clone();
                }
            }
            JobEvent::Done { result, .. } => {
                self.seed = result.seed;
                self.phase = JobPhase::Done(Box::new(result.clone()));
            }
            JobEvent::Error { reason, .. } => self.phase = JobPhase::Failed(reason.clone()),
            JobEvent::Cancelled { .. } => self.phase = JobPhase::Cancelled,
            JobEvent::Restarted { .. } => {
                let total = match self.phase {
                    JobPhase::Running { total, .. } => total,
                    _ => 0,
                };
                self.phase = JobPhase::Running { step: 0, total, elapsed_ms: 0, eta_ms: 0 };
            }
            // an image job has none of these (an enhancement's state is `EnhanceState`)
            JobEvent::EnhanceStarted { .. } | JobEvent::EnhanceText { .. } | JobEvent::EnhanceDone { .. } => {}
        }
    }

    /// Fraction done, 0..=1.
    pub fn progress(&self) -> f64 {
        match &self.phase {
            JobPhase::Queued { .. } => 0.0,
            JobPhase::Running { step, total, .. } => {
                if *total == 0 {
                    0.0
                } else {
                    (*step as f64 / *total as f64).clamp(0.0, 1.0)
                }
            }
            JobPhase::Done(_) => 1.0,
            JobPhase::Failed(_) | JobPhase::Cancelled => 0.0,
        }
    }
}

/// A prompt to rewrite into one detailed image prompt by the model's own text encoder run as a
/// language model. Missing fields take the defaults (our instructions, 300 new tokens, sampling at
/// temperature 0.7 / top-p 0.8 with a random seed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnhanceRequest {
    pub prompt: String,
    /// The instructions (system message); `None`: ours; `""`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// 0: greedy (the same text every time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Sampling seed: the same seed gives the same text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Answer with server-sent events (`/api/enhance`; the page and the server functions ignore it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

impl EnhanceRequest {
    pub const DEFAULT_TEMPERATURE: f32 = 0.7;
    pub const DEFAULT_TOP_P: f32 = 0.8;

    pub fn new(prompt: impl Into<String>) -> EnhanceRequest {
        EnhanceRequest { prompt: prompt.into(), system: None, max_new_tokens: None, temperature: None, top_p: None, seed: None, stream: false }
    }

    /// Checks everything that can be checked without the model.
    pub fn validate(&self) -> Result<(), StudioError> {
        let prompt = self.prompt.trim();
        if prompt.is_empty() {
            return Err(StudioError::invalid("Please enter a prompt to enhance."));
        }
        let chars = prompt.chars().count();
        if chars > limits::MAX_PROMPT_CHARS {
            return Err(StudioError::invalid(format!(
                "The prompt is too long ({chars} characters; at most {}).",
                limits::MAX_PROMPT_CHARS
            )));
        }
        if let Some(system) = &self.system {
            if system.chars().count() > limits::MAX_SYSTEM_CHARS {
                return Err(StudioError::invalid(format!("The instructions are too long (at most {} characters).", limits::MAX_SYSTEM_CHARS)));
            }
        }
        if prompt.contains('\0') || self.system.as_deref().is_some_and(|s| s.contains('\0')) {
            return Err(StudioError::invalid("The prompt contains a NUL character."));
        }
        if let Some(n) = self.max_new_tokens {
            if n == 0 || n > limits::MAX_ENHANCE_TOKENS {
                return Err(StudioError::invalid(format!(
                    "max_new_tokens must be between 1 and {} (got {n}).",
                    limits::MAX_ENHANCE_TOKENS
                )));
            }
        }
        if let Some(t) = self.temperature {
            if !t.is_finite() || !(0.0..=2.0).contains(&t) {
                return Err(StudioError::invalid(format!("temperature must be between 0 and 2 (got {t}).")));
            }
        }
        if let Some(p) = self.top_p {
            if !p.is_finite() || p <= 0.0 || p > 1.0 {
                return Err(StudioError::invalid(format!("top_p must be above 0 and at most 1 (got {p}).")));
            }
        }
        Ok(())
    }
}

/// The answer to an enhancement's submission; its text comes over `/ws` as `enhance_*` events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnhanceTicket {
    pub job_id: String,
    /// 1-based place in the queue it shares with the images.
    pub position: usize,
    /// The sampling seed used (picked by the server when the request had none).
    pub seed: u64,
}

/// A finished enhancement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnhanceResult {
    /// The new prompt (think blocks removed, trimmed).
    pub text: String,
    /// New tokens written.
    pub tokens: usize,
    /// Tokens of the templated prompt the model read.
    pub prompt_tokens: usize,
    /// `stop` (the model ended) or `length` (`max_new_tokens` reached), as OpenAI says it.
    pub finish_reason: String,
    pub seed: u64,
    /// Set when the prompt was cut to fit the context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncation_note: Option<String>,
    pub model: String,
    /// Random weights: the text is gibberish.
    pub tiny_model: bool,
    pub queued_ms: u64,
    pub first_token_ms: u64,
    pub total_ms: u64,
}

/// Where an enhancement stands, as the page shows it, folded from its events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EnhancePhase {
    Queued { position: usize },
    Writing,
    Done(Box<EnhanceResult>),
    Failed(String),
    Cancelled,
}

/// Client-side state of one enhancement: the text so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnhanceState {
    pub job_id: String,
    pub phase: EnhancePhase,
    pub text: String,
    pub tokens: usize,
}

impl EnhanceState {
    pub fn from_ticket(t: &EnhanceTicket) -> EnhanceState {
        EnhanceState { job_id: t.job_id.clone(), phase: EnhancePhase::Queued { position: t.position }, text: String::new(), tokens: 0 }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.phase, EnhancePhase::Done(_) | EnhancePhase::Failed(_) | EnhancePhase::Cancelled)
    }

    /// Applies one event; events of other jobs are ignored, a finished enhancement stays finished.
    pub fn apply(&mut self, ev: &JobEvent) {
        if ev.job_id() != self.job_id || self.is_terminal() {
            return;
        }
        match ev {
            JobEvent::Queued { position, .. } => self.phase = EnhancePhase::Queued { position: *position },
            JobEvent::EnhanceStarted { .. } => {
                self.phase = EnhancePhase::Writing;
                self.text.clear();
            }
            JobEvent::EnhanceText { delta, tokens, .. } => {
                self.phase = EnhancePhase::Writing;
                self.text.push_str(delta);
                self.tokens = *tokens;
            }
            JobEvent::EnhanceDone { result, .. } => {
                self.text = result.text.clone();
                self.tokens = result.tokens;
                self.phase = EnhancePhase::Done(Box::new(result.clone()));
            }
            JobEvent::Error { reason, .. } => self.phase = EnhancePhase::Failed(reason.clone()),
            JobEvent::Cancelled { .. } => self.phase = EnhancePhase::Cancelled,
            JobEvent::Started { .. } | JobEvent::Step { .. } | JobEvent::Done { .. } | JobEvent::Restarted { .. } => {}
        }
    }
}

/// An uploaded Transform input, after it was decoded and resized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadInfo {
    pub upload_id: String,
    /// Path of the resized input, e.g. `/uploads/<id>.png`.
    pub url: String,
    pub original_width: u32,
    pub original_height: u32,
    /// Size the Transform will run at.
    pub width: u32,
    pub height: u32,
}

/// What the server runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub model: String,
    /// The built-in tiny model with random weights: images look like noise.
    pub tiny_model: bool,
    /// Random weights of any size (the tiny model, or `--model random` for benchmarks).
    #[serde(default)]
    pub random_weights: bool,
    pub device: String,
    pub queue_capacity: usize,
    pub version: String,
}

/// What the server is doing: the JSON of `/readyz` (200 when `ready`, else 503), which the page
/// polls while the model downloads or loads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub state: ServerState,
    pub model_loaded: bool,
    pub model: String,
    /// The state in a sentence for people.
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueDepth>,
}

/// The server's phase, from start to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Fetching the model's files into the Hugging Face cache.
    Downloading,
    /// Reading the weights into memory.
    Loading,
    /// The GPU driver compiles the kernels (first start on a machine).
    CompilingKernels,
    /// One small generation so that the first user does not wait for one-time work.
    WarmingUp,
    Ready,
    /// Stopping: no new jobs.
    Draining,
    /// The model could not be loaded; the message says why. Stored images stay served.
    Failed,
    /// A Redis front end whose Redis does not answer.
    #[serde(rename = "redis unreachable")]
    RedisUnreachable,
}

/// A download's progress in `/readyz`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DownloadStatus {
    /// The file being fetched.
    pub file: String,
    pub files_done: u32,
    pub files_total: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_sec: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerCounts {
    pub total: usize,
    pub busy: usize,
    pub idle: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDepth {
    /// `redis` for a front end of a Redis queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Jobs waiting (unknown when Redis does not answer).
    pub waiting: Option<usize>,
    pub capacity: usize,
}

/// "1.5 GB", "340 MB" (powers of 1000, as download tools count).
pub fn fmt_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// "45 s", "12 min", "2 h 5 min".
pub fn fmt_duration(secs: u64) -> String {
    match secs {
        s if s < 90 => format!("{s} s"),
        s if s < 5400 => format!("{} min", (s + 30) / 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

impl DownloadStatus {
    /// "3.2 GB of 32.8 GB at 85 MB/s, about 6 min left"
    pub fn summary(&self) -> String {
        let mut s = format!("{} of {}", fmt_bytes(self.bytes_done), fmt_bytes(self.bytes_total));
        if self.bytes_per_sec > 0 {
            s.push_str(&format!(" at {}/s", fmt_bytes(self.bytes_per_sec)));
        }
        if let Some(eta) = self.eta_secs {
            s.push_str(&format!(", about {} left", fmt_duration(eta)));
        }
        s
    }
}

/// Formats milliseconds as "1.2 s" / "850 ms".
pub fn fmt_ms(ms: u64) -> String {
    if ms >= 1000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_taken_out_of_prompts_with_their_weights() {
        let (p, t) = take_lora_tags("a harbour <lora:zxc style:0.8>, at dusk <lora:detail> <lora:neg:-1.5>").unwrap();
        assert_eq!(p, "a harbour, at dusk");
        let got: Vec<(&str, f32)> = t.iter().map(|l| (l.name.as_str(), l.scale)).collect();
        assert_eq!(got, vec![("zxc style", 0.8), ("detail", 1.0), ("neg", -1.5)]);
        assert_eq!(take_lora_tags("no  tags here").unwrap(), ("no  tags here".to_string(), vec![]));
        assert!(take_lora_tags("x <lora:a:lots>").unwrap_err().reason.contains("`lots` is not a weight"));
        assert_eq!(take_lora_tags("<lora:a:1> only tags").unwrap().0, "only tags");
        assert_eq!(LoraChoice::new("a b", -0.5).prompt_tag(), "<lora:a b:-0.5>");
        assert_eq!(LoraChoice::new("x", 1.0).prompt_tag(), "<lora:x:1>");
    }

    #[test]
    fn lora_lists_are_checked() {
        let ok = vec![LoraChoice::new("style", 0.8), LoraChoice::new("detail", -2.0)];
        assert!(validate_loras(&ok).is_ok());
        let cases: Vec<(Vec<LoraChoice>, &str)> = vec![
            (vec![LoraChoice::new("../etc", 1.0)], "not a LoRA name"),
            (vec![LoraChoice::new("", 1.0)], "not a LoRA name"),
            (vec![LoraChoice::new("a", 2.5)], "between -2 and 2"),
            (vec![LoraChoice::new("a", f32::NAN)], "between -2 and 2"),
            (vec![LoraChoice::new("a", 1.0), LoraChoice::new("a", 0.5)], "listed twice"),
            ((0..9).map(|i| LoraChoice::new(format!("l{i}"), 1.0)).collect(), "At most 8"),
        ];
        for (loras, why) in cases {
            let e = validate_loras(&loras).unwrap_err().reason;
            assert!(e.contains(why), "{why}: {e}");
        }
        // old clients' requests (no `loras` field) still parse, and a choice without a scale is 1
        let r: JobRequest = serde_json::from_str(r#"{"prompt":"p","steps":8,"kind":{"mode":"generate","width":1024,"height":1024}}"#).unwrap();
        assert!(r.loras.is_empty());
        let c: LoraChoice = serde_json::from_str(r#"{"name":"x"}"#).unwrap();
        assert_eq!(c.scale, 1.0);
    }

    fn gen_req() -> JobRequest {
        JobRequest {
            negative_prompt: String::new(),
            prompt: "a cat".into(),
            style: Style::None,
            steps: 8,
            seed: Some(42),
            kind: JobKind::Generate { width: 1024, height: 1024 },
            loras: vec![],
            variation: 0.0,
            variation_seed: None,
            written_prompt: None,
        }
    }

    #[test]
    fn eighteen_ratios_in_three_groups() {
        assert_eq!(ASPECT_RATIOS.len(), 18);
        let count = |g| ASPECT_RATIOS.iter().filter(|r| r.group == g).count();
        assert_eq!(count(RatioGroup::Standard), 8);
        assert_eq!(count(RatioGroup::Xl), 5);
        assert_eq!(count(RatioGroup::Max), 5);
        for r in ASPECT_RATIOS {
            assert_eq!(r.width % 16, 0);
            assert_eq!(r.height % 16, 0);
            assert_eq!(AspectRatio::from_key(&r.key()), Some(r));
        }
    }

    #[test]
    fn ten_styles_with_unique_slugs() {
        assert_eq!(Style::ALL.len(), 10);
        for s in Style::ALL {
            assert_eq!(Style::from_slug(s.slug()), Some(s));
        }
        assert_eq!(Style::None.apply("  cat "), "cat");
        assert!(Style::Anime.apply("cat").starts_with("cat, anime"));
    }

    #[test]
    fn validation() {
        assert!(gen_req().validate().is_ok());
        let mut r = gen_req();
        r.prompt = "   ".into();
        assert!(r.validate().unwrap_err().reason.contains("prompt"));
        let mut r = gen_req();
        r.steps = 3;
        assert!(r.validate().is_err());
        r.steps = 17;
        assert!(r.validate().is_err());
        let mut r = gen_req();
        r.seed = Some(limits::MAX_SEED + 1);
        assert!(r.validate().is_err());
        let mut r = gen_req();
        r.kind = JobKind::Generate { width: 1000, height: 1000 };
        assert!(r.validate().is_err());
        let mut r = gen_req();
        r.prompt = "x".repeat(limits::MAX_PROMPT_CHARS + 1);
        assert!(r.validate().is_err());
        let mut r = gen_req();
        r.kind = JobKind::Transform { upload_id: "0".repeat(32), strength: 0.05 };
        assert!(r.validate().is_err());
        r.kind = JobKind::Transform { upload_id: "0".repeat(32), strength: f32::NAN };
        assert!(r.validate().is_err());
        r.kind = JobKind::Transform { upload_id: "../etc/passwd".into(), strength: 0.5 };
        assert!(r.validate().is_err());
        r.kind = JobKind::Transform { upload_id: "0".repeat(32), strength: 0.5 };
        assert!(r.validate().is_ok());
    }

    #[test]
    fn transform_sizes() {
        assert_eq!(transform_size(1024, 1024), (1024, 1024));
        assert_eq!(transform_size(4000, 3000), (2048, 1536));
        assert_eq!(transform_size(300, 200), (768, 512));
        assert_eq!(transform_size(1000, 800), (1008, 800));
        // extreme aspect: clamped
        assert_eq!(transform_size(5000, 500), (2048, 512));
        for (w, h) in [(1, 1), (17, 9999), (640, 480), (1920, 1080)] {
            let (a, b) = transform_size(w, h);
            assert!(a % 16 == 0 && b % 16 == 0);
            assert!((512..=2048).contains(&a) && (512..=2048).contains(&b));
        }
    }

    #[test]
    fn events_serialize_with_type_tag() {
        let ev = JobEvent::Queued { job_id: "a".into(), position: 2 };
        let s = serde_json::to_string(&ev).unwrap();
        assert_eq!(s, r#"{"type":"queued","job_id":"a","position":2}"#);
        let back: JobEvent = serde_json::from_str(&s).unwrap();
        assert_eq!(back, ev);
        let msg: WsClientMsg = serde_json::from_str(r#"{"type":"watch","job_id":"x"}"#).unwrap();
        assert_eq!(msg, WsClientMsg::Watch { job_id: "x".into() });
    }

    #[test]
    fn a_restarted_job_counts_its_steps_again() {
        let t = JobTicket { job_id: "j".into(), position: 1, seed: 1, width: 1024, height: 1024 };
        let mut st = JobState::from_ticket(&t);
        st.apply(&JobEvent::Step { job_id: "j".into(), step: 3, total: 8, elapsed_ms: 900, eta_ms: 1500, preview: None });
        let ev = JobEvent::Restarted { job_id: "j".into(), reason: "lost".into() };
        assert_eq!(serde_json::to_string(&ev).unwrap(), r#"{"type":"restarted","job_id":"j","reason":"lost"}"#);
        st.apply(&ev);
        assert_eq!(st.phase, JobPhase::Running { step: 0, total: 8, elapsed_ms: 0, eta_ms: 0 });
        assert!(!st.is_terminal());
    }

    #[test]
    fn job_state_folds_events() {
        let t = JobTicket { job_id: "j".into(), position: 2, seed: 1, width: 1024, height: 1024 };
        let mut st = JobState::from_ticket(&t);
        st.apply(&JobEvent::Queued { job_id: "j".into(), position: 1 });
        assert_eq!(st.phase, JobPhase::Queued { position: 1 });
        st.apply(&JobEvent::Started { job_id: "j".into(), width: 1024, height: 1024, steps: 8, seed: 1 });
        st.apply(&JobEvent::Step {
            job_id: "j".into(),
            step: 4,
            total: 8,
            elapsed_ms: 100,
            eta_ms: 100,
            preview: Some("data:x".into()),
        });
        assert_eq!(st.progress(), 0.5);
        assert_eq!(st.steps_seen, 1);
        st.apply(&JobEvent::Step {
            job_id: "other".into(),
            step: 8,
            total: 8,
            elapsed_ms: 1,
            eta_ms: 0,
            preview: None,
        });
        assert_eq!(st.progress(), 0.5);
        st.apply(&JobEvent::Cancelled { job_id: "j".into() });
        assert_eq!(st.phase, JobPhase::Cancelled);
        st.apply(&JobEvent::Queued { job_id: "j".into(), position: 1 });
        assert_eq!(st.phase, JobPhase::Cancelled, "terminal states are sticky");
    }
    #[test]
    fn enhance_requests_are_checked_and_events_fold() {
        assert!(EnhanceRequest::new("a cat").validate().is_ok());
        let bad = |f: &dyn Fn(&mut EnhanceRequest), why: &str| {
            let mut r = EnhanceRequest::new("a cat");
            f(&mut r);
            let e = r.validate().unwrap_err().reason;
            assert!(e.contains(why), "{why}: {e}");
        };
        bad(&|r| r.prompt = "  ".into(), "enter a prompt");
        bad(&|r| r.max_new_tokens = Some(0), "max_new_tokens");
        bad(&|r| r.max_new_tokens = Some(limits::MAX_ENHANCE_TOKENS + 1), "max_new_tokens");
        bad(&|r| r.temperature = Some(f32::NAN), "temperature");
        bad(&|r| r.temperature = Some(-1.0), "temperature");
        bad(&|r| r.top_p = Some(0.0), "top_p");
        bad(&|r| r.prompt = "x".repeat(limits::MAX_PROMPT_CHARS + 1), "too long");
        assert!(serde_json::from_str::<EnhanceRequest>(r#"{"prompt":"x","temprature":1}"#).is_err(), "unknown fields are refused");
        let t = EnhanceTicket { job_id: "e".into(), position: 2, seed: 5 };
        let mut st = EnhanceState::from_ticket(&t);
        st.apply(&JobEvent::EnhanceStarted { job_id: "e".into() });
        st.apply(&JobEvent::EnhanceText { job_id: "e".into(), delta: "a red".into(), tokens: 2 });
        st.apply(&JobEvent::EnhanceText { job_id: "other".into(), delta: "zzz".into(), tokens: 9 });
        st.apply(&JobEvent::EnhanceText { job_id: "e".into(), delta: " fox".into(), tokens: 3 });
        assert_eq!((st.text.as_str(), st.tokens, &st.phase), ("a red fox", 3, &EnhancePhase::Writing));
        let ev = JobEvent::EnhanceText { job_id: "e".into(), delta: "x".into(), tokens: 4 };
        assert_eq!(serde_json::to_string(&ev).unwrap(), r#"{"type":"enhance_text","job_id":"e","delta":"x","tokens":4}"#);
        st.apply(&JobEvent::Cancelled { job_id: "e".into() });
        assert!(st.is_terminal());
        // an image job's state ignores enhancement events
        let mut img = JobState::from_ticket(&JobTicket { job_id: "e".into(), position: 1, seed: 1, width: 1024, height: 1024 });
        img.apply(&ev);
        assert_eq!(img.phase, JobPhase::Queued { position: 1 });
    }
}
