//! A panel's output: queue position, progress with the live preview, the result.

use super::*;

#[component]
pub(crate) fn JobView(job: JobSlot, #[prop(optional)] compact: bool) -> impl IntoView {
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
pub(crate) fn JobStateView(st: JobState, job: JobSlot, compact: bool) -> impl IntoView {
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
                <progress class="bar" max="1" value="0" aria-label="Progress"></progress>
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
                    // a <progress> element, not a width in a style attribute: the page's CSP
                    // (style-src 'self') refuses inline styles
                    <progress
                        class="bar"
                        max=total.to_string()
                        value=step.to_string()
                        aria-label="Progress"
                        data-testid="progress"
                    >
                        {format!("{pct:.0}%")}
                    </progress>
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
pub(crate) fn ResultView(result: JobResult, compact: bool) -> impl IntoView {
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

/// The output of a batch: one image as `JobView`; several as a gallery of compact views with
/// "image k of n".
#[component]
pub(crate) fn BatchView(batch: Batch) -> impl IntoView {
    move || {
        let slots = batch.current();
        if slots.len() <= 1 {
            return view! { <JobView job=batch.slots[0] /> }.into_any();
        }
        let n = slots.len();
        let status = move || {
            let done = slots.iter().filter(|s| s.state.with(|st| st.as_ref().is_some_and(|st| st.is_terminal()))).count();
            if done >= n {
                format!("{n} images done.")
            } else {
                format!("Image {} of {n}", done + 1)
            }
        };
        view! {
            <div class="batch" data-testid="batch">
                <p class="status" data-testid="batch-status">{status}</p>
                <div class="gallery">
                    {batch
                        .current()
                        .into_iter()
                        .map(|job| view! { <div class="gallery-item" data-testid="gallery-item"><JobView job compact=true /></div> })
                        .collect_view()}
                </div>
            </div>
        }
        .into_any()
    }
}
