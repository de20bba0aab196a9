//! The embed page: a compact Generate UI that tells the parent page when an image is done.

use super::*;

#[component]
pub fn EmbedPage() -> impl IntoView {
    let status = expect_context::<ServerStatus>();
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
            loras: Vec::new(),
            variation: 0.0,
            variation_seed: None,
            written_prompt: None,
        });
    });

    view! {
        <Title text="Z-Image Turbo — embed" />
        <main class="embed">
            <h1 class="visually-hidden">"Z-Image Turbo: generate an image"</h1>
            <ModelBanner />
            <div class="card">
                <PromptBox prompt on_submit=submit id="embed-prompt" />
                <div class="row">
                    <RatioSelect ratio id="embed-ratio" />
                    <button
                        type="button"
                        class="btn primary"
                        id="embed-submit"
                        disabled=move || slot.active() || !status.ready()
                        on:click=move |_| submit.run(())
                    >
                        <span class="btn-icon"><LightningIcon /></span>
                        "Generate"
                    </button>
                </div>
                <JobView job=slot compact=true />
                <ProgressAnnouncer current=Signal::derive(move || slot.state.get().map(|st| (0, 1, st))) />
                <p class="powered">
                    <a href="/" target="_blank" rel="noopener"><LightningIcon />" Z-Image Turbo Studio"</a>
                </p>
            </div>
        </main>
    }
}

// ---------------------------------------------------------------------------------------------
// Share page: a stored image with its parameters.
