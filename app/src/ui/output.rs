//! A panel's output: queue position, progress with the live preview, the result, and what a
//! screen reader hears of it.

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
    // what to announce: the image being made (the first unfinished one), else the last
    let current = Signal::derive(move || {
        let slots = batch.current();
        let n = slots.len();
        let states: Vec<Option<JobState>> = slots.iter().map(|s| s.state.get()).collect();
        let i = states.iter().position(|st| st.as_ref().is_some_and(|st| !st.is_terminal())).unwrap_or(n - 1);
        states[i].clone().map(|st| (i, n, st))
    });
    view! {
        <ProgressAnnouncer current />
        {move || batch_gallery(batch)}
    }
}

fn batch_gallery(batch: Batch) -> AnyView {
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

/// The stage of a job a screen reader is told about; a new stage is announced at once, a new step
/// or queue position only every `ANNOUNCE_EVERY_MS`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stage {
    Queued,
    Encoding,
    Steps,
    Decoding,
    Done,
    Failed,
    Cancelled,
}

/// The least time between two announcements of the same stage (steps, queue positions): a screen
/// reader hears the step and the time left now and then, not every tick.
pub(crate) const ANNOUNCE_EVERY_MS: f64 = 5000.0;

/// The sentence for image `i` of `n` in state `st`.
pub(crate) fn announcement(i: usize, n: usize, st: &JobState) -> (Stage, String) {
    let (stage, text) = match &st.phase {
        JobPhase::Queued { position } if *position <= 1 => (Stage::Queued, "Waiting for the worker: you are next.".to_string()),
        JobPhase::Queued { position } => (Stage::Queued, format!("In the queue: position {position}.")),
        JobPhase::Running { step: 0, .. } => (Stage::Encoding, "Started: encoding the prompt.".to_string()),
        JobPhase::Running { step, total, .. } if step >= total => (Stage::Decoding, "Decoding the image.".to_string()),
        JobPhase::Running { step, total, eta_ms, .. } => {
            (Stage::Steps, format!("Step {step} of {total}, about {} left.", fmt_ms(*eta_ms)))
        }
        JobPhase::Done(r) => (Stage::Done, format!("Image ready: {}×{}, seed {}.", r.width, r.height, r.seed)),
        JobPhase::Failed(_) => (Stage::Failed, "The image failed; the reason is shown.".to_string()),
        JobPhase::Cancelled => (Stage::Cancelled, "Cancelled.".to_string()),
    };
    if n > 1 {
        (stage, format!("Image {} of {n}: {text}", i + 1))
    } else {
        (stage, text)
    }
}

/// Whether to announce `(image, stage)` at `now_ms`, given the last announcement and its time.
pub(crate) fn should_announce(last: Option<((usize, Stage), f64)>, key: (usize, Stage), now_ms: f64) -> bool {
    match last {
        None => true,
        Some((prev, _)) if prev != key => true,
        Some((_, at)) => matches!(key.1, Stage::Queued | Stage::Steps) && now_ms - at >= ANNOUNCE_EVERY_MS,
    }
}

/// A polite live region (visually hidden) announcing a panel's progress: each stage once, the
/// step and the time left at most every few seconds, the result.
#[component]
pub(crate) fn ProgressAnnouncer(current: Signal<Option<(usize, usize, JobState)>>) -> impl IntoView {
    let text = RwSignal::new(String::new());
    let last: StoredValue<Option<((usize, Stage), f64)>> = StoredValue::new(None);
    browser_effect(move |_| {
        let Some((i, n, st)) = current.get() else { return };
        let (stage, sentence) = announcement(i, n, &st);
        let now = client::now_ms();
        if should_announce(last.get_value(), (i, stage), now) && text.get_untracked() != sentence {
            last.set_value(Some(((i, stage), now)));
            text.set(sentence);
        }
    });
    view! {
        <p class="visually-hidden" role="status" aria-live="polite" aria-atomic="true" data-testid="announcer">
            {move || text.get()}
        </p>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(phase: JobPhase) -> JobState {
        JobState {
            job_id: "j".into(),
            seed: 7,
            width: 1024,
            height: 768,
            phase,
            preview: None,
            steps_seen: 0,
            cancel_requested: false,
        }
    }

    #[test]
    fn sentences_name_the_step_and_the_time_left() {
        let running = |step| state(JobPhase::Running { step, total: 8, elapsed_ms: 900, eta_ms: 2400 });
        assert_eq!(announcement(0, 1, &running(3)), (Stage::Steps, "Step 3 of 8, about 2.4 s left.".into()));
        assert_eq!(announcement(0, 1, &running(0)).0, Stage::Encoding);
        assert_eq!(announcement(0, 1, &running(8)), (Stage::Decoding, "Decoding the image.".into()));
        assert_eq!(announcement(1, 3, &running(3)).1, "Image 2 of 3: Step 3 of 8, about 2.4 s left.");
        assert_eq!(announcement(0, 1, &state(JobPhase::Queued { position: 3 })).1, "In the queue: position 3.");
        assert_eq!(announcement(0, 1, &state(JobPhase::Cancelled)).0, Stage::Cancelled);
    }

    #[test]
    fn steps_are_announced_every_few_seconds_stages_at_once() {
        let steps = (0, Stage::Steps);
        assert!(should_announce(None, steps, 0.0));
        // the next steps within the interval stay quiet, later ones are heard
        assert!(!should_announce(Some((steps, 1000.0)), steps, 1000.0 + ANNOUNCE_EVERY_MS - 1.0));
        assert!(should_announce(Some((steps, 1000.0)), steps, 1000.0 + ANNOUNCE_EVERY_MS));
        // a new stage, or the next image of a batch, is heard at once
        assert!(should_announce(Some((steps, 1000.0)), (0, Stage::Decoding), 1001.0));
        assert!(should_announce(Some((steps, 1000.0)), (1, Stage::Steps), 1001.0));
        // a finished job is announced once
        assert!(!should_announce(Some(((0, Stage::Done), 0.0)), (0, Stage::Done), 1e9));
    }
}
