//! Browser-only helpers: the `/ws` progress socket (with reconnect), clipboard, postMessage, the
//! theme choice, focus.
//! Without the `hydrate` feature (server rendering) they do nothing.

use crate::types::JobEvent;

#[cfg(feature = "hydrate")]
mod imp {
    use crate::error::{ErrorKind, StudioError};
    use crate::types::{JobEvent, WsClientMsg};
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::rc::Rc;
    use wasm_bindgen::prelude::*;
    use wasm_bindgen::JsCast;
    use web_sys::{CloseEvent, MessageEvent, WebSocket};

    type EventCb = Rc<dyn Fn(JobEvent)>;
    type StatusCb = Rc<dyn Fn(bool)>;

    #[derive(Default)]
    struct WsState {
        socket: Option<WebSocket>,
        watched: BTreeSet<String>,
        on_event: Option<EventCb>,
        on_status: Option<StatusCb>,
        retry_ms: u32,
        started: bool,
    }

    thread_local! {
        static STATE: RefCell<WsState> = RefCell::new(WsState::default());
    }

    fn send(socket: &WebSocket, msg: &WsClientMsg) {
        if socket.ready_state() == WebSocket::OPEN {
            if let Ok(text) = serde_json::to_string(msg) {
                let _ = socket.send_with_str(&text);
            }
        }
    }

    fn url() -> Option<String> {
        let loc = web_sys::window()?.location();
        let proto = if loc.protocol().ok()? == "https:" { "wss:" } else { "ws:" };
        Some(format!("{proto}//{}/ws", loc.host().ok()?))
    }

    fn status(up: bool) {
        let cb = STATE.with(|s| s.borrow().on_status.clone());
        if let Some(cb) = cb {
            cb(up);
        }
    }

    fn schedule_reconnect() {
        let delay = STATE.with(|s| {
            let mut s = s.borrow_mut();
            let d = s.retry_ms.max(250);
            s.retry_ms = (d * 2).min(5000);
            d
        });
        leptos::prelude::set_timeout(connect, std::time::Duration::from_millis(delay as u64));
    }

