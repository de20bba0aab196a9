//! Components, one module per panel: the studio page (Generate / Transform / History tabs), the
//! compact embed page, share pages, and the widgets and job output they share.

#[allow(unused_imports)]
use crate::api::{cancel_job, get_server_info, image_info, submit_job, upload_image};
use crate::client;
use crate::types::{
    fmt_ms, limits, AspectRatio, JobKind, JobPhase, JobRequest, JobResult, JobState, JobTicket, LoraChoice, RatioGroup,
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
mod enhance;
mod generate;
mod history;
mod jobs;
mod loras;
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
use enhance::*;
use generate::*;
use history::*;
use jobs::*;
use loras::*;
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
            <div class="tabs" role="tablist" aria-label="Studio" on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                // arrow keys move between the tabs (one tab stop for the whole bar)
                let i = Tab::ALL.iter().position(|t| *t == tab.get_untracked()).unwrap_or(0);
                let n = Tab::ALL.len();
                let next = match ev.key().as_str() {
                    "ArrowRight" => (i + 1) % n,
                    "ArrowLeft" => (i + n - 1) % n,
                    "Home" => 0,
                    "End" => n - 1,
                    _ => return,
                };
                ev.prevent_default();
                tab.set(Tab::ALL[next]);
                client::focus_element(Tab::ALL[next].tab_id());
            }>
                <TabButton tab this=Tab::Generate>
                    <PaletteIcon />
                    "Generate"
                </TabButton>
                <TabButton tab this=Tab::Transform>
                    <SparkleIcon />
                    "Transform"
                </TabButton>
                <TabButton tab this=Tab::History>
                    "History"
                </TabButton>
            </div>
            <TabPanel tab this=Tab::Generate>
                <GenerateTab form=gen_form />
            </TabPanel>
            <TabPanel tab this=Tab::Transform>
                <TransformTab active=Signal::derive(move || tab.get() == Tab::Transform) form=tr_form />
            </TabPanel>
            <TabPanel tab this=Tab::History>
                <HistoryTab active=Signal::derive(move || tab.get() == Tab::History) tab gen_form tr_form />
            </TabPanel>
            <footer class="footer">
                "Z-Image-Turbo by Tongyi-MAI (Apache 2.0) · served by a Rust studio · "
                <a href="/embed">"embed"</a>
            </footer>
        </main>
    }
}

impl Tab {
    const ALL: [Tab; 3] = [Tab::Generate, Tab::Transform, Tab::History];

    fn tab_id(self) -> &'static str {
        match self {
            Tab::Generate => "tab-generate",
            Tab::Transform => "tab-transform",
            Tab::History => "tab-history",
        }
    }

    fn panel_id(self) -> &'static str {
        match self {
            Tab::Generate => "panel-generate",
            Tab::Transform => "panel-transform",
            Tab::History => "panel-history",
        }
    }
}

/// One of the studio's tab buttons (only the selected one is in the Tab order).
#[component]
fn TabButton(tab: RwSignal<Tab>, this: Tab, children: Children) -> impl IntoView {
    view! {
        <button
            type="button"
            role="tab"
            id=this.tab_id()
            aria-controls=this.panel_id()
            class:active=move || tab.get() == this
            aria-selected=move || (tab.get() == this).to_string()
            tabindex=move || if tab.get() == this { "0" } else { "-1" }
            on:click=move |_| tab.set(this)
        >
            {children()}
        </button>
    }
}

/// The panel a tab shows (hidden while another tab is selected).
#[component]
fn TabPanel(tab: RwSignal<Tab>, this: Tab, children: Children) -> impl IntoView {
    view! {
        <div
            class="tab-panel"
            role="tabpanel"
            id=this.panel_id()
            aria-labelledby=this.tab_id()
            class:hidden=move || tab.get() != this
        >
            {children()}
        </div>
    }
}
