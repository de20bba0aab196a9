//! Z-Image Turbo Studio: the Leptos app (components, server functions, shared types).
//!
//! Built twice: with `ssr` into the server (renders pages, runs server functions) and with
//! `hydrate` into the browser's wasm (`frontend` crate).

#![recursion_limit = "256"]

pub mod api;
#[cfg(feature = "ssr")]
pub mod backend;
pub mod client;
pub mod error;
pub mod restore;
pub mod types;
mod ui;

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, Stylesheet, Title};
use leptos_router::{
    components::{Route, Router, Routes},
    path,
};

pub use error::{ErrorKind, StudioError};

/// Name of the wasm/js/css bundle under `/pkg` (`[[workspace.metadata.leptos]] name`).
pub const OUTPUT_NAME: &str = "zimage";

/// Runs an effect in the browser only. Building the whole workspace at once makes cargo unify the
/// `hydrate` feature into the server's copy of this crate, and an effect created there would try to
/// spawn a local task outside any `LocalSet`.
pub(crate) fn browser_effect(f: impl FnMut(Option<()>) + 'static) {
    if cfg!(target_arch = "wasm32") {
        Effect::new(f);
    }
}

/// The HTML document around the app (rendered on the server only).
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <meta name="description" content="Fast text-to-image and image-to-image with Z-Image Turbo, live previews, in your browser." />
                <meta name="theme-color" content="#2563eb" media="(prefers-color-scheme: light)" />
                <meta name="theme-color" content="#0f172a" media="(prefers-color-scheme: dark)" />
                // the theme chosen with the toggle, applied before the first paint (a static
                // file: the CSP allows no inline script of ours)
                <script src="/theme.js"></script>
                <link rel="icon" href="/favicon.ico" sizes="any" />
                <link rel="icon" href="/icons/icon.svg" type="image/svg+xml" />
                <link rel="apple-touch-icon" href="/icons/icon-192.png" />
                <link rel="manifest" href="/manifest.webmanifest" />
                <script src="/register-sw.js" defer></script>
                <HydrationScripts options />
                <leptos_meta::MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    ui::provide_jobs();
    ui::provide_server_status();
    // effects run only in the browser, after hydration: tests wait for this marker
    browser_effect(|_| {
        if let Some(body) = document().body() {
            let _ = body.set_attribute("data-hydrated", "true");
        }
    });
    view! {
        <Stylesheet id="leptos" href=format!("/pkg/{OUTPUT_NAME}.css") />
        <Title text="Z-Image Turbo Studio" />
        <Router>
            <Routes fallback=|| view! { <ui::NotFound /> }>
                <Route path=path!("") view=ui::StudioPage />
                <Route path=path!("/embed") view=ui::EmbedPage />
                <Route path=path!("/share/:id") view=ui::SharePage />
            </Routes>
        </Router>
    }
}
