//! The LoRA picker of both tabs: LoRAs from the server's folder, each with a strength slider and
//! its trigger words (a click adds one to the prompt), and an upload of a new `.safetensors` file.

use super::*;
use crate::api::list_loras;
use crate::types::LoraInfo;

/// Adds `word` to the end of the prompt unless the prompt has it already.
fn add_to_prompt(prompt: RwSignal<String>, word: &str) {
    prompt.update(|p| {
        if p.to_lowercase().contains(&word.to_lowercase()) {
            return;
        }
        let trimmed = p.trim_end();
        *p = if trimmed.is_empty() { word.to_string() } else { format!("{trimmed}, {word}") };
    });
}

#[component]
pub(crate) fn LoraPicker(form: FormState, #[prop(into)] id: String) -> impl IntoView {
    let chosen = form.loras;
    let prompt = form.prompt;
    let available: RwSignal<Vec<LoraInfo>> = RwSignal::new(Vec::new());
    let note: RwSignal<Option<String>> = RwSignal::new(None);
    let busy = RwSignal::new(false);
    let needs_key = RwSignal::new(false);
    let key = RwSignal::new(String::new());
    let refresh = move || {
        spawn_local(async move {
            match list_loras().await {
                Ok(list) => available.set(list),
                Err(e) => note.set(Some(e.reason)),
            }
        })
    };
    browser_effect(move |_| refresh());
    let info_of = move |name: &str| available.with(|a| a.iter().find(|l| l.name == name).cloned());
    let select_id = format!("{id}-lora-add");
    let upload_id = format!("{id}-lora-upload");
    let key_id = format!("{id}-lora-key");
    let list_testid = format!("{id}-loras");
    let note_testid = format!("{id}-lora-note");

    view! {
        <details class="field advanced loras" open=move || !chosen.get().is_empty()>
            <summary class="label">
                {move || match chosen.get().len() {
                    0 => "LoRAs".to_string(),
                    n => format!("LoRAs ({n})"),
                }}
            </summary>
            <ul class="lora-list" data-testid=list_testid>
                {move || {
                    let id = id.clone();
                    chosen
                        .get()
                        .into_iter()
                        .enumerate()
                        .map(|(i, choice)| {
                            let info = info_of(&choice.name);
                            let slider_id = format!("{id}-lora-{i}");
                            let name = choice.name.clone();
                            let missing = info.as_ref().map(|l| !l.usable).unwrap_or(true);
                            let words = info.as_ref().map(|l| l.trigger_words.clone()).unwrap_or_default();
                            let summary = info
                                .as_ref()
                                .map(|l| l.summary.clone())
                                .unwrap_or_else(|| "not in this server's LoRA folder: the image cannot use it".to_string());
                            view! {
                                <li class="lora" class:missing=missing>
                                    <div class="lora-head">
                                        <label for=slider_id.clone() class="lora-name">{name.clone()}</label>
                                        <output for=slider_id.clone()>{format!("{:.2}", choice.scale)}</output>
                                        <button
                                            type="button"
                                            class="btn small"
                                            aria-label=format!("Remove LoRA {name}")
                                            on:click=move |_| chosen.update(|c| { c.remove(i); })
                                        >
                                            "Remove"
                                        </button>
                                    </div>
                                    <input
                                        id=slider_id
                                        type="range"
                                        min=limits::MIN_LORA_SCALE.to_string()
                                        max=limits::MAX_LORA_SCALE.to_string()
                                        step="0.05"
                                        prop:value=choice.scale.to_string()
                                        on:input=move |ev| {
                                            if let Ok(v) = event_target_value(&ev).parse::<f32>() {
                                                chosen.update(|c| if let Some(x) = c.get_mut(i) { x.scale = v });
                                            }
                                        }
                                    />
                                    <span class="hint">{summary}</span>
                                    <Show when={
                                        let empty = words.is_empty();
                                        move || !empty
                                    }>
                                        <div class="chips">
                                            <span class="hint">"Trigger words:"</span>
                                            {words
                                                .iter()
                                                .map(|w| {
                                                    let w = w.clone();
                                                    let label = w.clone();
                                                    view! {
                                                        <button
                                                            type="button"
                                                            class="chip"
                                                            title="Add to the prompt"
                                                            on:click=move |_| add_to_prompt(prompt, &w)
                                                        >
                                                            {label}
                                                        </button>
                                                    }
                                                })
                                                .collect_view()}
                                        </div>
                                    </Show>
                                </li>
                            }
                        })
                        .collect_view()
                }}
            </ul>
            <div class="lora-add">
                <label for=select_id.clone() class="visually-hidden">"Add a LoRA"</label>
                <select
                    id=select_id
                    on:focus=move |_| refresh()
                    on:change=move |ev| {
                        let name = event_target_value(&ev);
                        if !name.is_empty() && chosen.with_untracked(|c| c.len() < limits::MAX_LORAS && !c.iter().any(|l| l.name == name)) {
                            chosen.update(|c| c.push(LoraChoice::new(name, 1.0)));
                        }
                    }
                    prop:value=""
                >
                    <option value="">
                        {move || if available.with(|a| a.iter().any(|l| l.usable)) { "Add a LoRA…" } else { "No LoRAs in the server's folder yet" }}
                    </option>
                    {move || {
                        available
                            .get()
                            .into_iter()
                            .filter(|l| l.usable && !chosen.with(|c| c.iter().any(|x| x.name == l.name)))
                            .map(|l| view! { <option value=l.name.clone()>{l.name.clone()}</option> })
                            .collect_view()
                    }}
                </select>
                <label class="btn small">
                    {move || if busy.get() { "Uploading…" } else { "Upload a LoRA…" }}
                    <input
                        id=upload_id
                        type="file"
                        class="visually-hidden"
                        accept=".safetensors"
                        disabled=move || busy.get()
                        on:change=move |ev| {
                            #[cfg(feature = "hydrate")]
                            {
                                use wasm_bindgen::JsCast;
                                let input: web_sys::HtmlInputElement = ev.target().unwrap().unchecked_into();
                                if let Some(file) = input.files().and_then(|f| f.get(0)) {
                                    if !file.name().to_lowercase().ends_with(".safetensors") {
                                        note.set(Some("Pick a .safetensors file.".into()));
                                    } else {
                                        busy.set(true);
                                        note.set(None);
                                        let given_key = key.get_untracked();
                                        spawn_local(async move {
                                            match crate::client::upload_lora(file, given_key).await {
                                                Ok(info) => {
                                                    note.set(Some(format!("Added LoRA “{}” ({}).", info.name, info.summary)));
                                                    chosen.update(|c| if c.len() < limits::MAX_LORAS { c.push(LoraChoice::new(info.name.clone(), 1.0)) });
                                                    refresh();
                                                }
                                                Err(e) => {
                                                    if e.kind == crate::error::ErrorKind::Unauthorized {
                                                        needs_key.set(true);
                                                    }
                                                    note.set(Some(e.reason));
                                                }
                                            }
                                            busy.set(false);
                                        });
                                    }
                                }
                                input.set_value("");
                            }
                            #[cfg(not(feature = "hydrate"))]
                            let _ = ev;
                        }
                    />
                </label>
            </div>
            <Show when=move || needs_key.get()>
                <label class="field">
                    <span class="label">"API key (for adding LoRAs)"</span>
                    <input
                        id=key_id.clone()
                        type="password"
                        autocomplete="off"
                        prop:value=move || key.get()
                        on:input=move |ev| key.set(event_target_value(&ev))
                    />
                </label>
            </Show>
            <Show when=move || note.get().is_some()>
                <p class="alert info" role="status" data-testid=note_testid.clone()>{move || note.get().unwrap_or_default()}</p>
            </Show>
        </details>
    }
}
