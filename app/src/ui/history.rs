//! The History tab: every finished image, newest first, as thumbnails; search over the prompts;
//! pages; an opened image with its settings and share link, "use these settings", delete.

use super::*;
use crate::api::{delete_image, list_history};
use crate::types::{HistoryItem, HistoryPage};

#[component]
pub(crate) fn HistoryTab(active: Signal<bool>, tab: RwSignal<Tab>, gen_form: FormState, tr_form: FormState) -> impl IntoView {
    let search = RwSignal::new(String::new());
    let query = RwSignal::new(String::new());
    let page = RwSignal::new(0u32);
    let refresh = RwSignal::new(0u32);
    let data: RwSignal<Option<Result<HistoryPage, String>>> = RwSignal::new(None);
    let selected: RwSignal<Option<HistoryItem>> = RwSignal::new(None);

    // (re)load whenever the tab is shown, the search or page changes, or after a delete
    browser_effect(move |_| {
        if !active.get() {
            return;
        }
        let (q, p) = (query.get(), page.get());
        refresh.track();
        spawn_local(async move {
            data.set(Some(list_history(q, p).await.map_err(|e| e.reason)));
        });
    });

    let run_search = move || {
        page.set(0);
        selected.set(None);
        query.set(search.get_untracked().trim().to_string());
    };

    view! {
        <section class="card history" aria-label="History" data-testid="history">
            <form
                class="history-search"
                on:submit=move |ev: leptos::ev::SubmitEvent| {
                    ev.prevent_default();
                    run_search();
                }
            >
                <input
                    id="history-search"
                    type="search"
                    aria-label="Search prompts"
                    placeholder="Search prompts…"
                    maxlength="200"
                    prop:value=move || search.get()
                    on:input=move |ev| search.set(event_target_value(&ev))
                />
                <button type="submit" class="btn" id="history-search-go">"Search"</button>
            </form>
            {move || match data.get() {
                None => view! { <p class="dim">"Loading…"</p> }.into_any(),
                Some(Err(reason)) => view! { <div class="alert error" role="alert">{reason}</div> }.into_any(),
                Some(Ok(p)) if p.items.is_empty() => view! {
                    <p class="placeholder" data-testid="history-empty">
                        {if query.get_untracked().is_empty() {
                            "No images yet: what you make appears here.".to_string()
                        } else {
                            format!("No image's prompt matches “{}”.", query.get_untracked())
                        }}
                    </p>
                }
                .into_any(),
                Some(Ok(p)) => {
                    let pages = (p.total as u32).div_ceil(p.page_size.max(1)).max(1);
                    let current = p.page;
                    view! {
                        <p class="dim" data-testid="history-count">
                            {format!("{} image{}", p.total, if p.total == 1 { "" } else { "s" })}
                        </p>
                        <div class="thumbs">
                            {p.items
                                .into_iter()
                                .map(|item| {
                                    let it = item.clone();
                                    view! {
                                        <button
                                            type="button"
                                            class="thumb"
                                            id=thumb_id(&item.result.image_id)
                                            data-testid="history-item"
                                            title=item.result.prompt.clone()
                                            on:click=move |_| selected.set(Some(it.clone()))
                                        >
                                            <img src=item.thumb_url.clone() alt=item.result.prompt.clone() loading="lazy" />
                                        </button>
                                    }
                                })
                                .collect_view()}
                        </div>
                        <div class="pager">
                            <button type="button" class="btn small" id="history-prev" disabled=current == 0 on:click=move |_| page.update(|p| *p = p.saturating_sub(1))>
                                "‹ Newer"
                            </button>
                            <span data-testid="history-page">{format!("Page {} of {pages}", current + 1)}</span>
                            <button type="button" class="btn small" id="history-next" disabled={current + 1 >= pages} on:click=move |_| page.update(|p| *p += 1)>
                                "Older ›"
                            </button>
                        </div>
                    }
                    .into_any()
                }
            }}
        </section>
        {move || selected.get().map(|item| view! { <HistoryDetail item selected refresh tab gen_form tr_form /> })}
    }
}

