//! The prompt tokenizer of the Qwen3 text encoder, and the small byte-level tokenizer of the
//! built-in `tiny` model.
//!
//! The pipeline wraps the prompt in the Qwen3 chat template (`enable_thinking=True`, generation
//! prompt on, so no think block), tokenizes it without extra special tokens, and truncates it on
//! the right to 512 ids, as `ZImagePipeline._encode_prompt` does with
//! `tokenizer(..., padding="max_length", max_length=512, truncation=True)`. The text is put in
//! Unicode NFC first: transformers (>= 5) loads any `Qwen2Tokenizer` with an NFC normalizer, and
//! the real Qwen3 `tokenizer.json` carries one anyway (NFC is idempotent). Padding is not
//! reproduced: the encoder is causal, so pad positions never influence the real ones and the
//! pipeline drops them afterwards.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizedString, Tokenizer};

use crate::error::{Error, Result};

/// Longest token sequence the pipeline feeds the text encoder (template included).
pub const MAX_PROMPT_TOKENS: usize = 512;

/// Special tokens of the chat template; the tiny tokenizer gives them ids 256, 257, 258.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// A tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// Token ids of the templated prompt, at most [`MAX_PROMPT_TOKENS`].
    pub ids: Vec<u32>,
    /// The token count before truncation, when the templated prompt was longer than
    /// [`MAX_PROMPT_TOKENS`] (so the prompt's tail was dropped); `None` otherwise.
    pub truncated_from: Option<usize>,
}

/// The text encoder's tokenizer plus the Qwen3 chat template.
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    max_len: usize,
    /// The model's own chat template (the prompt enhancer's formatting), or why there is none.
    chat_template: std::result::Result<std::sync::Arc<crate::chat_template::ChatTemplate>, String>,
}

impl PromptTokenizer {
    /// Wraps a loaded tokenizer. Any padding or truncation stored in it is switched off: the
    /// wrapper truncates itself and never pads.
    pub fn new(mut inner: Tokenizer) -> Result<Self> {
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            inner,
            max_len: MAX_PROMPT_TOKENS,
            chat_template: Err("the tokenizer was loaded without its tokenizer_config.json".into()),
        })
    }

    /// Sets the chat template the prompt enhancer formats its messages with.
    pub fn with_chat_template(mut self, template: crate::chat_template::ChatTemplate) -> Self {
        self.chat_template = Ok(std::sync::Arc::new(template));
        self
    }

    /// The model's chat template, or a clear error naming why there is none.
    pub fn chat_template(&self) -> Result<&crate::chat_template::ChatTemplate> {
        self.chat_template.as_deref().map_err(|why| Error::InvalidRequest(format!("no chat template: {why}")))
    }

    /// Loads `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let mut tok = Self::new(inner)?;
        // A missing or broken chat template only matters to the enhancer: images still work.
        let dir = path.parent().unwrap_or(Path::new("."));
        tok.chat_template = match crate::chat_template::ChatTemplate::from_tokenizer_dir(dir) {
            Ok(Some(t)) => Ok(std::sync::Arc::new(t)),
            Ok(None) => Err(format!("{} has no chat_template.jinja and no chat_template in tokenizer_config.json", dir.display())),
            Err(e) => Err(e.to_string()),
        };
        Ok(tok)
    }

    /// The tokenizer of the built-in tiny model.
    pub fn tiny() -> Result<Self> {
        let template = crate::chat_template::ChatTemplate::from_tokenizer_config(&tiny_tokenizer_config())?
            .expect("the tiny tokenizer config has a chat template");
        Ok(Self::new(tiny_tokenizer()?)?.with_chat_template(template))
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The maximum number of ids [`encode`](Self::encode) returns (512).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The prompt in the Qwen3 chat template, as `apply_chat_template(..., tokenize=False,
    /// add_generation_prompt=True, enable_thinking=True)` renders a single user message.
    pub fn chat_text(prompt: &str) -> String {
        format!("{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n")
    }

    /// Token ids of `text` as is (no template, no extra special tokens, no truncation).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Templates, NFC-normalizes, tokenizes and right-truncates the prompt to 512 ids.
    pub fn encode(&self, prompt: &str) -> Result<EncodedPrompt> {
        let mut text = NormalizedString::from(Self::chat_text(prompt));
        text.nfc();
        let mut ids = self.encode_raw(text.get())?;
        let truncated_from = if ids.len() > self.max_len {
            let n = ids.len();
            ids.truncate(self.max_len);
            Some(n)
        } else {
            None
        };
        Ok(EncodedPrompt {
            ids,
            truncated_from,
        })
    }

    /// Decodes ids back to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// GPT-2's `bytes_to_unicode`: the printable character ByteLevel uses for each byte value.
/// Printable Latin-1 bytes ('!'..='~', '¡'..='¬', '®'..='ÿ') stand for themselves; the others get
/// U+0100 onwards, in byte order.
pub fn byte_level_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let cp = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        out[b as usize] = char::from_u32(cp).expect("valid code point");
    }
    out
}

