//! Share pages: one finished image with its settings.

use super::*;

#[component]
pub fn SharePage() -> impl IntoView {
    let params = use_params_map();
    let id = move || params.read().get("id").unwrap_or_default();
    let info = Resource::new(id, image_info);
    view! {
        <main class="page">
            <Header />
            <Suspense fallback=|| view! { <div class="card center">"Loading…"</div> }>
                {move || {
                    info.get()
                        .map(|r| match r {
                            Ok(result) => view! { <ShareView result /> }.into_any(),
                            Err(e) => {
                                #[cfg(feature = "ssr")]
                                if let Some(resp) = use_context::<leptos_axum::ResponseOptions>() {
                                    if let Ok(code) = axum::http::StatusCode::from_u16(e.status()) {
                                        resp.set_status(code);
                                    }
                                }
                                view! {
                                    <div class="card center">
                                        <div class="alert error" data-testid="share-error">{e.reason}</div>
                                        <a class="btn primary" href="/">"Open the studio"</a>
                                    </div>
                                }
                                    .into_any()
                            }
                        })
                }}
            </Suspense>
        </main>
    }
}

#[component]
pub(crate) fn ShareView(result: JobResult) -> impl IntoView {
    let title = title_markup(format!("{} — Z-Image Turbo", truncate(&result.prompt, 60)));
    let details = format!(
        "{}×{} · {} steps · seed {} · {} · {}",
        result.width,
        result.height,
        result.steps,
        result.seed,
        result.style.label(),
        result.model
    );
    view! {
        <Title text=title />
        <div class="card share-card" data-testid="share">
            <img class="result-image" src=result.image_url.clone() alt=result.prompt.clone() width=result.width.to_string() height=result.height.to_string() />
            <p class="share-prompt">{result.prompt.clone()}</p>
            <p class="dim">{details}</p>
            {(!result.loras.is_empty()).then(|| view! { <p class="dim" data-testid="share-loras">{format!("LoRAs: {}", result.loras_text())}</p> })}
            {result.tiny_model.then(|| view! { <p class="banner tiny">"Made with the tiny random-weight demo model."</p> })}
            <div class="meta-row">
                <a class="btn primary" href=result.image_url.clone() download=format!("zimage-{}.png", result.seed)>"Download PNG"</a>
                <a class="btn" href="/">"Make your own"</a>
            </div>
        </div>
    }
}

/// leptos_meta (0.8.7) copies the `<title>` text into the server's HTML without escaping it, so a
/// prompt with `</title><script>…` would become markup (and the CSP would hash that script as the
/// page's own). The server's copy is escaped; in the browser the title is set as text, unescaped.
fn title_markup(text: String) -> String {
    if cfg!(target_arch = "wasm32") {
        return text;
    }
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}
