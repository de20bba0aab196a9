//! Running studio jobs from plain HTTP handlers (the scripts' APIs: `/api/generate`, OpenAI's,
//! A1111's): submit through the studio's checks and queue, wait for each job's final event, and
//! cancel whatever is still queued or running when the request goes away (the client left).

use app::backend::ClientId;
use app::types::{JobEvent, JobRequest, JobResult, JobSource, JobTicket};
use app::{ErrorKind, StudioError};
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

use super::studio::Studio;

/// Cancels the jobs still listed when dropped (the handler's future was dropped: the client went
/// away, or another job of the request failed).
pub(super) struct CancelOnDrop {
    pub(super) studio: Arc<Studio>,
    pub(super) pending: Vec<String>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for id in self.pending.drain(..) {
            let _ = app::backend::Backend::cancel(&*self.studio, &id);
        }
    }
}

/// Submits every request (all or none: a refused one cancels those already queued), then waits for
/// all of them. `on_submitted` sees the tickets once everything is queued (e.g. to report the
/// seeds). The results come in the requests' order; the first failure is the error.
pub async fn run_jobs(
    studio: &Arc<Studio>,
    source: JobSource,
    client: &ClientId,
    reqs: Vec<JobRequest>,
    on_submitted: impl FnOnce(&[JobTicket]),
) -> Result<Vec<JobResult>, StudioError> {
    // Subscribe before submitting, so no event of the jobs can be missed.
    let mut events = studio.queue.subscribe();
    let mut guard = CancelOnDrop { studio: studio.clone(), pending: Vec::new() };
    let mut tickets = Vec::with_capacity(reqs.len());
    for req in reqs {
        let ticket = studio.submit_from(req, source, client)?; // an error drops the guard: earlier jobs are cancelled
        guard.pending.push(ticket.job_id.clone());
        tickets.push(ticket);
    }
    on_submitted(&tickets);
    let mut results: Vec<Option<JobResult>> = vec![None; tickets.len()];
    while !guard.pending.is_empty() {
        let finished: Vec<JobEvent> = match events.recv().await {
            Ok(ev) if ev.is_terminal() && guard.pending.iter().any(|id| id == ev.job_id()) => vec![ev],
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => guard
                .pending
                .iter()
                .filter_map(|id| studio.queue.snapshot(id).filter(JobEvent::is_terminal))
                .collect(),
            Err(RecvError::Closed) => return Err(StudioError::internal("The studio is shutting down.")),
        };
        for ev in finished {
            guard.pending.retain(|id| id != ev.job_id());
            let i = tickets.iter().position(|t| t.job_id == ev.job_id()).expect("a job of this request");
            match ev {
                JobEvent::Done { result, .. } => results[i] = Some(result),
                // a job failed by the server's stop is a 503 to try again, not a server fault
                JobEvent::Error { reason, .. } if studio.queue.is_draining() => {
                    return Err(StudioError::new(ErrorKind::Unavailable, reason).retry_after(30))
                }
                JobEvent::Error { reason, .. } => return Err(StudioError::internal(reason)),
                _ => return Err(StudioError::new(ErrorKind::Cancelled, "The job was cancelled before it finished.")),
            }
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every job finished")).collect())
}