/// Builds the tokenizer of the built-in tiny model: byte-level BPE with the 256 ByteLevel
/// alphabet symbols as its vocabulary (id = byte value) and no merges, so every UTF-8 byte is
/// one token; plus the special tokens `<|endoftext|>` = 256, `<|im_start|>` = 257,
/// `<|im_end|>` = 258. ByteLevel pre-tokenizer (no prefix space, GPT-2 regex) and decoder.
pub fn tiny_tokenizer() -> Result<Tokenizer> {
    let vocab: Vocab = byte_level_alphabet()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build the tiny tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens(&[
        AddedToken::from(ENDOFTEXT, true),
        AddedToken::from(IM_START, true),
        AddedToken::from(IM_END, true),
    ]);
    for (tok_str, id) in [(ENDOFTEXT, 256), (IM_START, 257), (IM_END, 258)] {
        if tok.token_to_id(tok_str) != Some(id) {
            return Err(Error::Tokenizer(format!(
                "tiny tokenizer: {tok_str} did not get id {id}"
            )));
        }
    }
    Ok(tok)
}

/// The `tokenizer_config.json` written next to the tiny tokenizer: a Qwen2Tokenizer whose chat
/// template renders [`PromptTokenizer::chat_text`] for one user message with the generation
/// prompt. `added_tokens_decoder` pins the special tokens' ids, so loaders that rebuild the
/// tokenizer from vocab and config (transformers >= 5) give them the same ids.
pub fn tiny_tokenizer_config() -> serde_json::Value {
    let added: serde_json::Map<String, serde_json::Value> =
        [(256, ENDOFTEXT), (257, IM_START), (258, IM_END)]
            .iter()
            .map(|(id, content)| {
                (
                    id.to_string(),
                    serde_json::json!({
                        "content": content,
                        "lstrip": false,
                        "normalized": false,
                        "rstrip": false,
                        "single_word": false,
                        "special": true
                    }),
                )
            })
            .collect();
    serde_json::json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": null,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": null,
        "errors": "replace",
        "clean_up_tokenization_spaces": false,
        "split_special_tokens": false,
        "model_max_length": 131072,
        "chat_template": "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
    })
}

