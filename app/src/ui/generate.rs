//! The Generate tab.

use super::*;

#[component]
pub(crate) fn GenerateTab(form: FormState) -> impl IntoView {
    let FormState { prompt, negative_prompt, style, ratio, steps, seed, count, .. } = form;
    let batch = Batch::new(["generate", "generate-2", "generate-3", "generate-4"]);
    let slot = batch.slots[0];

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
        batch.submit(
            seeds
                .into_iter()
                .map(|seed| JobRequest {
                    negative_prompt: negative_prompt.get_untracked(),
                    prompt: prompt.get_untracked(),
                    style: style.get_untracked(),
                    steps: steps.get_untracked(),
                    seed: Some(seed),
                    kind: JobKind::Generate { width: r.width, height: r.height },
                })
                .collect(),
        );
    });

    view! {
        <div class="columns">
            <section class="card controls" aria-label="Generate settings">
                <PromptBox prompt on_submit=submit id="gen-prompt" />
                <NegativePrompt text=negative_prompt id="gen-negative" />
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
                <div class="grid2">
                    <SeedField seed id="gen-seed" />
                    <CountSelect count id="gen-count" />
                </div>
                <button
                    type="button"
                    class="btn primary big"
                    id="gen-submit"
                    disabled=move || batch.active()
                    on:click=move |_| submit.run(())
                >
                    <span class="btn-icon"><LightningIcon /></span>
                    {move || if batch.active() { "Generating…" } else { "Generate" }}
                </button>
            </section>
            <section class="card output" aria-label="Result" id="gen-output">
                <BatchView batch />
            </section>
        </div>
    }
    .into_any()
}
