//! Property tests (proptest) of the parsers that read what strangers send: the PNG text-chunk
//! reader and the `parameters` parser (app::restore: any dropped file), the generation request
//! (app::types: JSON from any client) and the Transform size. Arbitrary input never panics; our own
//! output reads back to the same settings.

use app::restore::{parse_parameters, png_text};
use app::types::{
    limits, transform_size, AspectRatio, JobEvent, JobKind, JobRequest, Style, WsClientMsg, ASPECT_RATIOS,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// PNG text chunks
// ---------------------------------------------------------------------------------------------

const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// One chunk as it may appear in a hostile file: a kind we read or not, a length field that may
/// lie about the data that follows (too short, too long, near u32::MAX), any data.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![
        Just(*b"tEXt"),
        Just(*b"iTXt"),
        Just(*b"zTXt"),
        Just(*b"IHDR"),
        Just(*b"IEND"),
        any::<[u8; 4]>(),
    ];
    let data = prop_oneof![
        // keyword, NUL, text: what a text chunk holds
        (prop::sample::select(vec!["parameters", "other", ""]), any::<Vec<u8>>())
            .prop_map(|(k, t)| [k.as_bytes(), &[0], &t].concat()),
        // iTXt layout with random flags and language / translated keyword
        (any::<u8>(), any::<u8>(), any::<Vec<u8>>(), any::<Vec<u8>>())
            .prop_map(|(flag, method, lang, text)| [&b"parameters\0"[..], &[flag, method], &lang, &[0], &text].concat()),
        any::<Vec<u8>>(),
    ];
    let length_lie = prop_oneof![
        Just(None),
        any::<u32>().prop_map(Some),
        Just(Some(u32::MAX)),
        Just(Some(u32::MAX - 11)),
        Just(Some(u32::MAX - 7)),
    ];
    (kind, data, length_lie).prop_map(|(kind, data, lie)| {
        let len = lie.unwrap_or(data.len() as u32);
        [&len.to_be_bytes()[..], &kind, &data, &[0, 0, 0, 0]].concat()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn png_text_never_panics_on_any_bytes(bytes in any::<Vec<u8>>(), keyword in "[a-z]{0,12}") {
        let _ = png_text(&bytes, &keyword);
    }

    #[test]
    fn png_text_never_panics_on_hostile_chunks(chunks in prop::collection::vec(chunk(), 0..8), cut in any::<prop::sample::Index>()) {
        let mut file = SIGNATURE.to_vec();
        for c in &chunks {
            file.extend_from_slice(c);
        }
        let _ = png_text(&file, "parameters");
        // and every truncation of it
        let at = cut.index(file.len() + 1);
        let _ = png_text(&file[..at], "parameters");
    }

    /// What a well-formed tEXt (Latin-1) or uncompressed iTXt (UTF-8) chunk holds is read back exactly.
    #[test]
    fn png_text_reads_back_a_well_formed_chunk(text in any::<String>(), before in prop::collection::vec(chunk(), 0..3)) {
        let latin1 = text.chars().all(|c| (c as u32) < 256);
        let (kind, data): (&[u8; 4], Vec<u8>) = if latin1 {
            (b"tEXt", [&b"parameters\0"[..], &text.chars().map(|c| c as u8).collect::<Vec<u8>>()].concat())
        } else {
            (b"iTXt", [&b"parameters\0\0\0\0\0"[..], text.as_bytes()].concat())
        };
        // chunks before it that are well-formed but of other kinds or keywords
        let mut file = SIGNATURE.to_vec();
        for c in before.iter().filter(|c| c.len() >= 12 && u32::from_be_bytes(c[..4].try_into().unwrap()) as usize == c.len() - 12 && &c[4..8] != b"IEND") {
            let is_ours = (&c[4..8] == b"tEXt" || &c[4..8] == b"iTXt") && c[8..].starts_with(b"parameters\0");
            if !is_ours {
                file.extend_from_slice(c);
            }
        }
        file.extend_from_slice(&(data.len() as u32).to_be_bytes());
        file.extend_from_slice(kind);
        file.extend_from_slice(&data);
        file.extend_from_slice(&[0, 0, 0, 0]);
        prop_assert_eq!(png_text(&file, "parameters"), Some(text));
    }
}

// ---------------------------------------------------------------------------------------------
// The `parameters` text
// ---------------------------------------------------------------------------------------------

/// Text made of the pieces the parser looks for, so that arbitrary input reaches its deep paths.
fn parameters_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("Steps: ".to_string()),
        Just("Negative prompt: ".to_string()),
        Just("Seed: ".to_string()),
        Just("Size: ".to_string()),
        Just("Denoising strength: ".to_string()),
        Just("Sampler: ".to_string()),
        Just("CFG scale: ".to_string()),
        Just(", ".to_string()),
        Just(": ".to_string()),
        Just("\"".to_string()),
        Just("\n".to_string()),
        Just("x".to_string()),
        Just(Style::Anime.suffix().to_string()),
        "[0-9]{1,25}",
        "-?[0-9]{1,6}x-?[0-9]{1,6}",
        "[0-9]*\\.[0-9]*(e[+-]?[0-9]{1,3})?",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
}