/// Writes `tokenizer.json` and `tokenizer_config.json` of the tiny tokenizer into `dir`
/// (created if needed).
pub fn write_tiny_tokenizer_files(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tok = tiny_tokenizer()?;
    let tok_path = dir.join("tokenizer.json");
    tok.save(&tok_path, true)
        .map_err(|e| Error::Tokenizer(format!("cannot write {}: {e}", tok_path.display())))?;
    let cfg_path = dir.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&tiny_tokenizer_config()).expect("json serialises");
    std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        assert!(
            dir.join("expected.json").is_file()
                && dir.join("tiny_model/tokenizer/tokenizer.json").is_file(),
            "test fixtures missing under {}: generate them with the fixture script",
            dir.display()
        );
        dir
    }

    fn expected_json() -> serde_json::Value {
        let p = fixtures().join("expected.json");
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    }

    fn expected_ids(key: &str) -> Vec<u32> {
        let t = candle_core::safetensors::load(
            fixtures().join("expected.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let ids = t
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from expected.safetensors"));
        ids.to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    }

    fn fixture_tokenizer() -> PromptTokenizer {
        PromptTokenizer::from_file(fixtures().join("tiny_model/tokenizer/tokenizer.json")).unwrap()
    }

    const SAMPLES: &[&str] = &[
        "a photo of a cat, studio light",
        "Hello,   world!\n\tTabs and  double spaces ",
        "Café crème brûlée à Noël, naïve façade, Øresund, Straße",
        "e\u{301}te\u{301} (decomposed accents)",
        "一只猫坐在窗台上，阳光明媚。東京タワーの夜景",
        "emoji: 🐱🚀👩‍👩‍👧 ❤️ flags 🇯🇵",
        "special tokens inline <|im_start|>user\nhi<|im_end|> and <|endoftext|>",
        "",
    ];

    #[test]
    fn chat_template_text() {
        let exp = expected_json();
        for key in ["te", "te_long"] {
            let prompt = exp[key]["prompt"].as_str().unwrap();
            assert_eq!(
                PromptTokenizer::chat_text(prompt),
                exp[key]["chat"].as_str().unwrap()
            );
        }
    }

    #[test]
    fn fixture_prompt_ids_match_reference() {
        let exp = expected_json();
        let tok = fixture_tokenizer();

        let short = tok.encode(exp["te"]["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(short.ids, expected_ids("te.input_ids"));
        assert_eq!(
            short.ids.len() as u64,
            exp["te"]["num_tokens"].as_u64().unwrap()
        );
        assert_eq!(short.truncated_from, None);

        let long = tok
            .encode(exp["te_long"]["prompt"].as_str().unwrap())
            .unwrap();
        assert_eq!(long.ids.len(), MAX_PROMPT_TOKENS);
        assert_eq!(long.ids, expected_ids("te_long.input_ids"));
        assert_eq!(
            long.truncated_from,
            Some(
                exp["te_long"]["num_tokens_before_truncation"]
                    .as_u64()
                    .unwrap() as usize
            )
        );
        // Right truncation: the head of the template survives, the tail does not.
        assert_eq!(long.ids[0], 257);
        assert!(!long.ids.contains(&258));
    }

    #[test]
    fn tiny_tokenizer_matches_fixture_file() {
        let fixture = fixture_tokenizer();
        let ours = PromptTokenizer::tiny().unwrap();
        for s in SAMPLES {
            let a = ours.encode_raw(s).unwrap();
            let b = fixture.encode_raw(s).unwrap();
            assert_eq!(a, b, "raw ids differ for {s:?}");
            let a = ours.encode(s).unwrap();
            let b = fixture.encode(s).unwrap();
            assert_eq!(a, b, "templated ids differ for {s:?}");
            // With the tokenizer's own post-processing too (the pipeline's call).
            let a = ours.inner().encode(*s, true).unwrap().get_ids().to_vec();
            let b = fixture.inner().encode(*s, true).unwrap().get_ids().to_vec();
            assert_eq!(
                a, b,
                "ids with special-token post-processing differ for {s:?}"
            );
        }
        for (t, id) in [(ENDOFTEXT, 256), (IM_START, 257), (IM_END, 258)] {
            assert_eq!(fixture.inner().token_to_id(t), Some(id));
            assert_eq!(ours.inner().token_to_id(t), Some(id));
        }
        assert_eq!(
            ours.inner().get_vocab_size(true),
            fixture.inner().get_vocab_size(true)
        );
    }

    #[test]
    fn tiny_tokenizer_is_bytes() {
        let tok = PromptTokenizer::tiny().unwrap();
        let s = "Zürich 🐱 猫";
        let ids = tok.encode_raw(s).unwrap();
        assert_eq!(ids, s.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(tok.decode(&ids).unwrap(), s);
        let enc = tok.encode("hi").unwrap();
        assert_eq!(
            enc.ids,
            [
                vec![257],
                b"user\nhi".map(u32::from).to_vec(),
                vec![258, 10, 257],
                b"assistant\n".map(u32::from).to_vec()
            ]
            .concat()
        );
        let alphabet = byte_level_alphabet();
        assert_eq!(alphabet[b'!' as usize], '!');
        assert_eq!(alphabet[0], 'Ā');
        assert_eq!(alphabet[b' ' as usize], 'Ġ');
        assert_eq!(alphabet[b'\n' as usize], 'Ċ');
        let set: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        assert_eq!(set.len(), 256);
    }

    #[test]
    fn prompts_are_nfc_normalized() {
        // transformers 5 loads Qwen2Tokenizer with an NFC normalizer, so the pipeline tokenizes
        // decomposed accents as their composed forms, even with the tiny tokenizer.json.
        let tok = PromptTokenizer::tiny().unwrap();
        assert_eq!(
            tok.encode("e\u{301}te\u{301}").unwrap(),
            tok.encode("\u{e9}t\u{e9}").unwrap()
        );
        assert_ne!(
            tok.encode_raw("e\u{301}").unwrap(),
            tok.encode_raw("\u{e9}").unwrap()
        );
    }

    #[test]
    fn truncation_reports_original_length() {
        let tok = PromptTokenizer::tiny().unwrap();
        let prompt = "x".repeat(600);
        let enc = tok.encode(&prompt).unwrap();
        assert_eq!(enc.ids.len(), 512);
        assert_eq!(enc.truncated_from, Some(600 + 19));
        let enc = tok.encode(&"x".repeat(512 - 19)).unwrap();
        assert_eq!((enc.ids.len(), enc.truncated_from), (512, None));
    }

    #[test]
    fn tiny_files_roundtrip() {
        let dir =
            std::env::temp_dir().join(format!("engine-tiny-tokenizer-{}", std::process::id()));
        write_tiny_tokenizer_files(&dir).unwrap();
        let loaded = PromptTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let fixture = fixture_tokenizer();
        for s in SAMPLES {
            assert_eq!(
                loaded.encode(s).unwrap(),
                fixture.encode(s).unwrap(),
                "ids differ for {s:?}"
            );
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["tokenizer_class"], "Qwen2Tokenizer");
        assert_eq!(cfg["pad_token"], ENDOFTEXT);
        assert_eq!(cfg["eos_token"], IM_END);
        assert!(cfg["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>assistant\\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
