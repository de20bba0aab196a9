//! The Enhance button beside each tab's prompt: the model's text encoder rewrites the prompt into a
//! detailed one, streamed into the prompt box as it is written (websocket `enhance_*` events). It
//! waits in the same queue as the images and says so; it can be cancelled (the box gets back what
//! it had), and the user keeps or edits the new prompt, or reverts to the one they wrote.

use super::*;
use crate::api::submit_enhance;
use crate::types::{EnhancePhase, EnhanceRequest, EnhanceState};

#[component]
pub(crate) fn EnhanceBar(form: FormState, #[prop(into)] id: String) -> impl IntoView {
    let prompt = form.prompt;
    let written = form.written;
    let state: RwSignal<Option<EnhanceState>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let submitting = RwSignal::new(false);
    // what the box held when this enhancement began (a cancel puts it back)
    let before = StoredValue::new(String::new());
    if let Some(jobs) = use_context::<Jobs>() {
        jobs.add_enhancement(state);
    }
    let running = move || submitting.get() || state.with(|s| s.as_ref().is_some_and(|s| !s.is_terminal()));
    // the text streams into the prompt box as it is written
    browser_effect(move |_| {
        state.with(|s| {
            if let Some(s) = s {
                if matches!(s.phase, EnhancePhase::Writing | EnhancePhase::Done(_)) && !s.text.is_empty() {
                    prompt.set(s.text.clone());
                }
                if matches!(s.phase, EnhancePhase::Cancelled | EnhancePhase::Failed(_)) {
                    prompt.set(before.get_value());
                }
            }
        })
    });
    let enhance = move |_| {
        let text = prompt.get_untracked();
        if text.trim().is_empty() || running() {
            return;
        }
        error.set(None);
        submitting.set(true);
        before.set_value(text.clone());
        if written.get_untracked().is_none() {
            written.set(Some(text.clone()));
        }
        if let Some(old) = state.get_untracked() {
            client::unwatch(&old.job_id);
        }
        spawn_local(async move {
            match submit_enhance(EnhanceRequest::new(text)).await {
                Ok(ticket) => {
                    state.set(Some(EnhanceState::from_ticket(&ticket)));
                    client::watch(&ticket.job_id);
                }
                Err(e) => {
                    error.set(Some(e.reason));
                    if written.get_untracked().as_deref() == Some(before.get_value().as_str()) {
                        written.set(None);
                    }
                }
            }
            submitting.set(false);
        });
    };
    let cancel = move |_| {
        let Some(job_id) = state.with_untracked(|s| s.as_ref().filter(|s| !s.is_terminal()).map(|s| s.job_id.clone())) else {
            return;
        };
        spawn_local(async move {
            if let Err(e) = cancel_job(job_id).await {
                error.set(Some(e.reason));
            }
        });
    };
    let revert = move |_| {
        if let Some(w) = written.get_untracked() {
            prompt.set(w);
        }
        written.set(None);
        state.set(None);
    };
    let status = move || {
        if let Some(e) = error.get() {
            return e;
        }
        if submitting.get() {
            return "Asking for an enhanced prompt…".into();
        }
        state.with(|s| match s.as_ref().map(|s| (&s.phase, s.tokens)) {
            None => String::new(),
            Some((EnhancePhase::Queued { position }, _)) => {
                format!("Waiting in the queue with the images (position {position})…")
            }
            Some((EnhancePhase::Writing, n)) => format!("Writing the prompt… ({n} tokens)"),
            Some((EnhancePhase::Done(r), _)) => {
                let mut m = format!("Enhanced ({} tokens in {}). Keep it, edit it, or revert to your prompt.", r.tokens, fmt_ms(r.total_ms));
                if r.tiny_model {
                    m.push_str(" (The tiny test model writes gibberish.)");
                }
                m
            }
            Some((EnhancePhase::Failed(reason), _)) => format!("Enhancing failed: {reason}"),
            Some((EnhancePhase::Cancelled, _)) => "Enhancement cancelled; your prompt is back.".into(),
        })
    };
    let can_revert = move || !running() && written.with(|w| w.is_some());
    let (cancel_id, revert_id) = (format!("{id}-enhance-cancel"), format!("{id}-enhance-revert"));
    view! {
        <div class="row enhance" data-testid=format!("{id}-enhance-bar")>
            <button
                type="button"
                class="btn small"
                data-testid=format!("{id}-enhance")
                title="Rewrite the prompt into a detailed one with the model's own language model"
                disabled=move || running() || prompt.with(|p| p.trim().is_empty())
                on:click=enhance
            >
                "Enhance"
            </button>
            <Show when=running>
                <button type="button" class="btn small" data-testid=cancel_id.clone() on:click=cancel>
                    "Stop"
                </button>
            </Show>
            <Show when=can_revert>
                <button
                    type="button"
                    class="btn small"
                    data-testid=revert_id.clone()
                    title="Put back the prompt you wrote"
                    on:click=revert
                >
                    "Revert"
                </button>
            </Show>
            <span class="hint" role="status" aria-live="polite" data-testid=format!("{id}-enhance-status")>
                {status}
            </span>
        </div>
    }
}
