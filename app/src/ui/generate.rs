//! The Generate tab.

use super::*;

/// Reads a picked or dropped PNG and fills the form from its `parameters` text; `note` says what
/// was restored and what was not.
#[cfg(feature = "hydrate")]
fn restore_from_png(file: web_sys::File, form: FormState, note: RwSignal<Option<String>>) {
    spawn_local(async move {
        let bytes = match wasm_bindgen_futures::JsFuture::from(file.array_buffer()).await {
            Ok(buf) => js_sys::Uint8Array::new(&buf).to_vec(),
            Err(_) => return note.set(Some("The file could not be read.".into())),
        };
        let msg = match crate::restore::png_text(&bytes, "parameters") {
            None => "This file holds no generation settings (a PNG with a “parameters” text, as this studio and AUTOMATIC1111 write).".to_string(),
            Some(text) => {
                let r = crate::restore::parse_parameters(&text);
                form.apply_restored(&r);
                let mut m = if r.restored.is_empty() { "Nothing could be restored.".to_string() } else { format!("Restored: {}.", r.restored.join(", ")) };
                if !r.not_restored.is_empty() {
                    m.push_str(&format!(" Not restored: {}.", r.not_restored.join("; ")));
                }
                // LoRAs the image names that this server's folder lacks (or cannot use)
                if !r.loras.is_empty() {
                    if let Ok(list) = crate::api::list_loras().await {
                        let missing: Vec<String> = r
                            .loras
                            .iter()
                            .filter(|l| !list.iter().any(|x| x.name == l.name && x.usable))
                            .map(|l| format!("“{}”", l.name))
                            .collect();
                        if !missing.is_empty() {
                            m.push_str(&format!(" Not on this server: LoRA {}.", missing.join(", ")));
                        }
                    }
                }
                m
            }
        };
        note.set(Some(msg));
    });
}

#[component]
pub(crate) fn GenerateTab(form: FormState) -> impl IntoView {
    let status = expect_context::<ServerStatus>();
    let FormState { prompt, negative_prompt, style, ratio, steps, seed, count, .. } = form;
    let batch = Batch::new(["generate", "generate-2", "generate-3", "generate-4"]);
    let slot = batch.slots[0];
    let restore_note: RwSignal<Option<String>> = RwSignal::new(None);

    // show the seed that was used, so unticking "Random" reproduces the image
    browser_effect(move |_| {
        if let Some(JobState { phase: JobPhase::Done(r), .. }) = slot.state.get() {
            seed.text.set(r.seed.to_string());
        }
    });

    let submit = Callback::new(move |_: ()| {
        if batch.active() {
            return;
        }
        let seeds = match seed.value().and_then(|s| batch_seeds(s, count.get_untracked())) {
            Ok(s) => s,
            Err(e) => return batch.fail(e),
        };
        let r = ratio.get_untracked();
        batch.submit(form.requests(seeds, || JobKind::Generate { width: r.width, height: r.height }));
    });

    view! {
        <div class="columns">
            <section
                class="card controls"
                aria-label="Generate settings"
                on:dragover=move |ev| ev.prevent_default()
                on:drop=move |ev| {
                    ev.prevent_default();
                    #[cfg(feature = "hydrate")]
                    if let Some(file) = super::transform::first_file(ev.data_transfer()) {
                        restore_from_png(file, form, restore_note);
                    }
                    #[cfg(not(feature = "hydrate"))]
                    let _ = ev;
                }
            >
                <PromptBox prompt on_submit=submit id="gen-prompt" />
                <EnhanceBar form id="gen" />
                <NegativePrompt text=negative_prompt id="gen-negative" />
                <LoraPicker form id="gen" />
                <div class="restore">
                    <label class="btn small">
                        "Restore settings from a PNG…"
                        <input
                            id="gen-restore"
                            type="file"
                            class="visually-hidden"
                            accept="image/png"
                            on:change=move |ev| {
                                #[cfg(feature = "hydrate")]
                                {
                                    use wasm_bindgen::JsCast;
                                    let input: web_sys::HtmlInputElement = ev.target().unwrap().unchecked_into();
                                    if let Some(file) = input.files().and_then(|f| f.get(0)) {
                                        restore_from_png(file, form, restore_note);
                                    }
                                    input.set_value("");
                                }
                                #[cfg(not(feature = "hydrate"))]
                                let _ = ev;
                            }
                        />
                    </label>
                    <span class="hint">"or drop a PNG made here or with AUTOMATIC1111 on this panel"</span>
                    <Show when=move || restore_note.get().is_some()>
                        <p class="alert info" data-testid="restore-note">{move || restore_note.get().unwrap_or_default()}</p>
                    </Show>
                </div>
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
                <VariationSlider variation=form.variation id="gen-variation" />
                <div class="grid2">
                    <SeedField seed id="gen-seed" />
                    <CountSelect count id="gen-count" />
                </div>
                <button
                    type="button"
                    class="btn primary big"
                    id="gen-submit"
                    disabled=move || batch.active() || !status.ready()
                    on:click=move |_| submit.run(())
                >
                    <span class="btn-icon"><LightningIcon /></span>
                    {move || if batch.active() { "Generating…" } else { "Generate" }}
                </button>
            </section>
            <section class="card output" aria-label="Generated images" id="gen-output">
                <BatchView batch />
            </section>
        </div>
    }
    .into_any()
}