    fn connect() {
        let Some(url) = url() else { return };
        let socket = match WebSocket::new(&url) {
            Ok(s) => s,
            Err(_) => return schedule_reconnect(),
        };
        let onopen = {
            let socket = socket.clone();
            Closure::<dyn FnMut()>::new(move || {
                let watched = STATE.with(|s| {
                    let mut s = s.borrow_mut();
                    s.retry_ms = 250;
                    s.watched.clone()
                });
                // re-subscribe: the server answers each watch with the job's latest state
                for job_id in watched {
                    send(&socket, &WsClientMsg::Watch { job_id });
                }
                status(true);
            })
        };
        let onmessage = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
            let Some(text) = e.data().as_string() else { return };
            let Ok(ev) = serde_json::from_str::<JobEvent>(&text) else { return };
            let cb = STATE.with(|s| {
                let mut s = s.borrow_mut();
                if ev.is_terminal() {
                    s.watched.remove(ev.job_id());
                }
                s.on_event.clone()
            });
            if let Some(cb) = cb {
                cb(ev);
            }
        });
        let onclose = {
            let socket = socket.clone();
            Closure::<dyn FnMut(CloseEvent)>::new(move |_e: CloseEvent| {
                let current = STATE.with(|s| {
                    let mut s = s.borrow_mut();
                    let is_current = s.socket.as_ref().is_some_and(|c| c == &socket);
                    if is_current {
                        s.socket = None;
                    }
                    is_current
                });
                if current {
                    status(false);
                    schedule_reconnect();
                }
            })
        };
        socket.set_onopen(Some(onopen.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
        socket.set_onclose(Some(onclose.as_ref().unchecked_ref()));
        // the socket owns its handlers for its whole life; a reconnect makes a new set
        onopen.forget();
        onmessage.forget();
        onclose.forget();
        STATE.with(|s| s.borrow_mut().socket = Some(socket));
    }

    pub fn ws_start(on_event: impl Fn(JobEvent) + 'static, on_status: impl Fn(bool) + 'static) {
        let first = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.on_event = Some(Rc::new(on_event));
            s.on_status = Some(Rc::new(on_status));
            !std::mem::replace(&mut s.started, true)
        });
        if first {
            connect();
            // test hook: drop the socket to exercise the reconnect path
            if let Some(w) = web_sys::window() {
                let drop_socket = Closure::<dyn FnMut()>::new(|| {
                    let s = STATE.with(|s| s.borrow().socket.clone());
                    if let Some(s) = s {
                        let _ = s.close();
                    }
                });
                let _ = js_sys::Reflect::set(&w, &"__zimageDropSocket".into(), drop_socket.as_ref());
                drop_socket.forget();
            }
        }
    }

    pub fn watch(job_id: &str) {
        let socket = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.watched.insert(job_id.to_string());
            s.socket.clone()
        });
        if let Some(socket) = socket {
            send(&socket, &WsClientMsg::Watch { job_id: job_id.to_string() });
        }
    }

    pub fn unwatch(job_id: &str) {
        let socket = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.watched.remove(job_id);
            s.socket.clone()
        });
        if let Some(socket) = socket {
            send(&socket, &WsClientMsg::Unwatch { job_id: job_id.to_string() });
        }
    }

    /// Copies with the async Clipboard API, or (plain-http pages, where it is missing) with a
    /// temporary textarea and `execCommand("copy")`.
    pub fn copy_text(text: &str) {
        let Some(w) = web_sys::window() else { return };
        let nav = w.navigator();
        let clip = js_sys::Reflect::get(&nav, &"clipboard".into()).unwrap_or(JsValue::UNDEFINED);
        if !clip.is_undefined() {
            if let Ok(f) = js_sys::Reflect::get(&clip, &"writeText".into()) {
                if let Some(f) = f.dyn_ref::<js_sys::Function>() {
                    if let Ok(p) = f.call1(&clip, &JsValue::from_str(text)) {
                        // swallow a refused permission instead of an unhandled rejection
                        if let Some(p) = p.dyn_ref::<js_sys::Promise>() {
                            let noop = Closure::<dyn FnMut(JsValue)>::new(|_| {});
                            let _ = p.catch(&noop);
                            noop.forget();
                        }
                        return;
                    }
                }
            }
        }
        let Some(doc) = w.document() else { return };
        let Some(body) = doc.body() else { return };
        let Ok(el) = doc.create_element("textarea") else { return };
        let area: web_sys::HtmlTextAreaElement = el.unchecked_into();
        area.set_value(text);
        // a class, not a style attribute: the page's CSP (style-src 'self') refuses inline styles
        area.set_class_name("offscreen");
        if body.append_child(&area).is_ok() {
            area.select();
            if let Ok(exec) = js_sys::Reflect::get(&doc, &"execCommand".into()) {
                if let Some(exec) = exec.dyn_ref::<js_sys::Function>() {
                    let _ = exec.call1(&doc, &JsValue::from_str("copy"));
                }
            }
            let _ = body.remove_child(&area);
        }
    }

    pub fn origin() -> String {
        web_sys::window().and_then(|w| w.location().origin().ok()).unwrap_or_default()
    }

    fn session() -> Option<web_sys::Storage> {
        web_sys::window()?.session_storage().ok()?
    }

    pub fn session_get(key: &str) -> Option<String> {
        session()?.get_item(key).ok()?
    }

    pub fn session_set(key: &str, value: &str) {
        if let Some(s) = session() {
            let _ = s.set_item(key, value);
        }
    }

    pub fn local_time(unix_secs: u64) -> String {
        let d = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(unix_secs as f64 * 1000.0));
        d.to_locale_string("default", &wasm_bindgen::JsValue::UNDEFINED).into()
    }

    /// GET `/readyz` (never from a cache) and parse it; None when the server does not answer.
    pub async fn fetch_readiness() -> Option<crate::types::Readiness> {
        use wasm_bindgen_futures::JsFuture;
        let w = web_sys::window()?;
        let init = web_sys::RequestInit::new();
        init.set_cache(web_sys::RequestCache::NoStore);
        let resp = JsFuture::from(w.fetch_with_str_and_init("/readyz", &init)).await.ok()?;
        let resp: web_sys::Response = resp.dyn_into().ok()?;
        let text = JsFuture::from(resp.text().ok()?).await.ok()?.as_string()?;
        serde_json::from_str(&text).ok()
    }

    pub fn now_ms() -> f64 {
        js_sys::Date::now()
    }

    /// POSTs a LoRA file to `/api/loras/{name}` (with the API key when the user gave one).
    pub async fn upload_lora(file: web_sys::File, key: String) -> Result<crate::types::LoraInfo, StudioError> {
        use wasm_bindgen_futures::JsFuture;
        let network = |e: wasm_bindgen::JsValue| {
            StudioError::new(ErrorKind::Network, format!("Could not reach the server ({e:?}). Check your connection and try again."))
        };
        let w = web_sys::window().ok_or_else(|| StudioError::internal("no window"))?;
        let init = web_sys::RequestInit::new();
        init.set_method("POST");
        init.set_body(&file);
        if !key.trim().is_empty() {
            let headers = js_sys::Object::new();
            let _ = js_sys::Reflect::set(&headers, &"Authorization".into(), &format!("Bearer {}", key.trim()).into());
            init.set_headers(&headers);
        }
        let name = js_sys::encode_uri_component(&file.name()).as_string().unwrap_or_default();
        let resp = JsFuture::from(w.fetch_with_str_and_init(&format!("/api/loras/{name}"), &init)).await.map_err(network)?;
        let resp: web_sys::Response = resp.dyn_into().map_err(network)?;
        let text = JsFuture::from(resp.text().map_err(network)?).await.map_err(network)?.as_string().unwrap_or_default();
        if resp.ok() {
            serde_json::from_str(&text).map_err(|e| StudioError::internal(format!("The server's answer could not be read: {e}")))
        } else {
            Err(serde_json::from_str::<StudioError>(&text)
                .unwrap_or_else(|_| StudioError::internal(format!("The upload failed (HTTP {}).", resp.status()))))
        }
    }

    pub fn focus_element(id: &str) {
        let el = web_sys::window()
            .and_then(|w| w.document())
            .and_then(|d| d.get_element_by_id(id))
            .and_then(|e| e.dyn_into::<web_sys::HtmlElement>().ok());
        if let Some(el) = el {
            let _ = el.focus();
        }
    }

    pub fn theme_is_dark() -> bool {
        let Some(w) = web_sys::window() else { return false };
        let chosen = w.document().and_then(|d| d.document_element()).and_then(|e| e.get_attribute("data-theme"));
        match chosen.as_deref() {
            Some("dark") => true,
            Some("light") => false,
            _ => w.match_media("(prefers-color-scheme: dark)").ok().flatten().is_some_and(|m| m.matches()),
        }
    }

    pub fn theme_set(dark: bool) {
        let theme = if dark { "dark" } else { "light" };
        let Some(w) = web_sys::window() else { return };
        if let Some(root) = w.document().and_then(|d| d.document_element()) {
            let _ = root.set_attribute("data-theme", theme);
        }
        if let Ok(Some(store)) = w.local_storage() {
            let _ = store.set_item(super::THEME_KEY, theme);
        }
    }

    pub fn post_to_parent(json: &str) {
        let Some(w) = web_sys::window() else { return };
        let Ok(Some(parent)) = w.parent() else { return };
        if parent == w {
            return; // not in a frame
        }
        if let Ok(msg) = js_sys::JSON::parse(json) {
            let _ = parent.post_message(&msg, "*");
        }
    }
}

