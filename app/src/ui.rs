//! Components: the studio page (Generate / Transform tabs), the compact embed page, share pages.

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

// ---------------------------------------------------------------------------------------------
// Job slots: one per panel; websocket events are folded into the slot that owns the job.

/// The state of one panel's current job.
#[derive(Clone, Copy)]
pub struct JobSlot {
    pub state: RwSignal<Option<JobState>>,
    /// A submission or cancel error (e.g. invalid input, queue full).
    pub error: RwSignal<Option<String>>,
    /// A submission is on its way.
    pub submitting: RwSignal<bool>,
    key: &'static str,
}

/// All slots of the page plus the websocket status.
#[derive(Clone, Copy)]
pub struct Jobs {
    slots: StoredValue<Vec<JobSlot>>,
    pub connected: RwSignal<bool>,
}

pub fn provide_jobs() {
    let jobs = Jobs { slots: StoredValue::new(Vec::new()), connected: RwSignal::new(true) };
    provide_context(jobs);
    browser_effect(move |_| {
        client::ws_start(
            move |ev| {
                jobs.slots.with_value(|slots| {
                    for slot in slots {
                        slot.state.update(|s| {
                            if let Some(s) = s {
                                s.apply(&ev)
                            }
                        });
                    }
                })
            },
            move |up| jobs.connected.set(up),
        );
    });
}

impl JobSlot {
    /// `name` keeps the panel's last job for this browser tab (sessionStorage), so a reload
    /// picks up its progress or result again.
    pub fn new(name: &'static str) -> JobSlot {
        let slot = JobSlot {
            state: RwSignal::new(None),
            error: RwSignal::new(None),
            submitting: RwSignal::new(false),
            key: name,
        };
        if let Some(jobs) = use_context::<Jobs>() {
            jobs.slots.update_value(|v| v.push(slot));
        }
        browser_effect(move |prev| {
            if prev.is_some() {
                return;
            }
            let ticket = client::session_get(&slot.storage_key())
                .and_then(|t| serde_json::from_str::<JobTicket>(&t).ok());
            if let Some(t) = ticket {
                slot.state.set(Some(JobState::from_ticket(&t)));
                client::watch(&t.job_id);
            }
        });
        slot
    }

    fn storage_key(&self) -> String {
        format!("zimage.job.{}", self.key)
    }

    /// A job is queued or running (or being submitted).
    pub fn active(&self) -> bool {
        self.submitting.get()
            || self.state.with(|s| s.as_ref().is_some_and(|s| !s.is_terminal()))
    }

    pub fn submit(self, req: JobRequest) {
        if self.submitting.get_untracked() {
            return;
        }
        self.error.set(None);
        self.submitting.set(true);
        if let Some(old) = self.state.get_untracked() {
            client::unwatch(&old.job_id);
        }
        spawn_local(async move {
            match submit_job(req).await {
                Ok(ticket) => {
                    if let Ok(json) = serde_json::to_string(&ticket) {
                        client::session_set(&self.storage_key(), &json);
                    }
                    self.state.set(Some(JobState::from_ticket(&ticket)));
                    client::watch(&ticket.job_id);
                }
                Err(e) => self.error.set(Some(e.reason)),
            }
            self.submitting.set(false);
        });
    }

