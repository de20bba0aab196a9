//! The model's own chat template (Jinja, from `tokenizer_config.json` or `chat_template.jinja`
//! beside `tokenizer.json`), rendered the way transformers' `apply_chat_template` renders it:
//! `trim_blocks` and `lstrip_blocks` on, Python's string methods available, `raise_exception`
//! defined, the generation prompt on.

use std::path::Path;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles the template's source; a syntax error is reported with its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::Tokenizer(format!("the chat template does not compile: {e:#}")))?;
        Ok(Self { env })
    }

    /// The template of a tokenizer folder: `chat_template.jinja` if present, otherwise the
    /// `chat_template` entry of `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is taken). `Ok(None)` when the folder has neither.
    pub fn from_tokenizer_dir(dir: &Path) -> Result<Option<Self>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let src = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Self::new(&src).map(Some);
        }
        let cfg_path = dir.join("tokenizer_config.json");
        if !cfg_path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Tokenizer(format!("{} is not JSON: {e}", cfg_path.display())))?;
        Self::from_tokenizer_config(&cfg)
    }

    /// The `chat_template` of a parsed `tokenizer_config.json`, if it has one.
    pub fn from_tokenizer_config(cfg: &serde_json::Value) -> Result<Option<Self>> {
        match &cfg["chat_template"] {
            serde_json::Value::String(s) => Self::new(s).map(Some),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(Self::new)
                .transpose(),
            _ => Ok(None),
        }
    }

    /// The prompt text for `messages` followed by the assistant's generation prompt, with the
    /// thinking switch (`enable_thinking`) as given.
    pub fn render(&self, messages: &[ChatMessage], enable_thinking: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).expect("added in new");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            enable_thinking => enable_thinking,
            bos_token => "",
            eos_token => crate::tokenizer::IM_END,
        })
        .map_err(|e| Error::InvalidRequest(format!("the chat template failed: {e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_tiny_template_with_and_without_system() {
        let t = ChatTemplate::from_tokenizer_config(&crate::tokenizer::tiny_tokenizer_config()).unwrap().unwrap();
        let user = [ChatMessage::new("user", "a cat")];
        assert_eq!(
            t.render(&user, false).unwrap(),
            "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        assert_eq!(t.render(&user, true).unwrap(), "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n");
        let both = [ChatMessage::new("system", "be brief"), ChatMessage::new("user", "a cat")];
        assert!(t.render(&both, false).unwrap().starts_with("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n"));
    }

    #[test]
    fn python_string_methods_trim_blocks_and_raise_exception() {
        // The constructs Qwen's own template relies on: namespace, reversed slices, str methods,
        // block whitespace control.
        let src = "{%- set ns = namespace(last=-1) %}\n{%- for m in messages[::-1] %}\n  {%- if m.role == 'user' and ns.last == -1 %}{%- set ns.last = loop.index0 %}{%- endif %}\n{%- endfor %}\n{%- for m in messages %}\n{{ m.role }}:{{ m.content.strip().split('|')[0] }}{{ '!' if m.content.startswith('x') }}\n{% endfor %}\nlast={{ ns.last }}";
        let t = ChatTemplate::new(src).unwrap();
        let out = t.render(&[ChatMessage::new("system", " sys|a "), ChatMessage::new("user", "xu")], false).unwrap();
        assert_eq!(out, "system:sys\nuser:xu!\nlast=0");
        let t = ChatTemplate::new("{{ raise_exception('no tools here') }}").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no tools here"), "{err}");
        assert!(ChatTemplate::new("{% if %}").is_err());
    }
}
