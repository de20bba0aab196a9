//! Browser security headers: a strict Content-Security-Policy on every response, framing rules,
//! `nosniff` and the referrer policy.
//!
//! The policy allows scripts from our own origin only (plus `'wasm-unsafe-eval'` for the wasm
//! bundle). Leptos writes inline scripts into every page (the hydration bootstrap, resolved
//! resources, out-of-order chunks), so HTML responses are buffered — pages are a few kB — and each
//! inline `<script>` is allowed by its SHA-256 hash. Any other inline script, a `<script src>` from
//! elsewhere, inline styles, plugins, `<base>` and foreign form targets are refused by the browser.
//!
//! The hashes come from the page as rendered, so they are only as good as the rendering's escaping:
//! Leptos escapes text and attribute values, and escapes `</script>` inside the data it serialises
//! into scripts (a test checks a prompt full of markup adds no hash). The tokenizer below finds
//! the scripts the way a browser's parser does, so text that looks like a script inside an
//! attribute, a comment or a `<textarea>` is not hashed.

use anyhow::{bail, Context};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The largest HTML response the middleware buffers to hash its scripts. Our pages are a few kB;
/// a bigger one is a bug, answered 500 rather than served without its scripts.
const MAX_HTML_BYTES: usize = 8 << 20;

/// Who may frame which page: `/embed` the configured origins, everything else only ourselves.
pub struct FramePolicy {
    /// The `frame-ancestors` sources of `/embed`, e.g. `'self' https://blog.example`.
    embed_ancestors: String,
}

impl FramePolicy {
    pub fn new(ancestors: &[String]) -> anyhow::Result<FramePolicy> {
        let mut sources = vec!["'self'".to_string()];
        for a in ancestors {
            let a = a.trim().trim_end_matches('/');
            let ok = a == "*"
                || a == "'self'"
                || a == "'none'"
                || (a.contains("://") || a.ends_with(':'))
                    && a.chars().all(|c| c.is_ascii_alphanumeric() || "-._:/*[]".contains(c));
            if !ok {
                bail!(
                    "bad frame ancestor `{a}`: use an origin like https://example.com, a scheme like https:, or *"
                );
            }
            if a == "*" {
                sources = vec!["*".to_string()];
                break;
            }
            if a == "'none'" {
                sources = vec!["'none'".to_string()];
                break;
            }
            if !sources.iter().any(|s| s == a) {
                sources.push(a.to_string());
            }
        }
        let embed_ancestors = sources.join(" ");
        HeaderValue::from_str(&embed_ancestors).context("frame ancestors")?;
        Ok(FramePolicy { embed_ancestors })
    }

    /// The `frame-ancestors` sources for a page.
    pub fn ancestors(&self, embed: bool) -> &str {
        if embed {
            &self.embed_ancestors
        } else {
            "'self'"
        }
    }
}

/// The Content-Security-Policy of one response.
///
/// `host` is the request's `Host` (already checked by [`request_host`]): the studio's socket
/// (`/ws`) is named with it for browsers whose `'self'` does not cover ws: and wss:.
/// `script_hashes` are the `'sha256-…'` sources of the page's inline scripts.
pub fn content_security_policy(frame_ancestors: &str, host: Option<&str>, script_hashes: &[String]) -> String {
    let mut script_src = String::from("'self' 'wasm-unsafe-eval'");
    for h in script_hashes {
        script_src.push(' ');
        script_src.push_str(h);
    }
    let connect_src = match host {
        Some(h) => format!("'self' ws://{h} wss://{h}"),
        None => "'self'".to_string(),
    };
    format!(
        "default-src 'self'; script-src {script_src}; style-src 'self'; img-src 'self' data: blob:; \
         connect-src {connect_src}; object-src 'none'; base-uri 'none'; form-action 'self'; \
         frame-ancestors {frame_ancestors}"
    )
}

/// The request's host and port when it is a plain `host[:port]` (a name, IPv4 or `[IPv6]`);
/// anything else would let a crafted `Host` add directives to the policy, so it is left out.
pub fn request_host(req: &Request) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))?;
    let plain = !host.is_empty()
        && host.len() <= 255
        && host.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
    plain.then_some(host)
}

/// `'sha256-…'` of every inline script of an HTML document, in document order, without repeats.
pub fn script_hashes(html: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for script in inline_scripts(html) {
        // The browser hashes the script's text after the parser's newline normalisation.
        let digest = if script.contains(&b'\r') {
            Sha256::digest(normalize_newlines(script))
        } else {
            Sha256::digest(script)
        };
        let source = format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest));
        if !out.contains(&source) {
            out.push(source);
        }
    }
    out
}