    pub fn cancel(self) {
        let Some(job_id) = self.state.with_untracked(|s| {
            s.as_ref().filter(|s| !s.is_terminal()).map(|s| s.job_id.clone())
        }) else {
            return;
        };
        self.state.update(|s| {
            if let Some(s) = s {
                s.cancel_requested = true
            }
        });
        spawn_local(async move {
            if let Err(e) = cancel_job(job_id).await {
                self.error.set(Some(e.reason));
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Page chrome

#[component]
fn LightningIcon() -> impl IntoView {
    view! {
        <svg class="bolt" viewBox="0 0 24 24" width="34" height="34" aria-hidden="true">
            <path d="M13 2 4 14h7l-1 8 9-12h-7l1-8z" fill="currentColor" />
        </svg>
    }
}

#[component]
fn SparkleIcon() -> impl IntoView {
    view! {
        <svg class="icon" viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">
            <path d="M12 2l1.9 5.6L19.5 9.5l-5.6 1.9L12 17l-1.9-5.6L4.5 9.5l5.6-1.9z M19 14l.9 2.6 2.6.9-2.6.9L19 21l-.9-2.6-2.6-.9 2.6-.9z" fill="currentColor" />
        </svg>
    }
}

#[component]
fn PaletteIcon() -> impl IntoView {
    view! {
        <svg class="icon" viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">
            <path d="M12 3a9 9 0 0 0 0 18c1.1 0 1.7-.8 1.7-1.6 0-.5-.2-.8-.5-1.1-.3-.3-.5-.7-.5-1.1 0-.9.7-1.6 1.6-1.6H16a5 5 0 0 0 5-5C21 6.4 17 3 12 3zm-5.5 9a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3zm3-4a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3zm5 0a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3zm3 4a1.5 1.5 0 1 1 0-3 1.5 1.5 0 0 1 0 3z" fill="currentColor" />
        </svg>
    }
}

#[component]
fn Header() -> impl IntoView {
    view! {
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
fn ModelBanner() -> impl IntoView {
    let info = Resource::new(|| (), |_| get_server_info());
    let jobs = expect_context::<Jobs>();
    view! {
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
fn ModelInfo(info: ServerInfo) -> impl IntoView {
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
            "Model " <code data-testid="model-name">{info.model.clone()}</code> " on "
            {info.device.clone()}
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Generate,
    Transform,
}

#[component]
pub fn StudioPage() -> impl IntoView {
    let tab = RwSignal::new(Tab::Generate);
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
            </nav>
            <div class="tab-panel" class:hidden=move || tab.get() != Tab::Generate>
                <GenerateTab />
            </div>
            <div class="tab-panel" class:hidden=move || tab.get() != Tab::Transform>
                <TransformTab active=Signal::derive(move || tab.get() == Tab::Transform) />
            </div>
            <footer class="footer">
                "Z-Image-Turbo by Tongyi-MAI (Apache 2.0) · served by a Rust studio · "
                <a href="/embed">"embed"</a>
            </footer>
        </main>
    }
}

// ---------------------------------------------------------------------------------------------
// Shared controls

#[component]
fn PromptBox(prompt: RwSignal<String>, on_submit: Callback<()>, #[prop(into)] id: String) -> impl IntoView {
    view! {
        <label class="field">
            <span class="label">"Prompt"</span>
            <textarea
                id=id
                rows="4"
                maxlength=limits::MAX_PROMPT_CHARS.to_string()
                placeholder="Describe the image you want…"
                prop:value=move || prompt.get()
                on:input=move |ev| prompt.set(event_target_value(&ev))
                on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                    if ev.key() == "Enter" && (ev.ctrl_key() || ev.meta_key()) {
                        ev.prevent_default();
                        on_submit.run(());
                    }
                }
            ></textarea>
            <span class="hint">"Ctrl+Enter to submit"</span>
        </label>
    }
}

#[component]
fn StyleSelect(style: RwSignal<Style>, #[prop(into)] id: String) -> impl IntoView {
    view! {
        <label class="field">
            <span class="label">"Style"</span>
            <select
                id=id
                on:change=move |ev| {
                    if let Some(s) = Style::from_slug(&event_target_value(&ev)) {
                        style.set(s)
                    }
                }
            >
                {Style::ALL
                    .into_iter()
                    .map(|s| {
                        view! {
                            <option value=s.slug() selected=move || style.get() == s>
                                {s.label()}
                            </option>
                        }
                    })
                    .collect_view()}
            </select>
        </label>
    }
}

#[component]
fn RatioSelect(ratio: RwSignal<AspectRatio>, #[prop(into)] id: String) -> impl IntoView {
    view! {
        <label class="field">
            <span class="label">"Aspect ratio"</span>
            <select
                id=id
                on:change=move |ev| {
                    if let Some(r) = AspectRatio::from_key(&event_target_value(&ev)) {
                        ratio.set(r)
                    }
                }
            >
                {RatioGroup::ALL
                    .into_iter()
                    .map(|g| {
                        view! {
                            <optgroup label=g.label()>
                                {ASPECT_RATIOS
                                    .iter()
                                    .filter(|r| r.group == g)
                                    .map(|r| {
                                        let r = *r;
                                        view! {
                                            <option value=r.key() selected=move || ratio.get() == r>
                                                {r.label()}
                                            </option>
                                        }
                                    })
                                    .collect_view()}
                            </optgroup>
                        }
                    })
                    .collect_view()}
            </select>
        </label>
    }
}

#[component]
fn StepsSlider(steps: RwSignal<u32>, #[prop(into)] id: String) -> impl IntoView {
    view! {
        <label class="field">
            <span class="label">"Steps " <output>{move || steps.get()}</output></span>
            <input
                id=id
                type="range"
                min=limits::MIN_STEPS.to_string()
                max=limits::MAX_STEPS.to_string()
                step="1"
                prop:value=move || steps.get().to_string()
                on:input=move |ev| {
                    if let Ok(v) = event_target_value(&ev).parse() {
                        steps.set(v)
                    }
                }
            />
        </label>
    }
}

/// Seed field with a "random" toggle.
#[derive(Clone, Copy)]
struct SeedState {
    text: RwSignal<String>,
    random: RwSignal<bool>,
}

impl SeedState {
    fn new() -> Self {
        SeedState { text: RwSignal::new("42".into()), random: RwSignal::new(true) }
    }
    /// `Ok(None)` = random; an unparsable number is an error for the user.
    fn value(&self) -> Result<Option<u64>, String> {
        if self.random.get_untracked() {
            return Ok(None);
        }
        let t = self.text.get_untracked();
        t.trim().parse::<u64>().map(Some).map_err(|_| {
            format!("The seed must be a whole number between 0 and {}.", limits::MAX_SEED)
        })
    }
}

#[component]
fn SeedField(seed: SeedState, #[prop(into)] id: String) -> impl IntoView {
    let random_id = format!("{id}-random");
    view! {
        <div class="field seed-field">
            <span class="label">"Seed"</span>
            <div class="row">
                <input
                    id=id
                    type="number"
                    min="0"
                    max=limits::MAX_SEED.to_string()
                    inputmode="numeric"
                    prop:value=move || seed.text.get()
                    disabled=move || seed.random.get()
                    on:input=move |ev| seed.text.set(event_target_value(&ev))
                />
                <label class="check">
                    <input
                        id=random_id
                        type="checkbox"
                        prop:checked=move || seed.random.get()
                        on:change=move |ev| seed.random.set(event_target_checked(&ev))
                    />
                    "Random"
                </label>
            </div>
        </div>
    }
}

/// Copy-to-clipboard button with a short "Copied" acknowledgement.
#[component]
fn CopyButton(#[prop(into)] text: Signal<String>, #[prop(into)] label: String, #[prop(into)] testid: String) -> impl IntoView {
    let copied = RwSignal::new(false);
    view! {
        <button
            type="button"
            class="btn small"
            data-testid=testid
            on:click=move |_| {
                client::copy_text(&text.get_untracked());
                copied.set(true);
                set_timeout(move || copied.set(false), Duration::from_millis(1500));
            }
        >
            {move || if copied.get() { "Copied ✓".to_string() } else { label.clone() }}
        </button>
    }
}

// ---------------------------------------------------------------------------------------------
// Output: progress, preview, result

#[component]
fn JobView(job: JobSlot, #[prop(optional)] compact: bool) -> impl IntoView {
    view! {
        <div class="job-view" data-testid="job-view">
            <Show when=move || job.error.get().is_some()>
                <div class="alert error" role="alert" data-testid="error">
                    {move || job.error.get().unwrap_or_default()}
                </div>
            </Show>
            {move || match job.state.get() {
                None => {
                    if job.submitting.get() {
                        view! { <div class="placeholder">"Submitting…"</div> }.into_any()
                    } else {
                        view! {
                            <div class="placeholder" data-testid="placeholder">
                                <LightningIcon />
                                <p>"Your image will appear here."</p>
                            </div>
                        }
                            .into_any()
                    }
                }
                Some(st) => view! { <JobStateView st job compact /> }.into_any(),
            }}
        </div>
    }
}

#[component]
fn JobStateView(st: JobState, job: JobSlot, compact: bool) -> impl IntoView {
    let cancel_btn = move |requested: bool| {
        view! {
            <button
                type="button"
                class="btn danger"
                data-testid="cancel"
                disabled=requested
                on:click=move |_| job.cancel()
            >
                {if requested { "Cancelling…" } else { "Cancel" }}
            </button>
        }
    };
    match st.phase.clone() {
        JobPhase::Queued { position } => view! {
            <div class="progress-box" data-testid="queued">
                <p class="status">
                    {if position <= 1 {
                        "Waiting for the worker — you are next.".to_string()
                    } else {
                        format!("In the queue: position {position}.")
                    }}
                </p>
                <div class="bar"><div class="fill" style="width:0%"></div></div>
                {cancel_btn(st.cancel_requested)}
            </div>
        }
        .into_any(),
        JobPhase::Running { step, total, elapsed_ms, eta_ms } => {
            let pct = st.progress() * 100.0;
            view! {
                <div class="progress-box" data-testid="running">
                    <p class="status" data-testid="step-text">
                        {if step == 0 {
                            "Encoding the prompt…".to_string()
                        } else if step >= total {
                            format!(
                                "Step {step}/{total} · {} elapsed · decoding the image…",
                                fmt_ms(elapsed_ms),
                            )
                        } else {
                            format!(
                                "Step {step}/{total} · {} elapsed · ~{} left",
                                fmt_ms(elapsed_ms),
                                fmt_ms(eta_ms),
                            )
                        }}
                    </p>
                    <div
                        class="bar"
                        role="progressbar"
                        aria-valuemin="0"
                        aria-valuemax=total.to_string()
                        aria-valuenow=step.to_string()
                    >
                        <div class="fill" style=format!("width:{pct:.1}%")></div>
                    </div>
                    {st
                        .preview
                        .clone()
                        .map(|src| {
                            view! {
                                <img
                                    class="preview"
                                    data-testid="preview"
                                    data-step=step.to_string()
                                    src=src
                                    alt="Live preview"
                                    width=st.width.to_string()
                                    height=st.height.to_string()
                                />
                            }
                        })}
                    {cancel_btn(st.cancel_requested)}
                </div>
            }
            .into_any()
        }
        JobPhase::Done(result) => view! { <ResultView result=*result compact /> }.into_any(),
        JobPhase::Failed(reason) => view! {
            <div class="alert error" role="alert" data-testid="job-error">{reason}</div>
        }
        .into_any(),
        JobPhase::Cancelled => view! {
            <div class="alert info" data-testid="cancelled">"Cancelled."</div>
        }
        .into_any(),
    }
}

#[component]
fn ResultView(result: JobResult, compact: bool) -> impl IntoView {
    let origin = client::origin();
    let share_abs = format!("{origin}{}", result.share_url);
    let seed_text = result.seed.to_string();
    let t = result.timings.clone();
    let download_name = format!("zimage-{}-{}x{}.png", result.seed, result.width, result.height);
    view! {
        <div class="result" data-testid="result">
            <a href=result.image_url.clone() target="_blank" rel="noopener">
                <img
                    class="result-image"
                    data-testid="result-image"
                    src=result.image_url.clone()
                    alt=result.prompt.clone()
                    width=result.width.to_string()
                    height=result.height.to_string()
                />
            </a>
            <Show when=move || result.prompt_truncated>
                <p class="alert info">"The prompt was longer than the text encoder reads; its end was cut."</p>
            </Show>
            <div class="result-meta">
                <div class="meta-row">
                    <span>"Seed "<code data-testid="result-seed">{seed_text.clone()}</code></span>
                    <CopyButton text=seed_text.clone() label="Copy seed" testid="copy-seed" />
                    <span class="dim">{format!("{}×{} · {} steps", result.width, result.height, result.steps)}</span>
                </div>
                <Show when=move || !compact>
                    <div class="timings" data-testid="timings">
                        <span>"Text encoding " {fmt_ms(t.text_encoding_ms)}</span>
                        {(t.vae_encode_ms > 0).then(|| view! { <span>"VAE encode " {fmt_ms(t.vae_encode_ms)}</span> })}
                        <span>"Denoising " {fmt_ms(t.denoising_ms)}</span>
                        <span>"VAE decode " {fmt_ms(t.vae_decode_ms)}</span>
                        <span><strong>"Total " {fmt_ms(t.total_ms)}</strong></span>
                        {(t.queued_ms > 0).then(|| view! { <span class="dim">"(queued " {fmt_ms(t.queued_ms)} ")"</span> })}
                    </div>
                </Show>
                <div class="meta-row">
                    <a class="btn primary" data-testid="download" href=result.image_url.clone() download=download_name>
                        "Download PNG"
                    </a>
                    <a class="btn" data-testid="share-open" href=result.share_url.clone() target="_blank" rel="noopener">
                        "Open share page"
                    </a>
                </div>
                <div class="meta-row share">
                    <input class="share-url" data-testid="share-url" readonly prop:value=share_abs.clone() aria-label="Share link" />
                    <CopyButton text=share_abs.clone() label="Copy link" testid="copy-share" />
                </div>
            </div>
        </div>
    }
}

// ---------------------------------------------------------------------------------------------
// Generate tab

#[component]
fn GenerateTab() -> impl IntoView {
    let prompt = RwSignal::new(String::new());
    let style = RwSignal::new(Style::None);
    let ratio = RwSignal::new(DEFAULT_RATIO);
    let steps = RwSignal::new(limits::DEFAULT_STEPS);
    let seed = SeedState::new();
    let slot = JobSlot::new("generate");

    // show the seed that was used, so unticking "Random" reproduces the image
    browser_effect(move |_| {
        if let Some(JobState { phase: JobPhase::Done(r), .. }) = slot.state.get() {
            seed.text.set(r.seed.to_string());
        }
    });

    let submit = Callback::new(move |_: ()| {
        if slot.active() {
            return;
        }
        let seed = match seed.value() {
            Ok(s) => s,
            Err(e) => return slot.error.set(Some(e)),
        };
        let r = ratio.get_untracked();
        slot.submit(JobRequest {
            negative_prompt: String::new(),
            prompt: prompt.get_untracked(),
            style: style.get_untracked(),
            steps: steps.get_untracked(),
            seed,
            kind: JobKind::Generate { width: r.width, height: r.height },
        });
    });

    view! {
        <div class="columns">
            <section class="card controls" aria-label="Generate settings">
                <PromptBox prompt on_submit=submit id="gen-prompt" />
                <div class="examples">
                    <span class="label">"Examples"</span>
                    <div class="chips">
                        {EXAMPLE_PROMPTS
                            .iter()
                            .map(|(title, text)| {
                                let text = text.to_string();
                                view! {
                                    <button type="button" class="chip" title=text.clone() on:click=move |_| prompt.set(text.clone())>
                                        {*title}
                                    </button>
                                }
                            })
                            .collect_view()}
                    </div>
                </div>
                <div class="grid2">
                    <StyleSelect style id="gen-style" />
                    <RatioSelect ratio id="gen-ratio" />
                </div>
                <StepsSlider steps id="gen-steps" />
                <SeedField seed id="gen-seed" />
                <button
                    type="button"
                    class="btn primary big"
                    id="gen-submit"
                    disabled=move || slot.active()
                    on:click=move |_| submit.run(())
                >
                    <span class="btn-icon"><LightningIcon /></span>
                    {move || if slot.active() { "Generating…" } else { "Generate" }}
                </button>
            </section>
            <section class="card output" aria-label="Result" id="gen-output">
                <JobView job=slot />
            </section>
        </div>
    }
    .into_any()
}

// ---------------------------------------------------------------------------------------------
// Transform tab

#[cfg(feature = "hydrate")]
fn upload_file(file: web_sys::File, upload: RwSignal<Option<UploadInfo>>, busy: RwSignal<bool>, error: RwSignal<Option<String>>) {
    if file.size() > limits::MAX_UPLOAD_BYTES as f64 {
        error.set(Some(format!(
            "The image is too large ({:.1} MB): at most {} MB.",
            file.size() / 1_048_576.0,
            limits::MAX_UPLOAD_BYTES / 1_048_576
        )));
        return;
    }
    let Ok(form) = web_sys::FormData::new() else { return };
    if form.append_with_blob_and_filename("image", &file, &file.name()).is_err() {
        return;
    }
    error.set(None);
    busy.set(true);
    spawn_local(async move {
        match upload_image(form.into()).await {
            Ok(info) => upload.set(Some(info)),
            Err(e) => error.set(Some(e.reason)),
        }
        busy.set(false);
    });
}

#[cfg(feature = "hydrate")]
fn first_file(dt: Option<web_sys::DataTransfer>) -> Option<web_sys::File> {
    dt?.files()?.get(0)
}

#[component]
fn TransformTab(active: Signal<bool>) -> impl IntoView {
    let prompt = RwSignal::new(String::new());
    let style = RwSignal::new(Style::None);
    let steps = RwSignal::new(limits::DEFAULT_STEPS);
    let strength = RwSignal::new(limits::DEFAULT_STRENGTH);
    let seed = SeedState::new();
    let slot = JobSlot::new("transform");
    let upload: RwSignal<Option<UploadInfo>> = RwSignal::new(None);
    let uploading = RwSignal::new(false);
    let upload_error: RwSignal<Option<String>> = RwSignal::new(None);
    let dragging = RwSignal::new(false);
    let _ = (active, uploading, upload_error, dragging);

    browser_effect(move |_| {
        if let Some(JobState { phase: JobPhase::Done(r), .. }) = slot.state.get() {
            seed.text.set(r.seed.to_string());
        }
    });

    // paste an image anywhere while this tab is open
    #[cfg(feature = "hydrate")]
    browser_effect(move |_| {
        let handle = window_event_listener(leptos::ev::paste, move |ev| {
            if !active.get_untracked() {
                return;
            }
            if let Some(file) = first_file(ev.clipboard_data()) {
                ev.prevent_default();
                upload_file(file, upload, uploading, upload_error);
            }
        });
        on_cleanup(move || handle.remove());
    });

    let submit = Callback::new(move |_: ()| {
        if slot.active() {
            return;
        }
        let Some(info) = upload.get_untracked() else {
            return slot.error.set(Some("Please upload an image first.".into()));
        };
        let seed = match seed.value() {
            Ok(s) => s,
            Err(e) => return slot.error.set(Some(e)),
        };
        slot.submit(JobRequest {
            negative_prompt: String::new(),
            prompt: prompt.get_untracked(),
            style: style.get_untracked(),
            steps: steps.get_untracked(),
            seed,
            kind: JobKind::Transform { upload_id: info.upload_id, strength: strength.get_untracked() },
        });
    });

    view! {
        <div class="columns">
            <section class="card controls" aria-label="Transform settings">
                <div
                    class="dropzone"
                    class:dragging=move || dragging.get()
                    data-testid="dropzone"
                    on:dragover=move |ev| {
                        ev.prevent_default();
                        dragging.set(true);
                    }
                    on:dragleave=move |_| dragging.set(false)
                    on:drop=move |ev| {
                        ev.prevent_default();
                        dragging.set(false);
                        #[cfg(feature = "hydrate")]
                        if let Some(file) = first_file(ev.data_transfer()) {
                            upload_file(file, upload, uploading, upload_error);
                        }
                        #[cfg(not(feature = "hydrate"))]
                        let _ = ev;
                    }
                >
                    {move || match upload.get() {
                        Some(info) => view! {
                            <img class="input-preview" data-testid="input-preview" src=info.url.clone() alt="Input image" />
                            <p class="size-note" data-testid="input-size">
                                {format!(
                                    "Input {}×{} → will run at {}×{}",
                                    info.original_width,
                                    info.original_height,
                                    info.width,
                                    info.height,
                                )}
                            </p>
                        }
                        .into_any(),
                        None => view! {
                            <p class="drop-hint">
                                <strong>"Drop an image here"</strong>
                                ", paste one (Ctrl+V), or pick a file."
                            </p>
                            <p class="dim">"PNG, JPEG or WebP, up to 20 MB. Resized to 512–2048 px in multiples of 16."</p>
                        }
                        .into_any(),
                    }}
                    <label class="btn">
                        {move || if uploading.get() { "Uploading…" } else { "Choose image…" }}
                        <input
                            id="tr-file"
                            type="file"
                            class="visually-hidden"
                            accept=limits::UPLOAD_TYPES.join(",")
                            on:change=move |ev| {
                                #[cfg(feature = "hydrate")]
                                {
                                    use wasm_bindgen::JsCast;
                                    let input: web_sys::HtmlInputElement = ev.target().unwrap().unchecked_into();
                                    if let Some(file) = input.files().and_then(|f| f.get(0)) {
                                        upload_file(file, upload, uploading, upload_error);
                                    }
                                    input.set_value("");
                                }
                                #[cfg(not(feature = "hydrate"))]
                                let _ = ev;
                            }
                        />
                    </label>
                    <Show when=move || upload_error.get().is_some()>
                        <div class="alert error" role="alert" data-testid="upload-error">
                            {move || upload_error.get().unwrap_or_default()}
                        </div>
                    </Show>
                </div>
                <PromptBox prompt on_submit=submit id="tr-prompt" />
                <div class="grid2">
                    <StyleSelect style id="tr-style" />
                    <label class="field">
                        <span class="label">"Strength " <output>{move || format!("{:.2}", strength.get())}</output></span>
                        <input
                            id="tr-strength"
                            type="range"
                            min=limits::MIN_STRENGTH.to_string()
                            max=limits::MAX_STRENGTH.to_string()
                            step="0.05"
                            prop:value=move || strength.get().to_string()
                            on:input=move |ev| {
                                if let Ok(v) = event_target_value(&ev).parse() {
                                    strength.set(v)
                                }
                            }
                        />
                        <span class="hint">"Low keeps the input, high follows the prompt."</span>
                    </label>
                </div>
                <StepsSlider steps id="tr-steps" />
                <SeedField seed id="tr-seed" />
                <button
                    type="button"
                    class="btn primary big"
                    id="tr-submit"
                    disabled=move || slot.active() || uploading.get()
                    on:click=move |_| submit.run(())
                >
                    <SparkleIcon />
                    {move || if slot.active() { "Transforming…" } else { "Transform" }}
                </button>
            </section>
            <section class="card output" aria-label="Result" id="tr-output">
                <JobView job=slot />
            </section>
        </div>
    }
    .into_any()
}

// ---------------------------------------------------------------------------------------------
// Embed: compact generate UI; tells the parent page when an image is done.

#[component]
pub fn EmbedPage() -> impl IntoView {
    let prompt = RwSignal::new(String::new());
    let ratio = RwSignal::new(DEFAULT_RATIO);
    let slot = JobSlot::new("embed");
    let posted: StoredValue<Option<String>> = StoredValue::new(None);

    browser_effect(move |_| {
        if let Some(JobState { job_id, phase: JobPhase::Done(r), .. }) = slot.state.get() {
            if posted.get_value().as_deref() != Some(job_id.as_str()) {
                posted.set_value(Some(job_id.clone()));
                let origin = client::origin();
                let msg = serde_json::json!({
                    "type": "zimage:done",
                    "jobId": job_id,
                    "imageUrl": format!("{origin}{}", r.image_url),
                    "shareUrl": format!("{origin}{}", r.share_url),
                    "seed": r.seed,
                    "width": r.width,
                    "height": r.height,
                    "prompt": r.prompt,
                });
                client::post_to_parent(&msg.to_string());
            }
        }
    });

    let submit = Callback::new(move |_: ()| {
        if slot.active() {
            return;
        }
        let r = ratio.get_untracked();
        slot.submit(JobRequest {
            negative_prompt: String::new(),
            prompt: prompt.get_untracked(),
            style: Style::None,
            steps: limits::DEFAULT_STEPS,
            seed: None,
            kind: JobKind::Generate { width: r.width, height: r.height },
        });
    });

    view! {
        <Title text="Z-Image Turbo — embed" />
        <main class="embed">
            <ModelBanner />
            <div class="card">
                <PromptBox prompt on_submit=submit id="embed-prompt" />
                <div class="row">
                    <RatioSelect ratio id="embed-ratio" />
                    <button
                        type="button"
                        class="btn primary"
                        id="embed-submit"
                        disabled=move || slot.active()
                        on:click=move |_| submit.run(())
                    >
                        <span class="btn-icon"><LightningIcon /></span>
                        "Generate"
                    </button>
                </div>
                <JobView job=slot compact=true />
                <p class="powered">
                    <a href="/" target="_blank" rel="noopener"><LightningIcon />" Z-Image Turbo Studio"</a>
                </p>
            </div>
        </main>
    }
}

// ---------------------------------------------------------------------------------------------
// Share page: a stored image with its parameters.

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
fn ShareView(result: JobResult) -> impl IntoView {
    let title = format!("{} — Z-Image Turbo", truncate(&result.prompt, 60));
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
            {result.tiny_model.then(|| view! { <p class="banner tiny">"Made with the tiny random-weight demo model."</p> })}
            <div class="meta-row">
                <a class="btn primary" href=result.image_url.clone() download=format!("zimage-{}.png", result.seed)>"Download PNG"</a>
                <a class="btn" href="/">"Make your own"</a>
            </div>
        </div>
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}
