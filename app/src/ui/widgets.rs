//! Shared form controls: prompt, style, aspect ratio, steps, seed, copy button.

use super::*;

#[component]
pub(crate) fn PromptBox(prompt: RwSignal<String>, on_submit: Callback<()>, #[prop(into)] id: String) -> impl IntoView {
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
pub(crate) fn StyleSelect(style: RwSignal<Style>, #[prop(into)] id: String) -> impl IntoView {
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
pub(crate) fn RatioSelect(ratio: RwSignal<AspectRatio>, #[prop(into)] id: String) -> impl IntoView {
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
pub(crate) fn StepsSlider(steps: RwSignal<u32>, #[prop(into)] id: String) -> impl IntoView {
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

/// "Variation" 0-1: moves each seed's text conditioning so that seeds differ more (0: off).
#[component]
pub(crate) fn VariationSlider(variation: RwSignal<f32>, #[prop(into)] id: String) -> impl IntoView {
    view! {
        <label class="field">
            <span class="label">
                "Variation "
                <output>{move || match variation.get() { v if v == 0.0 => "off".to_string(), v => format!("{v:.2}") }}</output>
            </span>
            <input
                id=id
                type="range"
                min="0"
                max="1"
                step="0.05"
                prop:value=move || variation.get().to_string()
                on:input=move |ev| {
                    if let Ok(v) = event_target_value(&ev).parse::<f32>() {
                        variation.set(v.clamp(0.0, 1.0))
                    }
                }
            />
            <span class="hint">"More different pictures between seeds; 0 keeps the plain image."</span>
        </label>
    }
}

/// Seed field with a "random" toggle.
#[derive(Clone, Copy)]
pub(crate) struct SeedState {
    pub(crate) text: RwSignal<String>,
    pub(crate) random: RwSignal<bool>,
}

impl SeedState {
    pub(crate) fn new() -> Self {
        SeedState { text: RwSignal::new("42".into()), random: RwSignal::new(true) }
    }
    /// `Ok(None)` = random; an unparsable number is an error for the user.
    pub(crate) fn value(&self) -> Result<Option<u64>, String> {
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
pub(crate) fn SeedField(seed: SeedState, #[prop(into)] id: String) -> impl IntoView {
    let random_id = format!("{id}-random");
    view! {
        <div class="field seed-field">
            <label class="label" for=id.clone()>"Seed"</label>
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
pub(crate) fn CopyButton(#[prop(into)] text: Signal<String>, #[prop(into)] label: String, #[prop(into)] testid: String) -> impl IntoView {
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

/// The settings of one tab's form, shared with the panels that fill it (History's "use these
/// settings", the PNG restore).
#[derive(Clone, Copy)]
pub(crate) struct FormState {
    pub(crate) prompt: RwSignal<String>,
    pub(crate) negative_prompt: RwSignal<String>,
    pub(crate) style: RwSignal<Style>,
    pub(crate) ratio: RwSignal<AspectRatio>,
    pub(crate) steps: RwSignal<u32>,
    pub(crate) strength: RwSignal<f32>,
    pub(crate) seed: SeedState,
    /// Images per submission (1-4; image i uses seed + i).
    pub(crate) count: RwSignal<u32>,
    /// LoRAs picked from the server's folder, each at its strength.
    pub(crate) loras: RwSignal<Vec<LoraChoice>>,
    /// 0-1 (0: off).
    pub(crate) variation: RwSignal<f32>,
    /// The prompt the user wrote, while the box holds its enhanced rewrite (Revert puts it back).
    pub(crate) written: RwSignal<Option<String>>,
}

impl FormState {
    pub(crate) fn new() -> Self {
        FormState {
            prompt: RwSignal::new(String::new()),
            negative_prompt: RwSignal::new(String::new()),
            style: RwSignal::new(Style::None),
            ratio: RwSignal::new(DEFAULT_RATIO),
            steps: RwSignal::new(limits::DEFAULT_STEPS),
            strength: RwSignal::new(limits::DEFAULT_STRENGTH),
            seed: SeedState::new(),
            count: RwSignal::new(1),
            loras: RwSignal::new(Vec::new()),
            variation: RwSignal::new(0.0),
            written: RwSignal::new(None),
        }
    }

    /// The prompt the user wrote, when the box holds another (its enhanced rewrite).
    pub(crate) fn written_prompt(&self) -> Option<String> {
        let prompt = self.prompt.get_untracked();
        self.written.get_untracked().filter(|w| w.trim() != prompt.trim())
    }

    /// One request per seed from the form's settings, each of `kind`.
    pub(crate) fn requests(&self, seeds: Vec<u64>, kind: impl Fn() -> JobKind) -> Vec<JobRequest> {
        seeds
            .into_iter()
            .map(|seed| JobRequest {
                negative_prompt: self.negative_prompt.get_untracked(),
                prompt: self.prompt.get_untracked(),
                style: self.style.get_untracked(),
                steps: self.steps.get_untracked(),
                seed: Some(seed),
                kind: kind(),
                loras: self.loras.get_untracked(),
                variation: self.variation.get_untracked(),
                variation_seed: None,
                written_prompt: self.written_prompt(),
            })
            .collect()
    }

    /// Fills the form with what a PNG's parameters gave (the rest stays as it was).
    #[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
    pub(crate) fn apply_restored(&self, r: &crate::restore::Restored) {
        if !r.prompt.is_empty() {
            self.prompt.set(r.prompt.clone());
            self.written.set(None);
        }
        self.negative_prompt.set(r.negative_prompt.clone());
        self.style.set(r.style);
        if let Some(ar) = r.ratio {
            self.ratio.set(ar);
        }
        if let Some(s) = r.steps {
            self.steps.set(s);
        }
        if let Some(s) = r.strength {
            self.strength.set(s);
        }
        if let Some(s) = r.seed {
            self.seed.text.set(s.to_string());
            self.seed.random.set(false);
        }
        self.loras.set(r.loras.clone());
        self.variation.set(r.variation.unwrap_or(0.0));
    }

    /// Fills the form with a finished image's settings (its seed fixed, not random).
    pub(crate) fn apply(&self, r: &JobResult) {
        self.prompt.set(r.prompt.clone());
        self.written.set(r.written_prompt.clone());
        self.negative_prompt.set(r.negative_prompt.clone());
        self.style.set(r.style);
        if let Some(ar) = AspectRatio::find(r.width, r.height) {
            self.ratio.set(ar);
        }
        self.steps.set(r.steps);
        if let Some(s) = r.strength {
            self.strength.set(s);
        }
        self.seed.text.set(r.seed.to_string());
        self.seed.random.set(false);
        self.loras.set(r.loras.iter().map(|l| LoraChoice::new(l.name.clone(), l.scale)).collect());
        self.variation.set(r.variation);
    }
}

/// An optional negative prompt, folded away by default.
#[component]
pub(crate) fn NegativePrompt(text: RwSignal<String>, #[prop(into)] id: String) -> impl IntoView {
    view! {
        <details class="field advanced" open=move || !text.get().is_empty()>
            <summary class="label">"Negative prompt"</summary>
            <input
                id=id
                type="text"
                maxlength=limits::MAX_PROMPT_CHARS.to_string()
                placeholder="What the image should not show"
                prop:value=move || text.get()
                on:input=move |ev| text.set(event_target_value(&ev))
            />
            <span class="hint">"Kept with the image. Turbo runs without guidance, where it does not change the picture."</span>
        </details>
    }
}

/// "Images: 1-4" (image i uses seed + i).
#[component]
pub(crate) fn CountSelect(count: RwSignal<u32>, #[prop(into)] id: String) -> impl IntoView {
    view! {
        <label class="field">
            <span class="label">"Images"</span>
            <select
                id=id
                on:change=move |ev| {
                    if let Ok(n) = event_target_value(&ev).parse::<u32>() {
                        count.set(n.clamp(1, limits::MAX_BATCH))
                    }
                }
            >
                {(1..=limits::MAX_BATCH)
                    .map(|n| view! { <option value=n.to_string() selected=move || count.get() == n>{n.to_string()}</option> })
                    .collect_view()}
            </select>
        </label>
    }
}

/// Moves the focus to an element that a signal just set will render (the DOM is updated before
/// the next frame).
pub(crate) fn focus_after_render(id: &'static str) {
    request_animation_frame(move || client::focus_element(id));
}