/// CRLF and lone CR become LF, as the HTML parser's input preprocessing does.
fn normalize_newlines(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\r' => {
                out.push(b'\n');
                if text.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The text of every `<script>` element without a `src` attribute.
///
/// A small tokenizer after the HTML standard's: comments, doctypes, quoted attribute values and
/// the raw-text elements (`script`, `style`, `textarea`, `title`, …) are skipped as a browser
/// skips them, so only real script elements are returned. It does not model a script that itself
/// contains `<!--<script>` (the "double escaped" state); should one ever appear, its hash would
/// not match and the browser would refuse it, which the e2e tests would report.
pub fn inline_scripts(html: &[u8]) -> Vec<&[u8]> {
    const RAW_TEXT: &[&[u8]] = &[
        b"script", b"style", b"textarea", b"title", b"xmp", b"iframe", b"noembed", b"noframes", b"noscript",
    ];
    let mut scripts = Vec::new();
    let mut i = 0;
    let n = html.len();
    while i < n {
        let Some(lt) = memchr(b'<', &html[i..]) else { break };
        i += lt;
        let rest = &html[i..];
        if rest.starts_with(b"<!--") {
            // `<!-->` and `<!--->` close at once
            let body = &rest[4..];
            let end = if body.starts_with(b">") {
                5
            } else if body.starts_with(b"->") {
                6
            } else {
                find(body, b"-->").map_or(rest.len(), |e| 4 + e + 3)
            };
            i += end;
        } else if rest.starts_with(b"<!") || rest.starts_with(b"<?") || rest.starts_with(b"</") {
            // doctype, bogus comment, end tag: up to the next `>`
            i += memchr(b'>', rest).map_or(rest.len(), |e| e + 1);
        } else if rest.get(1).is_some_and(u8::is_ascii_alphabetic) {
            let tag = start_tag(rest);
            i += tag.len;
            let name = tag.name.to_ascii_lowercase();
            if name == b"plaintext" {
                break;
            }
            if RAW_TEXT.contains(&name.as_slice()) {
                let content = &html[i..];
                let end = find_end_tag(content, &name).unwrap_or(content.len());
                if name == b"script" && !tag.has_src {
                    scripts.push(&content[..end]);
                }
                i += end;
            }
        } else {
            i += 1; // a `<` that starts no tag is text
        }
    }
    scripts
}

struct StartTag<'a> {
    name: &'a [u8],
    has_src: bool,
    /// Bytes up to and including the closing `>`.
    len: usize,
}

/// Reads a start tag at `s[0] == b'<'`: its name, whether it has a `src` attribute, its length.
fn start_tag(s: &[u8]) -> StartTag<'_> {
    let is_space = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c');
    let mut i = 1;
    while i < s.len() && !is_space(s[i]) && s[i] != b'/' && s[i] != b'>' {
        i += 1;
    }
    let name = &s[1..i];
    let mut has_src = false;
    loop {
        while i < s.len() && (is_space(s[i]) || s[i] == b'/') {
            i += 1;
        }
        if i >= s.len() {
            return StartTag { name, has_src, len: s.len() };
        }
        if s[i] == b'>' {
            return StartTag { name, has_src, len: i + 1 };
        }
        // attribute name (a leading `=` belongs to the name, as in the standard)
        let start = i;
        i += 1;
        while i < s.len() && !is_space(s[i]) && !matches!(s[i], b'/' | b'>' | b'=') {
            i += 1;
        }
        if s[start..i].eq_ignore_ascii_case(b"src") {
            has_src = true;
        }
        while i < s.len() && is_space(s[i]) {
            i += 1;
        }
        if i < s.len() && s[i] == b'=' {
            i += 1;
            while i < s.len() && is_space(s[i]) {
                i += 1;
            }
            match s.get(i) {
                Some(&q) if q == b'"' || q == b'\'' => {
                    i += 1;
                    i += memchr(q, &s[i..]).map_or(s.len() - i, |e| e + 1);
                }
                _ => {
                    while i < s.len() && !is_space(s[i]) && s[i] != b'>' {
                        i += 1;
                    }
                }
            }
        }
    }
}

/// Where `</name` followed by whitespace, `/` or `>` starts (any case).
fn find_end_tag(s: &[u8], name: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = find(&s[from..], b"</") {
        let at = from + p;
        let after = at + 2 + name.len();
        if s.len() >= after
            && s[at + 2..after].eq_ignore_ascii_case(name)
            && s.get(after).is_none_or(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'/' | b'>'))
        {
            return Some(at);
        }
        from = at + 2;
    }
    None
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&c| c == needle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_html(res: &Response) -> bool {
    res.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("text/html"))
}