fn assert_restored_within_limits(text: &str) -> Result<(), TestCaseError> {
    let r = parse_parameters(text);
    prop_assert!(r.prompt.chars().count() <= limits::MAX_PROMPT_CHARS);
    if let Some(s) = r.steps {
        prop_assert!((limits::MIN_STEPS..=limits::MAX_STEPS).contains(&s));
    }
    if let Some(s) = r.seed {
        prop_assert!(s <= limits::MAX_SEED);
    }
    if let Some(a) = r.ratio {
        prop_assert!(ASPECT_RATIOS.contains(&a));
    }
    if let Some(s) = r.strength {
        prop_assert!((limits::MIN_STRENGTH..=limits::MAX_STRENGTH).contains(&s));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any text: no panic, and whatever is restored is within the studio's limits.
    #[test]
    fn parse_parameters_never_panics_and_stays_within_limits(text in any::<String>()) {
        assert_restored_within_limits(&text)?;
    }

    #[test]
    fn parse_parameters_never_panics_on_parameter_like_text(text in parameters_like()) {
        assert_restored_within_limits(&text)?;
    }
}

/// A prompt line the A1111 layout can carry: no CR (line splitting drops a CR before LF) and no
/// line that starts like the layout's own lines (that text is read as the negative prompt or the
/// settings, in A1111's tools too).
fn carried_by_the_layout(text: &str) -> bool {
    !text.contains('\r') && !text.contains('\0') && !text.lines().any(|l| l.starts_with("Negative prompt: ") || l.starts_with("Steps: "))
}

fn prompt_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ,.!?'\"()-]{1,120}",
        // several lines, Latin-1 and beyond (the PNG chunk becomes iTXt)
        prop::collection::vec("[^\r\0]{0,40}", 1..5).prop_map(|lines| lines.join("\n")),
        any::<String>(),
    ]
}

fn generate_request() -> impl Strategy<Value = JobRequest> {
    (
        prompt_text(),
        prop::sample::select(Style::ALL.to_vec()),
        limits::MIN_STEPS..=limits::MAX_STEPS,
        0..=limits::MAX_SEED,
        prop::sample::select(ASPECT_RATIOS.to_vec()),
        prop_oneof![Just(String::new()), prompt_text()],
        (0u32..=20).prop_map(|v| v as f32 / 20.0),
        prop::collection::vec(("[a-z][a-z0-9 _-]{0,11}[a-z0-9]", -40i32..=40), 0..3),
    )
        .prop_map(|(prompt, style, steps, seed, ratio, negative_prompt, variation, loras)| JobRequest {
            prompt,
            style,
            steps,
            seed: Some(seed),
            kind: JobKind::Generate { width: ratio.width, height: ratio.height },
            negative_prompt,
            loras: loras.into_iter().map(|(name, s)| app::types::LoraChoice::new(name, s as f32 / 20.0)).collect(),
            variation,
            variation_seed: None,
            written_prompt: None,
        })
        .prop_filter("valid and carried by the A1111 layout", |r| {
            r.validate().is_ok() && carried_by_the_layout(&r.prompt) && carried_by_the_layout(&r.negative_prompt) && !r.prompt.contains("<lora:")
        })
}