#[component]
fn HistoryDetail(
    item: HistoryItem,
    selected: RwSignal<Option<HistoryItem>>,
    refresh: RwSignal<u32>,
    tab: RwSignal<Tab>,
    gen_form: FormState,
    tr_form: FormState,
) -> impl IntoView {
    let r = item.result.clone();
    let confirming = RwSignal::new(false);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let share_abs = format!("{}{}", client::origin(), r.share_url);
    let created = r.created_unix;
    let reuse = {
        let r = r.clone();
        move |_| {
            if r.strength.is_some() {
                tr_form.apply(&r);
                tab.set(Tab::Transform);
            } else {
                gen_form.apply(&r);
                tab.set(Tab::Generate);
            }
            selected.set(None);
        }
    };
    // closing gives the keyboard focus back to the thumbnail that opened the image
    let opener = thumb_id(&r.image_id);
    let close = move || {
        selected.set(None);
        client::focus_element(&opener);
    };
    // Escape: first leaves the delete confirmation, then closes the image (while History is shown)
    #[cfg(feature = "hydrate")]
    {
        let close = close.clone();
        let handle = window_event_listener(leptos::ev::keydown, move |ev| {
            if ev.key() != "Escape" || ev.default_prevented() || tab.get_untracked() != Tab::History {
                return;
            }
            ev.prevent_default();
            if confirming.get_untracked() {
                confirming.set(false);
                focus_after_render("history-delete");
            } else {
                close();
            }
        });
        on_cleanup(move || handle.remove());
    }
    // an opened image takes the focus (and scrolls into view on phones, where it sits below the grid)
    let heading = NodeRef::<leptos::html::H2>::new();
    browser_effect(move |_| {
        if let Some(h) = heading.get() {
            let _ = h.focus();
        }
    });
    let id = r.image_id.clone();
    let delete = move |_| {
        let id = id.clone();
        spawn_local(async move {
            match delete_image(id).await {
                Ok(()) => {
                    selected.set(None);
                    refresh.update(|n| *n += 1);
                    client::focus_element("history-search");
                }
                Err(e) => error.set(Some(e.reason)),
            }
        });
    };
    let row = |k: &'static str, v: String| view! { <tr><th>{k}</th><td>{v}</td></tr> };
    view! {
        <section class="card history-detail" aria-label="Image details" data-testid="history-detail">
            <div class="detail-head">
                <h2 tabindex="-1" node_ref=heading>"Image"</h2>
                <button
                    type="button"
                    class="btn small"
                    data-testid="history-close"
                    aria-keyshortcuts="Escape"
                    on:click={
                        let close = close.clone();
                        move |_| close()
                    }
                >
                    "Close"
                </button>
            </div>
            <a href=r.image_url.clone() target="_blank" rel="noopener">
                <img class="result-image" data-testid="history-image" src=r.image_url.clone() alt=r.prompt.clone() width=r.width.to_string() height=r.height.to_string() />
            </a>
            <table class="settings" data-testid="history-settings">
                {row("Prompt", r.prompt.clone())}
                {r.written_prompt.clone().map(|w| row("Written prompt (before Enhance)", w))}
                {(!r.negative_prompt.is_empty()).then(|| row("Negative prompt", r.negative_prompt.clone()))}
                {(!r.loras.is_empty()).then(|| row("LoRAs", r.loras_text()))}
                {row("Style", r.style.label().to_string())}
                {row("Size", format!("{}×{}", r.width, r.height))}
                {row("Steps", r.steps.to_string())}
                {row("Seed", r.seed.to_string())}
                {r.strength.map(|s| row("Strength", format!("{s:.2}")))}
                {row("Made with", format!("{} · {}", r.source.label(), r.model))}
                {row("Time", fmt_ms(r.timings.total_ms))}
                {row("Created", client::local_time(created))}
            </table>
            <div class="meta-row share">
                <input class="share-url" readonly prop:value=share_abs.clone() aria-label="Share link" />
                <CopyButton text=share_abs.clone() label="Copy link" testid="history-copy-share" />
                <a class="btn small" href=r.share_url.clone() target="_blank" rel="noopener">"Share page"</a>
            </div>
            <div class="meta-row">
                <button type="button" class="btn primary" data-testid="history-reuse" on:click=reuse>
                    "Use these settings"
                </button>
                <Show
                    when=move || confirming.get()
                    fallback=move || view! {
                        <button
                            type="button"
                            class="btn danger"
                            id="history-delete"
                            data-testid="history-delete"
                            on:click=move |_| {
                                confirming.set(true);
                                focus_after_render("history-delete-no");
                            }
                        >
                            "Delete…"
                        </button>
                    }
                >
                    <span class="confirm" role="group" aria-labelledby="history-confirm-text" data-testid="history-confirm">
                        <span id="history-confirm-text">"Delete this image, its file and its share link?"</span>
                        <button type="button" class="btn danger" data-testid="history-delete-yes" on:click=delete.clone()>"Delete"</button>
                        <button
                            type="button"
                            class="btn"
                            id="history-delete-no"
                            data-testid="history-delete-no"
                            aria-keyshortcuts="Escape"
                            on:click=move |_| {
                                confirming.set(false);
                                focus_after_render("history-delete");
                            }
                        >
                            "Keep"
                        </button>
                    </span>
                </Show>
            </div>
            <Show when=move || error.get().is_some()>
                <div class="alert error" role="alert">{move || error.get().unwrap_or_default()}</div>
            </Show>
        </section>
    }
}

/// The id of an image's thumbnail button.
fn thumb_id(image_id: &str) -> String {
    format!("thumb-{image_id}")
}
