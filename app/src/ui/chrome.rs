//! Page chrome: icons, header with the theme toggle, the model line and banners, the 404 page.

use super::*;

#[component]
pub(crate) fn LightningIcon() -> impl IntoView {
    view! {
        <svg class="bolt" viewBox="0 0 24 24" width="34" height="34" aria-hidden="true">
            <path d="M13 2 4 14h7l-1 8 9-12h-7l1-8z" fill="currentColor" />
        </svg>
    }
}

#[component]
pub(crate) fn SparkleIcon() -> impl IntoView {
    view! {
        <svg class="icon" viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">
            <path d="M12 2l1.9 5.6L19.5 9.5l-5.6 1.9L12 17l-1.9-5.6L4.5 9.5l5.6-1.9z M19 14l.9 2.6 2.6.9-2.6.9L19 21l-.9-2.6-2.6-.9 2.6-.9z" fill="currentColor" />
        </svg>
    }
}

#[component]
pub(crate) fn PaletteIcon() -> impl IntoView {
    view! {
        <svg class="icon" viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">
            <path d="M12 3a9 9 0 0 0 0 18c1.1 0 1.7-.8 1.7-1.6 0-.5-.2-.8-.5-1.1-.3-.3-.5-.7-.5-1.1 0-.9.7-1.6 1.6-1.6H16a5 5 0 0 0 5-5C21 6.4 17 3 12 3zm-5.5 9a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3zm3-4a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3zm5 0a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3zm3 4a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3z" fill="currentColor" />
        </svg>
    }
}

#[component]
pub(crate) fn MoonIcon() -> impl IntoView {
    view! {
        <svg class="icon" viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">
            <path d="M20.5 14.6A8.5 8.5 0 0 1 9.4 3.5a8.5 8.5 0 1 0 11.1 11.1z" fill="currentColor" />
        </svg>
    }
}

/// "Dark theme" on/off. Without a choice the page follows the system; a choice is remembered by
/// this browser (`client::THEME_KEY`). The server cannot know the theme: the button's state is
/// read once the page runs.
#[component]
pub(crate) fn ThemeToggle() -> impl IntoView {
    let dark = RwSignal::new(false);
    browser_effect(move |_| dark.set(client::theme_is_dark()));
    view! {
        <button
            type="button"
            class="btn small theme-toggle"
            id="theme-toggle"
            aria-pressed=move || dark.get().to_string()
            on:click=move |_| {
                let d = !dark.get_untracked();
                client::theme_set(d);
                dark.set(d);
            }
        >
            <MoonIcon />
            "Dark theme"
        </button>
    }
}

#[component]
pub(crate) fn Header() -> impl IntoView {
    view! {
        <div class="top-bar">
            <ThemeToggle />
        </div>
        <header class="hero">
            <h1>
                <LightningIcon />
                <span>"Z-Image Turbo Studio"</span>
            </h1>
            <p class="tagline">
                "Text-to-image and image-to-image with Z-Image Turbo: live previews, a fair queue, cancel any time."
            </p>
        </header>
    }
}

/// Model name, and a plain warning when the tiny random-weight model is loaded.
#[component]
pub(crate) fn ModelBanner() -> impl IntoView {
    let info = Resource::new(|| (), |_| get_server_info());
    let jobs = expect_context::<Jobs>();
    let status = expect_context::<ServerStatus>();
    // when the server turns ready the model line changes (device, precision): ask for it again
    let was_ready = StoredValue::new(true);
    browser_effect(move |_| {
        let ready = status.ready();
        if ready && !was_ready.get_value() {
            info.refetch();
        }
        was_ready.set_value(ready);
    });
    view! {
        <StartupBanner />
        <Suspense fallback=|| ()>
            {move || {
                info.get()
                    .map(|r| match r {
                        Ok(info) => view! { <ModelInfo info /> }.into_any(),
                        Err(e) => view! { <div class="banner error">{e.reason}</div> }.into_any(),
                    })
            }}
        </Suspense>
        <Show when=move || !jobs.connected.get()>
            <div class="banner warn" role="status" data-testid="reconnecting">
                "Connection to the server lost — reconnecting…"
            </div>
        </Show>
    }
}

#[component]
pub(crate) fn ModelInfo(info: ServerInfo) -> impl IntoView {
    let tiny = info.tiny_model;
    let random_full_size = info.random_weights && !info.tiny_model;
    view! {
        <Show when=move || random_full_size>
            <div class="banner tiny" role="alert" data-testid="random-banner">
                <strong>"Benchmark mode: the full-size model with random weights. "</strong>
                "Images will look like noise; the speed is the real model's."
            </div>
        </Show>
        <Show when=move || tiny>
            <div class="banner tiny" role="alert" data-testid="tiny-banner">
                <strong>"Demo mode: tiny model with random weights. "</strong>
                "Images will look like noise. Start the server with "
                <code>"--model"</code>
                " pointing at the Z-Image-Turbo weights for real pictures."
            </div>
        </Show>
        <p class="model-line">
            "Model " <code data-testid="model-name">{info.model.clone()}</code>
            {if info.device.is_empty() { " (loading)".to_string() } else { format!(" on {}", info.device) }}
        </p>
    }
}

#[component]
pub fn NotFound() -> impl IntoView {
    #[cfg(feature = "ssr")]
    {
        if let Some(resp) = use_context::<leptos_axum::ResponseOptions>() {
            resp.set_status(axum::http::StatusCode::NOT_FOUND);
        }
    }
    view! {
        <main class="page">
            <Header />
            <div class="card center">
                <h2>"Page not found"</h2>
                <a class="btn primary" href="/">"Open the studio"</a>
            </div>
        </main>
    }
}