/// The PNG the server writes for a finished request (the same `Parameters` as the server's
/// worker fills in, through the engine's own writer).
fn server_png(req: &JobRequest, width: u32, height: u32, strength: Option<f32>) -> Vec<u8> {
    let params = engine::png_meta::Parameters {
        prompt: req.full_prompt(),
        negative_prompt: req.negative_prompt.clone(),
        steps: req.steps as usize,
        seed: req.seed.expect("the generator sets a seed"),
        width,
        height,
        model: "tiny".into(),
        strength,
        guidance_scale: 0.0,
        loras: req
            .loras
            .iter()
            .map(|l| engine::png_meta::LoraUse { name: l.name.clone(), scale: l.scale, sha256: "0123456789abcdef".into() })
            .collect(),
        variation: Some((req.seed.expect("the generator sets a seed"), req.variation)),
    };
    engine::png_meta::encode_png(&image::RgbImage::new(4, 4), &params).expect("encodes")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Generate: the server's PNG read back by the studio gives the same settings (the prompt as
    /// the model saw it: a prompt that ends like a style's suffix comes back as that style).
    #[test]
    fn our_parameters_round_trip(req in generate_request()) {
        let JobKind::Generate { width, height } = req.kind else { unreachable!() };
        let png = server_png(&req, width, height, None);
        let text = png_text(&png, "parameters").expect("the server's PNG has a parameters chunk");
        let r = parse_parameters(&text);
        prop_assert_eq!(r.style.apply(&r.prompt), req.full_prompt());
        prop_assert_eq!(&r.negative_prompt, req.negative_prompt.trim());
        prop_assert_eq!(r.steps, Some(req.steps));
        prop_assert_eq!(r.seed, req.seed);
        prop_assert_eq!(r.ratio, AspectRatio::find(width, height));
        prop_assert_eq!(&r.loras, &req.loras);
        prop_assert_eq!(r.variation, (req.variation > 0.0).then_some(req.variation));
        prop_assert!(r.not_restored.is_empty(), "{:?} from {:?}", r.not_restored, text);
    }

    /// Transform: the strength comes back exactly (Rust prints the shortest f32 that reads back).
    #[test]
    fn transform_strength_round_trips(req in generate_request(), strength in limits::MIN_STRENGTH..=limits::MAX_STRENGTH, w in 1u32..16384, h in 1u32..16384) {
        let (width, height) = transform_size(w, h);
        let png = server_png(&req, width, height, Some(strength));
        let r = parse_parameters(&png_text(&png, "parameters").unwrap());
        prop_assert_eq!(r.strength, Some(strength));
        prop_assert_eq!(r.ratio, AspectRatio::find(width, height));
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and messages as JSON
// ---------------------------------------------------------------------------------------------

/// Any JSON value, a few levels deep, with the field names our types use.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let key = prop_oneof![
        prop::sample::select(vec![
            "prompt", "style", "steps", "seed", "kind", "mode", "width", "height", "upload_id", "strength",
            "negative_prompt", "type", "job_id",
        ])
        .prop_map(String::from),
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec!["generate", "transform", "watch", "unwatch", "none", "anime", "1024", ""])
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn any_request() -> impl Strategy<Value = JobRequest> {
    let kind = prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(width, height)| JobKind::Generate { width, height }),
        (any::<String>(), any::<f32>()).prop_map(|(upload_id, strength)| JobKind::Transform { upload_id, strength }),
        ("[0-9a-f]{32}", -1.0f32..2.0).prop_map(|(upload_id, strength)| JobKind::Transform { upload_id, strength }),
    ];
    (any::<String>(), prop::sample::select(Style::ALL.to_vec()), any::<u32>(), any::<Option<u64>>(), kind, any::<String>())
        .prop_map(|(prompt, style, steps, seed, kind, negative_prompt)| JobRequest {
            prompt,
            style,
            steps,
            seed,
            kind,
            negative_prompt,
            loras: vec![],
            variation: 0.0,
            variation_seed: None,
            written_prompt: None,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever a client sends: reading it as a request (or a websocket message) never panics, and
    /// a request that reads and validates is within every limit the queue relies on.
    #[test]
    fn any_json_reads_and_validates_without_panic(value in json_value(), raw in any::<String>()) {
        let _ = serde_json::from_str::<JobRequest>(&raw);
        let _ = serde_json::from_str::<WsClientMsg>(&raw);
        let _ = serde_json::from_value::<WsClientMsg>(value.clone());
        if let Ok(req) = serde_json::from_value::<JobRequest>(value) {
            if req.validate().is_ok() {
                assert_valid_request(&req)?;
            }
        }
    }

    #[test]
    fn validate_never_panics_and_admits_only_requests_within_limits(req in any_request()) {
        if req.validate().is_ok() {
            assert_valid_request(&req)?;
        }
    }

    /// A request survives the JSON between browser and server unchanged.
    #[test]
    fn requests_round_trip_through_json(req in any_request().prop_filter("finite strength", |r| match r.kind {
        JobKind::Transform { strength, .. } => strength.is_finite(),
        _ => true,
    })) {
        let back: JobRequest = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        prop_assert_eq!(back, req);
    }

    /// Events the server pushes read back as they were sent.
    #[test]
    fn job_events_round_trip_through_json(job_id in "[0-9a-f]{32}", position in any::<usize>(), step in any::<u32>(), reason in any::<String>()) {
        for ev in [
            JobEvent::Queued { job_id: job_id.clone(), position },
            JobEvent::Step { job_id: job_id.clone(), step, total: step, elapsed_ms: 1, eta_ms: 2, preview: Some(reason.clone()) },
            JobEvent::Error { job_id: job_id.clone(), reason: reason.clone() },
            JobEvent::Cancelled { job_id: job_id.clone() },
        ] {
            let back: JobEvent = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
            prop_assert_eq!(back, ev);
        }
    }

    /// Any upload size: the Transform size keeps both sides in range and in multiples of 16.
    #[test]
    fn transform_size_is_always_in_range(w in side(), h in side()) {
        let (a, b) = transform_size(w, h);
        prop_assert!(a % 16 == 0 && b % 16 == 0, "{}x{} -> {}x{}", w, h, a, b);
        let range = limits::MIN_TRANSFORM_SIDE..=limits::MAX_TRANSFORM_SIDE;
        prop_assert!(range.contains(&a) && range.contains(&b), "{}x{} -> {}x{}", w, h, a, b);
    }
}

/// An image side: any u32, with the edges (0, tiny, huge) drawn as often as the middle; a uniform
/// u32 almost never gives the extreme aspect ratios.
fn side() -> impl Strategy<Value = u32> {
    prop_oneof![any::<u32>(), 0u32..64, 1u32..20_000, (u32::MAX - 64)..=u32::MAX]
}

fn assert_valid_request(req: &JobRequest) -> Result<(), TestCaseError> {
    let prompt = req.prompt.trim();
    prop_assert!(!prompt.is_empty() && prompt.chars().count() <= limits::MAX_PROMPT_CHARS && !prompt.contains('\0'));
    prop_assert!(req.negative_prompt.chars().count() <= limits::MAX_PROMPT_CHARS && !req.negative_prompt.contains('\0'));
    prop_assert!((limits::MIN_STEPS..=limits::MAX_STEPS).contains(&req.steps));
    prop_assert!(req.seed.is_none_or(|s| s <= limits::MAX_SEED));
    match &req.kind {
        JobKind::Generate { width, height } => prop_assert!(AspectRatio::find(*width, *height).is_some()),
        JobKind::Transform { upload_id, strength } => {
            prop_assert!(upload_id.len() == 32 && upload_id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            prop_assert!(strength.is_finite());
            prop_assert!(*strength >= limits::MIN_STRENGTH - 1e-6 && *strength <= limits::MAX_STRENGTH + 1e-6);
        }
    }
    Ok(())
}
