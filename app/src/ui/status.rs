//! What the server is doing while it starts (downloading the model, loading it, compiling
//! kernels): `/readyz` polled every second until it is ready, shown above the tabs, and the
//! Generate / Transform buttons held until then. The page needs no reload: the model line is
//! asked again when the server turns ready.

use super::*;
use crate::types::{Readiness, ServerState};

/// The server's last known readiness (None: not asked yet, treated as ready).
#[derive(Clone, Copy)]
pub struct ServerStatus {
    pub readiness: RwSignal<Option<Readiness>>,
}

impl ServerStatus {
    /// Jobs may be submitted (unknown counts as yes: a refused submission says why).
    pub fn ready(&self) -> bool {
        self.readiness.with(|r| r.as_ref().is_none_or(|r| r.ready))
    }
}

pub fn provide_server_status() {
    let status = ServerStatus { readiness: RwSignal::new(None) };
    provide_context(status);
    let jobs = expect_context::<Jobs>();
    // ask at start, and again after each reconnect of the websocket (the server may have restarted)
    browser_effect(move |_| {
        if jobs.connected.get() {
            poll_until_ready(status);
        }
    });
}

/// Polls `/readyz` every second until the server says ready.
fn poll_until_ready(status: ServerStatus) {
    spawn_local(async move {
        let now = client::fetch_readiness().await;
        let ready = now.as_ref().is_some_and(|r| r.ready);
        let answered = now.is_some();
        if answered {
            status.readiness.set(now);
        }
        if !ready {
            set_timeout(move || poll_until_ready(status), Duration::from_millis(if answered { 1000 } else { 3000 }));
        }
    });
}

/// The start-up banner: the server's sentence, and a progress bar while it downloads.
#[component]
pub(crate) fn StartupBanner() -> impl IntoView {
    let status = expect_context::<ServerStatus>();
    let not_ready = move || status.readiness.get().filter(|r| !r.ready);
    view! {
        <Show when=move || not_ready().is_some()>
            {move || {
                not_ready()
                    .map(|r| {
                        let failed = r.state == ServerState::Failed;
                        let download = r.download.clone().filter(|d| d.bytes_total > 0);
                        view! {
                            <div
                                class="banner startup"
                                class:error=failed
                                role="status"
                                aria-live="polite"
                                data-testid="startup-status"
                                data-state=format!("{:?}", r.state)
                            >
                                <p data-testid="startup-message">{r.message.clone()}</p>
                                {download
                                    .map(|d| {
                                        view! {
                                            <progress
                                                data-testid="download-progress"
                                                max=d.bytes_total.to_string()
                                                value=d.bytes_done.to_string()
                                                aria-label="Model download"
                                            ></progress>
                                            <p class="hint" data-testid="download-file">
                                                {format!("File {} of {}: {}", d.files_done + 1, d.files_total, d.file)}
                                            </p>
                                        }
                                    })}
                                {(!failed)
                                    .then(|| {
                                        view! {
                                            <p class="hint">
                                                "Stored images, share links and the history work meanwhile; Generate and Transform open when the model is ready."
                                            </p>
                                        }
                                    })}
                            </div>
                        }
                    })
            }}
        </Show>
    }
}
