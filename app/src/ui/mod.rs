//! Components, one module per panel: the studio page (Generate / Transform / History tabs), the
//! compact embed page, share pages, and the widgets and job output they share.

#[allow(unused_imports)]
use crate::api::{cancel_job, get_server_info, image_info, submit_job, upload_image};
use crate::client;
use crate::types::{
    fmt_ms, limits, AspectRatio, JobKind, JobPhase, JobRequest, JobResult, JobState, JobTicket, RatioGroup,
    ServerInfo, Style, UploadInfo, ASPECT_RATIOS, DEFAULT_RATIO, EXAMPLE_PROMPTS,
};
use leptos::prelude::*;
use leptos::task::spawn_local;
use leptos_meta::Title;
use crate::browser_effect;
use leptos_router::hooks::use_params_map;
use std::time::Duration;

mod chrome;
mod embed;
mod generate;
mod history;
mod jobs;
mod output;
mod share;
mod transform;
mod widgets;

pub use chrome::NotFound;
pub use embed::EmbedPage;
pub use jobs::provide_jobs;
pub use share::SharePage;
use chrome::*;
use generate::*;
use history::*;
use jobs::*;
use output::*;
use transform::*;
use widgets::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tab {
    Generate,
    Transform,
    History,
}

#[component]
pub fn StudioPage() -> impl IntoView {
    let tab = RwSignal::new(Tab::Generate);
    let gen_form = FormState::new();
    let tr_form = FormState::new();
    view! {
        <main class="page">
            <Header />
            <ModelBanner />
            <nav class="tabs" role="tablist">
                <button
                    role="tab"
                    id="tab-generate"
                    class:active=move || tab.get() == Tab::Generate
                    aria-selected=move || (tab.get() == Tab::Generate).to_string()
                    on:click=move |_| tab.set(Tab::Generate)
                >
                    <PaletteIcon />
                    "Generate"
                </button>
                <button
                    role="tab"
                    id="tab-transform"
                    class:active=move || tab.get() == Tab::Transform
                    aria-selected=move || (tab.get() == Tab::Transform).to_string()
                    on:click=move |_| tab.set(Tab::Transform)
                >
                    <SparkleIcon />
                    "Transform"
                </button>
                <button
                    role="tab"
                    id="tab-history"
                    class:active=move || tab.get() == Tab::History
                    aria-selected=move || (tab.get() == Tab::History).to_string()
                    on:click=move |_| tab.set(Tab::History)
                >
                    "History"
                </button>
            </nav>
            <div class="tab-panel" class:hidden=move || tab.get() != Tab::Generate>
                <GenerateTab form=gen_form />
            </div>
            <div class="tab-panel" class:hidden=move || tab.get() != Tab::Transform>
                <TransformTab active=Signal::derive(move || tab.get() == Tab::Transform) form=tr_form />
            </div>
            <div class="tab-panel" class:hidden=move || tab.get() != Tab::History>
                <HistoryTab active=Signal::derive(move || tab.get() == Tab::History) tab gen_form tr_form />
            </div>
            <footer class="footer">
                "Z-Image-Turbo by Tongyi-MAI (Apache 2.0) · served by a Rust studio · "
                <a href="/embed">"embed"</a>
            </footer>
        </main>
    }
}
