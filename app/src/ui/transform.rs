//! The Transform tab: upload (pick, drop or paste), strength, result.

use super::*;

#[cfg(feature = "hydrate")]
pub(crate) fn upload_file(file: web_sys::File, upload: RwSignal<Option<UploadInfo>>, busy: RwSignal<bool>, error: RwSignal<Option<String>>) {
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
pub(crate) fn first_file(dt: Option<web_sys::DataTransfer>) -> Option<web_sys::File> {
    dt?.files()?.get(0)
}

#[component]
pub(crate) fn TransformTab(active: Signal<bool>, form: FormState) -> impl IntoView {
    let status = expect_context::<ServerStatus>();
    let FormState { prompt, negative_prompt, style, steps, strength, seed, count, .. } = form;
    let batch = Batch::new(["transform", "transform-2", "transform-3", "transform-4"]);
    let slot = batch.slots[0];
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
        if batch.active() {
            return;
        }
        let Some(info) = upload.get_untracked() else {
            return batch.fail("Please upload an image first.".into());
        };
        let seeds = match seed.value().and_then(|s| batch_seeds(s, count.get_untracked())) {
            Ok(s) => s,
            Err(e) => return batch.fail(e),
        };
        let strength = strength.get_untracked();
        batch.submit(form.requests(seeds, || JobKind::Transform { upload_id: info.upload_id.clone(), strength }));
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
                <EnhanceBar form id="tr" />
                <NegativePrompt text=negative_prompt id="tr-negative" />
                <LoraPicker form id="tr" />
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
                <VariationSlider variation=form.variation id="tr-variation" />
                <div class="grid2">
                    <SeedField seed id="tr-seed" />
                    <CountSelect count id="tr-count" />
                </div>
                <button
                    type="button"
                    class="btn primary big"
                    id="tr-submit"
                    disabled=move || batch.active() || uploading.get() || !status.ready()
                    on:click=move |_| submit.run(())
                >
                    <SparkleIcon />
                    {move || if batch.active() { "Transforming…" } else { "Transform" }}
                </button>
            </section>
            <section class="card output" aria-label="Transformed images" id="tr-output">
                <BatchView batch />
            </section>
        </div>
    }
    .into_any()
}
