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
mod status;
mod transform;
mod widgets;

pub use chrome::NotFound;
pub use embed::EmbedPage;
pub use jobs::provide_jobs;
pub use share::SharePage;
pub use status::provide_server_status;
use chrome::*;
use generate::*;
use history::*;
use jobs::*;
use output::*;
use status::*;
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
                <TabButton tab this=Tab::Generate id="tab-generate">
                    <PaletteIcon />
                    "Generate"
                </TabButton>
                <TabButton tab this=Tab::Transform id="tab-transform">
                    <SparkleIcon />
                    "Transform"
                </TabButton>
                <TabButton tab this=Tab::History id="tab-history">
                    "History"
                </TabButton>
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

/// One of the studio's tab buttons.
#[component]
fn TabButton(tab: RwSignal<Tab>, this: Tab, #[prop(into)] id: String, children: Children) -> impl IntoView {
    view! {
        <button
            role="tab"
            id=id
            class:active=move || tab.get() == this
            aria-selected=move || (tab.get() == this).to_string()
            on:click=move |_| tab.set(this)
        >
            {children()}
        </button>
    }
}