#[cfg(not(feature = "hydrate"))]
mod imp {
    use crate::types::JobEvent;
    pub fn ws_start(_on_event: impl Fn(JobEvent) + 'static, _on_status: impl Fn(bool) + 'static) {}
    pub fn watch(_job_id: &str) {}
    pub fn unwatch(_job_id: &str) {}
    pub fn copy_text(_text: &str) {}
    pub fn origin() -> String {
        String::new()
    }
    pub fn post_to_parent(_json: &str) {}
    pub fn local_time(unix_secs: u64) -> String {
        format!("{unix_secs} (Unix time)")
    }
    pub fn session_get(_key: &str) -> Option<String> {
        None
    }
    pub fn session_set(_key: &str, _value: &str) {}
    pub fn now_ms() -> f64 {
        0.0
    }
    pub fn focus_element(_id: &str) {}
    pub fn theme_is_dark() -> bool {
        false
    }
    pub fn theme_set(_dark: bool) {}
    pub async fn fetch_readiness() -> Option<crate::types::Readiness> {
        None
    }
}

#[cfg(feature = "hydrate")]
pub use imp::upload_lora;

/// Opens the `/ws` socket (once) and routes job events to `on_event`; `on_status` hears
/// connected / disconnected. Reconnects with backoff and re-watches unfinished jobs.
pub fn ws_start(on_event: impl Fn(JobEvent) + 'static, on_status: impl Fn(bool) + 'static) {
    imp::ws_start(on_event, on_status)
}
/// Subscribes to a job's events (the server answers with its latest state at once).
pub fn watch(job_id: &str) {
    imp::watch(job_id)
}
pub fn unwatch(job_id: &str) {
    imp::unwatch(job_id)
}
pub fn copy_text(text: &str) {
    imp::copy_text(text)
}
/// `https://host:port` of the page (empty on the server).
pub fn origin() -> String {
    imp::origin()
}
/// Reads a value kept for this tab (sessionStorage).
pub fn session_get(key: &str) -> Option<String> {
    imp::session_get(key)
}
pub fn session_set(key: &str, value: &str) {
    imp::session_set(key, value)
}
/// Where the theme chosen with the toggle is kept (localStorage); `/theme.js` reads it before the
/// first paint and sets `data-theme` on `<html>`, which the style sheet follows.
pub const THEME_KEY: &str = "zimage.theme";

/// The page is shown dark: the chosen theme, else the system's (`prefers-color-scheme`).
pub fn theme_is_dark() -> bool {
    imp::theme_is_dark()
}
/// Shows the page in the given theme and remembers the choice for this browser.
pub fn theme_set(dark: bool) {
    imp::theme_set(dark)
}
/// Moves the keyboard focus to the element with this id (if it is there).
pub fn focus_element(id: &str) {
    imp::focus_element(id)
}
/// Milliseconds since the Unix epoch (the browser's clock; 0 on the server).
pub fn now_ms() -> f64 {
    imp::now_ms()
}
/// Posts a JSON message to the parent window when the page is framed.
pub fn post_to_parent(json: &str) {
    imp::post_to_parent(json)
}

/// What the server is doing (`/readyz`), or None when it does not answer (always None on the server).
pub async fn fetch_readiness() -> Option<crate::types::Readiness> {
    imp::fetch_readiness().await
}

/// A Unix time in the browser's locale and time zone.
pub fn local_time(unix_secs: u64) -> String {
    imp::local_time(unix_secs)
}
