//! Job slots: one per panel; websocket events are folded into the slot that owns the job.

use super::*;

/// The state of one panel's current job.
#[derive(Clone, Copy)]
pub struct JobSlot {
    pub state: RwSignal<Option<JobState>>,
    /// A submission or cancel error (e.g. invalid input, queue full).
    pub error: RwSignal<Option<String>>,
    /// A submission is on its way.
    pub submitting: RwSignal<bool>,
    key: &'static str,
}

/// All slots of the page plus the websocket status.
#[derive(Clone, Copy)]
pub struct Jobs {
    slots: StoredValue<Vec<JobSlot>>,
    /// The Enhance buttons' states (their events come over the same socket).
    enhancements: StoredValue<Vec<RwSignal<Option<crate::types::EnhanceState>>>>,
    pub connected: RwSignal<bool>,
}

pub fn provide_jobs() {
    let jobs = Jobs { slots: StoredValue::new(Vec::new()), enhancements: StoredValue::new(Vec::new()), connected: RwSignal::new(true) };
    provide_context(jobs);
    browser_effect(move |_| {
        client::ws_start(
            move |ev| {
                jobs.slots.with_value(|slots| {
                    for slot in slots {
                        slot.state.update(|s| {
                            if let Some(s) = s {
                                s.apply(&ev)
                            }
                        });
                    }
                });
                jobs.enhancements.with_value(|states| {
                    for state in states {
                        if state.with_untracked(|s| s.as_ref().is_some_and(|s| s.job_id == ev.job_id())) {
                            state.update(|s| {
                                if let Some(s) = s {
                                    s.apply(&ev)
                                }
                            });
                        }
                    }
                })
            },
            move |up| jobs.connected.set(up),
        );
    });
}

impl Jobs {
    /// Folds the socket's enhancement events into `state` (an Enhance button's).
    pub(crate) fn add_enhancement(&self, state: RwSignal<Option<crate::types::EnhanceState>>) {
        self.enhancements.update_value(|v| v.push(state));
    }
}

impl JobSlot {
    /// `name` keeps the panel's last job for this browser tab (sessionStorage), so a reload
    /// picks up its progress or result again.
    pub fn new(name: &'static str) -> JobSlot {
        let slot = JobSlot {
            state: RwSignal::new(None),
            error: RwSignal::new(None),
            submitting: RwSignal::new(false),
            key: name,
        };
        if let Some(jobs) = use_context::<Jobs>() {
            jobs.slots.update_value(|v| v.push(slot));
        }
        browser_effect(move |prev| {
            if prev.is_some() {
                return;
            }
            let ticket = client::session_get(&slot.storage_key())
                .and_then(|t| serde_json::from_str::<JobTicket>(&t).ok());
            if let Some(t) = ticket {
                slot.state.set(Some(JobState::from_ticket(&t)));
                client::watch(&t.job_id);
            }
        });
        slot
    }

    pub(crate) fn storage_key(&self) -> String {
        format!("zimage.job.{}", self.key)
    }

    /// A job is queued or running (or being submitted).
    pub fn active(&self) -> bool {
        self.submitting.get()
            || self.state.with(|s| s.as_ref().is_some_and(|s| !s.is_terminal()))
    }

    pub fn submit(self, req: JobRequest) {
        if self.submitting.get_untracked() {
            return;
        }
        self.error.set(None);
        self.submitting.set(true);
        if let Some(old) = self.state.get_untracked() {
            client::unwatch(&old.job_id);
        }
        spawn_local(async move {
            match submit_job(req).await {
                Ok(ticket) => {
                    if let Ok(json) = serde_json::to_string(&ticket) {
                        client::session_set(&self.storage_key(), &json);
                    }
                    self.state.set(Some(JobState::from_ticket(&ticket)));
                    client::watch(&ticket.job_id);
                }
                Err(e) => self.error.set(Some(e.reason)),
            }
            self.submitting.set(false);
        });
    }

    pub fn cancel(self) {
        let Some(job_id) = self.state.with_untracked(|s| {
            s.as_ref().filter(|s| !s.is_terminal()).map(|s| s.job_id.clone())
        }) else {
            return;
        };
        self.state.update(|s| {
            if let Some(s) = s {
                s.cancel_requested = true
            }
        });
        spawn_local(async move {
            if let Err(e) = cancel_job(job_id).await {
                self.error.set(Some(e.reason));
            }
        });
    }
}

/// A panel's submissions of 1-4 images at once: one job slot per image, and how many the last
/// submission used (kept for this browser tab, like the slots' jobs).
#[derive(Clone, Copy)]
pub(crate) struct Batch {
    pub(crate) slots: [JobSlot; limits::MAX_BATCH as usize],
    pub(crate) used: RwSignal<usize>,
    key: &'static str,
}

impl Batch {
    /// `keys`: one storage name per slot, the first also names the batch.
    pub(crate) fn new(keys: [&'static str; limits::MAX_BATCH as usize]) -> Batch {
        let b = Batch { slots: keys.map(JobSlot::new), used: RwSignal::new(1), key: keys[0] };
        browser_effect(move |prev| {
            if prev.is_none() {
                if let Some(n) = client::session_get(&b.storage_key()).and_then(|v| v.parse::<usize>().ok()) {
                    b.used.set(n.clamp(1, limits::MAX_BATCH as usize));
                }
            }
        });
        b
    }

    fn storage_key(&self) -> String {
        format!("zimage.batch.{}", self.key)
    }

    /// The slots of the last submission.
    pub(crate) fn current(&self) -> Vec<JobSlot> {
        self.slots[..self.used.get().clamp(1, self.slots.len())].to_vec()
    }

    pub(crate) fn active(&self) -> bool {
        self.current().iter().any(|s| s.active())
    }

    /// Submits one job per request (at most four), in order.
    pub(crate) fn submit(&self, reqs: Vec<JobRequest>) {
        if reqs.is_empty() || self.active() {
            return;
        }
        let n = reqs.len().min(self.slots.len());
        self.used.set(n);
        client::session_set(&self.storage_key(), &n.to_string());
        for (slot, req) in self.slots.iter().zip(reqs) {
            slot.submit(req);
        }
    }

    /// Shows a problem found before submitting (on the first slot).
    pub(crate) fn fail(&self, reason: String) {
        self.used.set(1);
        self.slots[0].error.set(Some(reason));
    }
}

/// The seeds of `n` images: the chosen seed and the next ones, or a random first seed. Errors are
/// for the user.
pub(crate) fn batch_seeds(seed: Option<u64>, n: u32) -> Result<Vec<u64>, String> {
    let n = n.clamp(1, limits::MAX_BATCH) as u64;
    let first = match seed {
        Some(s) if s + (n - 1) > limits::MAX_SEED => {
            let batch = if n > 1 { format!(" with {n} images (image i uses seed + i)") } else { String::new() };
            return Err(format!("The seed must be between 0 and {}{batch} (got {s}).", limits::MAX_SEED - (n - 1)));
        }
        Some(s) => s,
        None => (js_random() * (limits::MAX_SEED - n + 2) as f64) as u64,
    };
    Ok((0..n).map(|i| first + i).collect())
}

/// A uniform number in [0, 1) (the browser's generator; the server never calls this).
fn js_random() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Math::random()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0.5
    }
}