/// Sets the security headers on every response; HTML pages get the hashes of their inline scripts.
pub async fn security_headers(State(frames): State<Arc<FramePolicy>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let embed = path == "/embed" || path.starts_with("/embed/");
    let host = request_host(&req);
    let res = next.run(req).await;
    // An encoded body cannot be read here; none is today (compression runs outside this layer),
    // and without hashes its inline scripts would be refused rather than allowed.
    let (mut res, hashes) = if is_html(&res) && !res.headers().contains_key(header::CONTENT_ENCODING) {
        let (parts, body) = res.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_HTML_BYTES).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: the page {path} could not be buffered to hash its scripts: {e}");
                return (StatusCode::INTERNAL_SERVER_ERROR, "The page could not be rendered.").into_response();
            }
        };
        let hashes = script_hashes(&bytes);
        (Response::from_parts(parts, Body::from(bytes)), hashes)
    } else {
        (res, Vec::new())
    };
    let csp = content_security_policy(frames.ancestors(embed), host.as_deref(), &hashes);
    let h = res.headers_mut();
    // every part is checked, so this holds; were it not to, the page gets the strictest policy
    let csp = HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    if !embed {
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("SAMEORIGIN"));
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("strict-origin-when-cross-origin"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(html: &str) -> Vec<String> {
        inline_scripts(html.as_bytes()).into_iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect()
    }

    #[test]
    fn finds_only_real_inline_scripts() {
        let html = r#"<!DOCTYPE html><html><head>
<script src="/register-sw.js" defer></script>
<script type="module">import("/pkg/zimage.js")</script>
<!-- <script>in a comment</script> -->
<title>a <script>title</script> text</title>
</head><body data-x='<script>in an attribute</script>' title="a > b">
<textarea><script>in a textarea</script></textarea>
<style>p::after { content: "<script>in a style</script>" }</style>
<SCRIPT>upper()</SCRIPT >
<p>1 < 2</p><script>if (a </scripts> b) {}</script>
<template id="1f"><b>x</b></template><script>(function() { let id = "1"; })()</script>
</body></html>"#;
        assert_eq!(
            texts(html),
            vec![
                r#"import("/pkg/zimage.js")"#,
                "upper()",
                "if (a </scripts> b) {}",
                r#"(function() { let id = "1"; })()"#,
            ]
        );
    }

    #[test]
    fn unclosed_markup_ends_the_scan_without_panics() {
        for html in ["<script>never closed", "<scri", "<!-- open", "<a href=\"x", "<", "<!-->x<script>s</script>", "<plaintext><script>no</script>"] {
            let _ = texts(html);
        }
        assert_eq!(texts("<script>never closed"), vec!["never closed"]);
        assert_eq!(texts("<!-->x<script>s</script>"), vec!["s"]);
        assert!(texts("<plaintext><script>no</script>").is_empty());
    }

    #[test]
    fn hashes_are_sha256_of_the_normalised_text_once_each() {
        // echo -n 'alert(1)' | openssl dgst -sha256 -binary | base64
        let expected = "'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='";
        assert_eq!(script_hashes(b"<script>alert(1)</script><script>alert(1)</script>"), vec![expected]);
        assert_eq!(
            script_hashes(b"<script>a\r\nb\rc</script>"),
            script_hashes(b"<script>a\nb\nc</script>"),
            "the browser hashes after CRLF/CR -> LF"
        );
        assert!(script_hashes(b"<script src=/x.js></script><p>no scripts</p>").is_empty());
    }

    #[test]
    fn policy_names_the_ws_origin_and_the_hashes() {
        let p = content_security_policy("'self'", Some("127.0.0.1:3400"), &["'sha256-abc='".into()]);
        assert_eq!(
            p,
            "default-src 'self'; script-src 'self' 'wasm-unsafe-eval' 'sha256-abc='; style-src 'self'; \
             img-src 'self' data: blob:; connect-src 'self' ws://127.0.0.1:3400 wss://127.0.0.1:3400; \
             object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
        );
        assert!(content_security_policy("'self'", None, &[]).contains("connect-src 'self';"));
    }

    #[test]
    fn a_crafted_host_adds_nothing_to_the_policy() {
        let req = |host: &str| Request::builder().header(header::HOST, host).body(Body::empty()).unwrap();
        assert_eq!(request_host(&req("studio.example:8080")).as_deref(), Some("studio.example:8080"));
        assert_eq!(request_host(&req("[::1]:3400")).as_deref(), Some("[::1]:3400"));
        assert_eq!(request_host(&req("a.example; script-src *")), None);
        assert_eq!(request_host(&req("a.example 'unsafe-inline'")), None);
        assert_eq!(request_host(&req("")), None);
    }

    #[test]
    fn frame_policy_validates_origins() {
        assert!(FramePolicy::new(&["https://blog.example".into(), "http://localhost:8080".into()]).is_ok());
        assert!(FramePolicy::new(&["https://a.example; script-src *".into()]).is_err());
        assert!(FramePolicy::new(&["evil".into()]).is_err());
        assert_eq!(FramePolicy::new(&["*".into()]).unwrap().ancestors(true), "*");
        let p = FramePolicy::new(&["https://blog.example/".into(), "https://blog.example".into()]).unwrap();
        assert_eq!(p.ancestors(true), "'self' https://blog.example");
        assert_eq!(p.ancestors(false), "'self'");
    }
}
