//! Several processes on one Redis: `zimage serve --queue redis://…` (front ends) and `zimage
//! worker --queue redis://…` (one device each), any number of each.
//!
//! * Jobs go on the stream `zimage:jobs`, read by the consumer group `workers`: each job reaches
//!   one worker, which acknowledges it only once the job is over. A worker that dies leaves its
//!   entry pending; after the claim idle time another worker takes it (XAUTOCLAIM) and runs it
//!   again, the clients seeing a `restarted` event. A live worker renews its claim while it runs.
//!   A job started more than three times (`zimage:runs:{id}`: it may be what kills its workers)
//!   is failed instead.
//! * Progress goes back on the pub/sub channel `zimage:events` (every front end hears every job's
//!   events and forwards the ones its websockets watch); each job's latest state is also kept in
//!   `zimage:job:{id}`, so a front end started later answers a reconnecting client at once.
//! * Finished PNGs go on the stream `zimage:results`, read by the group `frontends`: one front end
//!   writes each image into its data folder and history (a shared folder when there are several
//!   front ends: README, "Deploying on several machines"), then announces the job done.
//! * A job ends once: whoever publishes its final event first sets `zimage:final:{id}` (SET NX);
//!   a worker delivers a result only if it sets `zimage:result:{id}` first, so a job run twice
//!   keeps one image.
//! * Places in line: every submission takes a ticket (`zimage:tickets`), every job a worker takes
//!   counts in `zimage:taken`; a waiting job's place is its ticket minus the jobs taken, the same
//!   on every front end. The line is first come, first served (the in-process queue's turns
//!   between clients and its cap per client are not kept across front ends).
//! * Cancel: `zimage:cancel:{id}` is set and its id published on `zimage:cancel`; a waiting job is
//!   failed at once (the worker that reaches it skips it), a running one stops at its next step.

use app::backend::ClientId;
use app::types::{JobEvent, JobKind, JobRequest, JobResult, JobSource};
use app::{ErrorKind, StudioError};
use futures::StreamExt;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::history::History;
use super::metrics::Metrics;
use super::queue::{save_result, spawn_worker_with, Generator, Job, JobQueue, QueueLimits, ResultSink};
use super::store::{new_id, ImageStore};

/// How long a job's state, final mark, cancel mark and result mark are kept.
const KEEP_SECS: u64 = 3600;
/// Longest wait of one blocking stream read (the loops then look for stale entries).
const BLOCK_MS: usize = 1000;

const JOBS: &str = "zimage:jobs";
const RESULTS: &str = "zimage:results";
const WORKERS: &str = "workers";
const FRONTENDS: &str = "frontends";
const TICKETS: &str = "zimage:tickets";
const TAKEN: &str = "zimage:taken";
const EVENTS: &str = "zimage:events";
const CANCEL: &str = "zimage:cancel";
/// A job that lost its worker this many times (it may be what kills them) is failed, not run again.
const MAX_RUNS: u64 = 3;

fn state_key(id: &str) -> String {
    format!("zimage:job:{id}")
}
fn final_key(id: &str) -> String {
    format!("zimage:final:{id}")
}
fn result_key(id: &str) -> String {
    format!("zimage:result:{id}")
}
fn cancel_key(id: &str) -> String {
    format!("zimage:cancel:{id}")
}
fn runs_key(id: &str) -> String {
    format!("zimage:runs:{id}")
}

/// What goes over `zimage:events`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "wire", rename_all = "snake_case")]
enum Wire {
    /// One of a job's events, as its clients get it.
    Event { event: Box<JobEvent> },
    /// A job entered the line with this ticket.
    Queued { job_id: String, ticket: u64 },
    /// A worker took a job: this many have been taken so far (the places in line move up).
    Taken { taken: u64 },
}

/// `zimage:job:{id}`: the job's latest event, and its ticket while it waits.
#[derive(Serialize, Deserialize)]
struct StoredState {
    event: JobEvent,
    ticket: Option<u64>,
}

/// A job as it travels on `zimage:jobs` (an upload's bytes travel beside it).
#[derive(Serialize, Deserialize)]
struct QueuedJob {
    id: String,
    request: JobRequest,
    seed: u64,
    width: u32,
    height: u32,
    source: JobSource,
    client: String,
    submitted_unix_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Refuses a `--queue` that is not a Redis URL before anything connects.
pub fn open_client(url: &str) -> anyhow::Result<redis::Client> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://")) {
        anyhow::bail!("--queue must be a Redis URL such as redis://127.0.0.1:6379/0 (got `{url}`)");
    }
    redis::Client::open(url).map_err(|e| anyhow::anyhow!("--queue {url}: {e}"))
}

/// Creates the two streams' consumer groups (a second creation is refused with BUSYGROUP: fine).
async fn ensure_groups(conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    for (stream, group) in [(JOBS, WORKERS), (RESULTS, FRONTENDS)] {
        let r: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
        if let Err(e) = r {
            if e.code() != Some("BUSYGROUP") {
                return Err(e);
            }
        }
    }
    Ok(())
}

// The scripts are made once: `Script::new` hashes its code (EVALSHA), and events go per step.

/// Publishes a job's non-final event (state key + channel), unless the job already ended (a
/// late step of a worker that lost its job must not hide the result).
static PUBLISH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 1"));

/// Publishes a job's final event if it is the first (exactly one final event per job).
static FINISH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 1"));

/// Takes a ticket and appends the job, unless `capacity` jobs already wait. Returns {ticket,
/// place in line}, or {-1, waiting} when full. The job's `queued` state and its announcements
/// (`Wire::Queued`, then the event) are written before the job enters the stream, in the same
/// atomic script: a worker that takes it at once cannot publish `started` before them (a later
/// `queued` would hide `started` from the job's watchers). ARGV[4..6] are templates whose ticket
/// and place this script fills in.
static SUBMIT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(r"
local waiting = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(redis.call('GET', KEYS[2]) or '0')
if waiting >= tonumber(ARGV[1]) then return {-1, waiting} end
local ticket = redis.call('INCR', KEYS[1])
local state = cjson.decode(ARGV[4])
state.ticket = ticket
state.event.position = waiting + 1
local line = cjson.decode(ARGV[5])
line.ticket = ticket
local wire = cjson.decode(ARGV[6])
wire.event.position = waiting + 1
redis.call('SET', KEYS[4], cjson.encode(state), 'EX', ARGV[7])
redis.call('PUBLISH', KEYS[5], cjson.encode(line))
redis.call('PUBLISH', KEYS[5], cjson.encode(wire))
redis.call('XADD', KEYS[3], '*', 'job', ARGV[2], 'ticket', ticket, 'upload', ARGV[3])
return {ticket, waiting + 1}"));

/// Records and announces one event of a job; a final event only if it is the job's first.
/// Returns whether it was published.
async fn publish_event(conn: &mut ConnectionManager, event: &JobEvent, ticket: Option<u64>) -> redis::RedisResult<bool> {
    let id = event.job_id();
    let state = serde_json::to_string(&StoredState { event: event.clone(), ticket }).expect("states serialize");
    let wire = serde_json::to_string(&Wire::Event { event: Box::new(event.clone()) }).expect("events serialize");
    let script: &redis::Script = if event.is_terminal() { &FINISH_SCRIPT } else { &PUBLISH_SCRIPT };
    let done: i64 = script
        .key(final_key(id))
        .key(state_key(id))
        .key(EVENTS)
        .arg(state)
        .arg(wire)
        .arg(KEEP_SECS)
        .invoke_async(conn)
        .await?;
    Ok(done == 1)
}

async fn read_state(conn: &mut ConnectionManager, id: &str) -> redis::RedisResult<Option<StoredState>> {
    let raw: Option<String> = conn.get(state_key(id)).await?;
    Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
}

fn field_bytes(entry: &StreamId, name: &str) -> Option<Vec<u8>> {
    match entry.map.get(name)? {
        redis::Value::BulkString(b) => Some(b.clone()),
        _ => None,
    }
}

fn field_string(entry: &StreamId, name: &str) -> Option<String> {
    field_bytes(entry, name).and_then(|b| String::from_utf8(b).ok())
}

/// The first entry pending longer than `idle` in `group` (its owner died), now ours.
async fn claim_stale(conn: &mut MultiplexedConnection, stream: &str, group: &str, consumer: &str, idle: Duration) -> redis::RedisResult<Option<StreamId>> {
    let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(idle.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(reply.claimed.into_iter().next())
}

/// The next new entry for `group`, waiting up to [`BLOCK_MS`].
async fn read_new(conn: &mut MultiplexedConnection, stream: &str, group: &str, consumer: &str) -> redis::RedisResult<Option<StreamId>> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(BLOCK_MS)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(reply.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()))
}

async fn ack(conn: &mut ConnectionManager, stream: &str, group: &str, entry_id: &str) -> redis::RedisResult<()> {
    let _: i64 = conn.xack(stream, group, &[entry_id]).await?;
    let _: i64 = conn.xdel(stream, &[entry_id]).await?;
    Ok(())
}

/// A name for this process in the consumer groups (unique: a restarted process starts afresh and
/// its predecessor's pending entries are claimed by idle time).
fn consumer_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "host".into());
    format!("{role}-{host}-{}-{}", std::process::id(), &new_id()[..8])
}

fn redis_unavailable(e: redis::RedisError) -> StudioError {
    eprintln!("[redis] {e}");
    StudioError::new(ErrorKind::Unavailable, "The job queue (Redis) is not reachable; please try again in a minute.").retry_after(30)
}

/// Runs an async Redis call from the studio's synchronous backend methods (server functions run
/// on the multi-threaded runtime's workers).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// The places in line of the jobs waiting anywhere, as this front end last heard.
#[derive(Default)]
struct Line {
    tickets: HashMap<String, u64>,
    taken: u64,
}

/// A front end's side: submit, cancel and look up jobs on Redis; hear every job's events and feed
/// them to the local event hub (`JobQueue`, which the websockets and HTTP APIs read); store the
/// results this front end's reader gets.
pub struct RedisFrontEnd {
    client: redis::Client,
    conn: ConnectionManager,
    capacity: usize,
    claim_idle: Duration,
    hub: Arc<JobQueue>,
    store: Arc<ImageStore>,
    line: Mutex<Line>,
}

impl RedisFrontEnd {
    /// Connects, makes the groups, starts hearing events and storing results.
    pub async fn start(
        url: &str,
        capacity: usize,
        claim_idle: Duration,
        hub: Arc<JobQueue>,
        store: Arc<ImageStore>,
        history: Arc<History>,
    ) -> anyhow::Result<Arc<RedisFrontEnd>> {
        let client = open_client(url)?;
        let mut conn = ConnectionManager::new(client.clone()).await.map_err(|e| anyhow::anyhow!("connecting to {url}: {e}"))?;
        ensure_groups(&mut conn).await.map_err(|e| anyhow::anyhow!("creating the consumer groups on {url}: {e}"))?;
        let taken: Option<u64> = conn.get(TAKEN).await?;
        let front = Arc::new(RedisFrontEnd {
            client,
            conn,
            capacity: capacity.max(1),
            claim_idle,
            hub,
            store,
            line: Mutex::new(Line { taken: taken.unwrap_or(0), ..Line::default() }),
        });
        // subscribed before the first submission can be answered
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(front.clone().hear_events(Some(ready_tx)));
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        tokio::spawn(front.clone().store_results(history));
        Ok(front)
    }

    /// Puts a job on the stream; its place in line.
    pub fn submit(&self, job: Job) -> Result<usize, StudioError> {
        let Some(image) = job.image() else {
            return Err(enhancement_on_redis());
        };
        let upload = match &image.request.kind {
            JobKind::Transform { upload_id, .. } => {
                let path = self.store.upload_path(upload_id).ok_or_else(|| StudioError::not_found("No such upload."))?;
                std::fs::read(&path).map_err(|_| StudioError::not_found("This upload has expired; please upload the image again."))?
            }
            JobKind::Generate { .. } => Vec::new(),
        };
        let queued = QueuedJob {
            id: job.id.clone(),
            request: image.request.clone(),
            seed: image.seed,
            width: image.width,
            height: image.height,
            source: job.source,
            client: job.client.0.to_string(),
            submitted_unix_ms: unix_ms(),
        };
        let payload = serde_json::to_string(&queued).expect("jobs serialize");
        // templates: the script fills in the ticket and the place in line (0 here)
        let template = JobEvent::Queued { job_id: job.id.clone(), position: 0 };
        let state = serde_json::to_string(&StoredState { event: template.clone(), ticket: Some(0) }).expect("states serialize");
        let line_wire = serde_json::to_string(&Wire::Queued { job_id: job.id.clone(), ticket: 0 }).expect("serializes");
        let event_wire = serde_json::to_string(&Wire::Event { event: Box::new(template) }).expect("serializes");
        let mut conn = self.conn.clone();
        let (ticket, place): (i64, i64) = block_on(
            SUBMIT_SCRIPT
                .key(TICKETS)
                .key(TAKEN)
                .key(JOBS)
                .key(state_key(&job.id))
                .key(EVENTS)
                .arg(self.capacity)
                .arg(payload)
                .arg(upload)
                .arg(state)
                .arg(line_wire)
                .arg(event_wire)
                .arg(KEEP_SECS)
                .invoke_async(&mut conn),
        )
        .map_err(redis_unavailable)?;
        if ticket < 0 {
            self.hub.metrics.refusals.with_label_values(&["queue_full"]).inc();
            return Err(StudioError::new(
                ErrorKind::QueueFull,
                format!("The queue is full ({place} jobs waiting). Please try again in a minute."),
            ));
        }
        let (ticket, place) = (ticket as u64, place.max(1) as usize);
        // known here at once (the client may watch before the channel echoes it back)
        self.hear(Wire::Queued { job_id: job.id.clone(), ticket });
        Ok(place)
    }

    /// How many jobs wait in Redis (all front ends).
    pub fn waiting(&self) -> redis::RedisResult<u64> {
        let mut conn = self.conn.clone();
        let (tickets, taken): (Option<u64>, Option<u64>) = block_on(redis::pipe().get(TICKETS).get(TAKEN).query_async(&mut conn))?;
        Ok(tickets.unwrap_or(0).saturating_sub(taken.unwrap_or(0)))
    }

    /// Cancels a job wherever it is: a waiting one ends now, a running one at its worker's next
    /// step.
    pub fn cancel(&self, job_id: &str) -> Result<(), StudioError> {
        let mut conn = self.conn.clone();
        block_on(async {
            let state = read_state(&mut conn, job_id).await.map_err(redis_unavailable)?;
            let Some(state) = state else { return Err(StudioError::not_found("No such job.")) };
            if state.event.is_terminal() {
                return Ok(());
            }
            let _: () = conn.set_ex(cancel_key(job_id), 1, KEEP_SECS).await.map_err(redis_unavailable)?;
            let _: i64 = conn.publish(CANCEL, job_id).await.map_err(redis_unavailable)?;
            if matches!(state.event, JobEvent::Queued { .. }) {
                publish_event(&mut conn, &JobEvent::Cancelled { job_id: job_id.to_string() }, None)
                    .await
                    .map_err(redis_unavailable)?;
            }
            Ok(())
        })
    }

    /// A job's latest state from Redis (a job this front end has not heard of: submitted before
    /// it started, or through another front end).
    pub async fn snapshot(&self, job_id: &str) -> Option<JobEvent> {
        let mut conn = self.conn.clone();
        let state = read_state(&mut conn, job_id).await.ok()??;
        if let (JobEvent::Queued { .. }, Some(ticket)) = (&state.event, state.ticket) {
            self.hear(Wire::Queued { job_id: job_id.to_string(), ticket });
            return self.hub.snapshot(job_id);
        }
        Some(state.event)
    }

    /// Handles one message of `zimage:events`: the event goes to the local hub, places in line are
    /// recomputed.
    fn hear(&self, wire: Wire) {
        let mut line = self.line.lock().unwrap_or_else(|p| p.into_inner());
        match wire {
            Wire::Event { event } => {
                if !matches!(*event, JobEvent::Queued { .. }) {
                    line.tickets.remove(event.job_id());
                }
                // a place in line is this front end's own computation (below), and a `queued` heard
                // late never replaces a later state
                let later = || self.hub.snapshot(event.job_id()).is_some_and(|e| !matches!(e, JobEvent::Queued { .. }));
                if !matches!(*event, JobEvent::Queued { .. }) || (!line.tickets.contains_key(event.job_id()) && !later()) {
                    self.hub.publish(*event);
                }
                return;
            }
            Wire::Queued { job_id, ticket } => {
                if line.tickets.len() > 100_000 {
                    line.tickets.clear(); // jobs whose end was missed (Redis restarted)
                }
                if ticket > line.taken && !self.hub.snapshot(&job_id).is_some_and(|e| !matches!(e, JobEvent::Queued { .. })) {
                    line.tickets.insert(job_id, ticket);
                }
            }
            Wire::Taken { taken } => line.taken = line.taken.max(taken),
        }
        let taken = line.taken;
        for (job_id, ticket) in &line.tickets {
            let position = ticket.saturating_sub(taken).max(1) as usize;
            let ev = JobEvent::Queued { job_id: job_id.clone(), position };
            if self.hub.snapshot(job_id).as_ref() != Some(&ev) {
                self.hub.publish(ev);
            }
        }
    }

    /// Hears `zimage:events` for as long as the process runs (reconnecting after a Redis outage).
    async fn hear_events(self: Arc<Self>, mut ready: Option<tokio::sync::oneshot::Sender<()>>) {
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(EVENTS).await {
                    Ok(()) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let Ok(payload) = msg.get_payload::<String>() else { continue };
                            match serde_json::from_str::<Wire>(&payload) {
                                Ok(wire) => self.hear(wire),
                                Err(e) => eprintln!("[redis] an event this front end does not read: {e}"),
                            }
                        }
                        eprintln!("[redis] the events subscription ended; subscribing again");
                    }
                    Err(e) => eprintln!("[redis] subscribing to {EVENTS}: {e}"),
                },
                Err(e) => eprintln!("[redis] connecting for events: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Reads finished jobs from `zimage:results` (this front end's share, and any another front
    /// end left unstored for longer than the claim idle time), stores each image and announces
    /// the job done.
    async fn store_results(self: Arc<Self>, history: Arc<History>) {
        let consumer = consumer_name("frontend");
        loop {
            let mut reader = match self.client.get_multiplexed_async_connection().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("[redis] connecting for results: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                let entry = match claim_stale(&mut reader, RESULTS, FRONTENDS, &consumer, self.claim_idle).await {
                    Ok(Some(e)) => Ok(Some(e)),
                    Ok(None) => read_new(&mut reader, RESULTS, FRONTENDS, &consumer).await,
                    Err(e) => Err(e),
                };
                let entry = match entry {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(e) => {
                        eprintln!("[redis] reading results: {e}");
                        break;
                    }
                };
                if let Err(e) = self.store_one(&entry, &history).await {
                    eprintln!("[redis] storing result {}: {e}", entry.id);
                    continue; // left pending: claimed again after the idle time
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn store_one(&self, entry: &StreamId, history: &Arc<History>) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let (Some(job_id), Some(result), Some(png)) =
            (field_string(entry, "job_id"), field_string(entry, "result"), field_bytes(entry, "png"))
        else {
            eprintln!("[redis] a malformed result entry {} was dropped", entry.id);
            return ack(&mut conn, RESULTS, FRONTENDS, &entry.id).await;
        };
        let already_final: bool = conn.exists(final_key(&job_id)).await?;
        if !already_final {
            let event = match serde_json::from_str::<JobResult>(&result) {
                Ok(result) => {
                    let (store, history, id) = (self.store.clone(), history.clone(), job_id.clone());
                    tokio::task::spawn_blocking(move || save_result(&store, &history, id, &png, result))
                        .await
                        .unwrap_or_else(|_| JobEvent::Error { job_id: job_id.clone(), reason: "Storing the image crashed; the error was logged on the server.".into() })
                }
                Err(e) => JobEvent::Error { job_id: job_id.clone(), reason: format!("The worker's result could not be read: {e}") },
            };
            publish_event(&mut conn, &event, None).await?;
        }
        ack(&mut conn, RESULTS, FRONTENDS, &entry.id).await
    }
}

/// `zimage worker`'s settings.
pub struct WorkerOptions {
    pub url: String,
    /// A pending job whose worker has not renewed its claim this long is run by another worker.
    pub claim_idle: Duration,
    pub job_timeout: Option<Duration>,
}

/// Runs jobs from Redis on `generator` until SIGTERM / Ctrl-C (the running job finishes first).
pub fn run_worker(opts: WorkerOptions, label: String, generator: Arc<dyn Generator>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zimage-worker")
        .build()?;
    let r = rt.block_on(worker_loop(opts, label, generator));
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

async fn worker_loop(opts: WorkerOptions, label: String, generator: Arc<dyn Generator>) -> anyhow::Result<()> {
    let client = open_client(&opts.url)?;
    let mut conn = ConnectionManager::new(client.clone()).await.map_err(|e| anyhow::anyhow!("connecting to {}: {e}", opts.url))?;
    ensure_groups(&mut conn).await?;
    let consumer = consumer_name("worker");
    // Transform inputs arrive with their job; the pipeline code reads them from an upload folder.
    let scratch = std::env::temp_dir().join(format!("zimage-worker-{}", std::process::id()));
    let store = Arc::new(ImageStore::open(&scratch)?);
    // The worker runs the same queue, pipeline and PNG code as `zimage serve`, on a local queue of
    // one job at a time; this loop feeds it from Redis and forwards its events.
    let local = JobQueue::new(
        QueueLimits { capacity: 1, max_per_client: 0, job_timeout: opts.job_timeout },
        Arc::new(Metrics::new()),
    );
    let handle = tokio::runtime::Handle::current();
    let deliver_conn = conn.clone();
    let sink = ResultSink::Forward(Box::new(move |job: &Job, png: Vec<u8>, result: JobResult| {
        let mut conn = deliver_conn.clone();
        let job_id = job.id.clone();
        let delivered = handle.block_on(deliver_result(&mut conn, &job_id, png, &result));
        match delivered {
            Ok(_) => JobEvent::Done { job_id, result },
            Err(e) => JobEvent::Error { job_id, reason: format!("The finished image could not be sent to the studio: {e}") },
        }
    }));
    let _worker = spawn_worker_with("zimage-worker-0".into(), local.clone(), generator, store.clone(), sink);
    tokio::spawn(hear_cancels(client.clone(), local.clone()));
    let mut reader = client.get_multiplexed_async_connection().await?;
    let mut events = local.subscribe();
    let mut stop = Box::pin(super::shutdown_signal());
    eprintln!("worker {consumer} on {label} is taking jobs from {}", opts.url);
    loop {
        let next = tokio::select! {
            _ = &mut stop => break,
            next = async {
                match claim_stale(&mut reader, JOBS, WORKERS, &consumer, opts.claim_idle).await? {
                    Some(e) => Ok(Some((e, true))),
                    None => Ok(read_new(&mut reader, JOBS, WORKERS, &consumer).await?.map(|e| (e, false))),
                }
            } => next,
        };
        let (entry, reclaimed) = match next {
            Ok(Some(next)) => next,
            Ok(None) => continue,
            Err::<_, redis::RedisError>(e) => {
                eprintln!("[redis] reading jobs: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(c) = client.get_multiplexed_async_connection().await {
                    reader = c;
                }
                continue;
            }
        };
        if !reclaimed {
            let taken: u64 = conn.incr(TAKEN, 1).await?;
            let wire = serde_json::to_string(&Wire::Taken { taken }).expect("serializes");
            let _: i64 = conn.publish(EVENTS, wire).await?;
        }
        let job = field_string(&entry, "job").and_then(|j| serde_json::from_str::<QueuedJob>(&j).ok());
        let Some(job) = job else {
            eprintln!("[redis] a malformed job entry {} was dropped", entry.id);
            ack(&mut conn, JOBS, WORKERS, &entry.id).await?;
            continue;
        };
        let (cancelled, ended, delivered): (bool, bool, bool) = redis::pipe()
            .exists(cancel_key(&job.id))
            .exists(final_key(&job.id))
            .exists(result_key(&job.id))
            .query_async(&mut conn)
            .await?;
        if ended || delivered || cancelled {
            // ended before it started (cancelled while waiting), or its earlier worker delivered
            // the result and died before acknowledging it
            if cancelled {
                publish_event(&mut conn, &JobEvent::Cancelled { job_id: job.id.clone() }, None).await?;
            }
            ack(&mut conn, JOBS, WORKERS, &entry.id).await?;
            continue;
        }
        let (runs, _): (u64, bool) = redis::pipe().incr(runs_key(&job.id), 1).expire(runs_key(&job.id), KEEP_SECS as i64).query_async(&mut conn).await?;
        if runs > MAX_RUNS {
            eprintln!("[redis] job {} lost its worker {MAX_RUNS} times; failing it", job.id);
            let reason = format!("This job stopped its worker {MAX_RUNS} times, so it was not run again. Try other settings.");
            publish_event(&mut conn, &JobEvent::Error { job_id: job.id.clone(), reason }, None).await?;
            ack(&mut conn, JOBS, WORKERS, &entry.id).await?;
            continue;
        }
        if reclaimed {
            eprintln!("[redis] job {} lost its worker; running it again", job.id);
            let ev = JobEvent::Restarted {
                job_id: job.id.clone(),
                reason: "The worker running this job stopped; another worker is running it again from the start.".into(),
            };
            publish_event(&mut conn, &ev, None).await?;
        }
        let (job_id, t0) = (job.id.clone(), Instant::now());
        eprintln!("[worker] running job {job_id}");
        let upload = match &job.request.kind {
            JobKind::Transform { upload_id, .. } => store.upload_path(upload_id),
            JobKind::Generate { .. } => None,
        };
        run_one(&mut conn, &local, &mut events, &store, &entry, job, &consumer, opts.claim_idle).await?;
        ack(&mut conn, JOBS, WORKERS, &entry.id).await?;
        if let Some(path) = upload {
            let _ = std::fs::remove_file(path); // it came with the job; the front end keeps its own
        }
        eprintln!("[worker] job {job_id} over in {:.1?}", t0.elapsed());
    }
    eprintln!("worker {consumer} stopped");
    local.shutdown();
    Ok(())
}

/// Runs one job on the local queue, forwarding its events, renewing the claim on its entry.
#[allow(clippy::too_many_arguments)]
async fn run_one(
    conn: &mut ConnectionManager,
    local: &Arc<JobQueue>,
    events: &mut tokio::sync::broadcast::Receiver<JobEvent>,
    store: &ImageStore,
    entry: &StreamId,
    job: QueuedJob,
    consumer: &str,
    claim_idle: Duration,
) -> redis::RedisResult<()> {
    let job_id = job.id.clone();
    if let JobKind::Transform { upload_id, .. } = &job.request.kind {
        let bytes = field_bytes(entry, "upload").unwrap_or_default();
        if let Some(path) = store.upload_path(upload_id) {
            if let Err(e) = std::fs::write(&path, bytes) {
                eprintln!("[worker] writing the upload of job {job_id}: {e}");
            }
        }
    }
    let waited = Duration::from_millis(unix_ms().saturating_sub(job.submitted_unix_ms));
    let submitted = Instant::now().checked_sub(waited).unwrap_or_else(Instant::now);
    let local_job = Job::new(job.request, job.seed, job.width, job.height, job.source, ClientId::new(job.client)).accepted_as(job.id, submitted);
    if let Err(e) = local.submit(local_job) {
        publish_event(conn, &JobEvent::Error { job_id, reason: e.reason }, None).await?;
        return Ok(());
    }
    // a cancel published between the check before the start and now was not heard
    let cancelled: bool = conn.exists(cancel_key(&job_id)).await?;
    if cancelled {
        let _ = local.cancel(&job_id);
    }
    let mut renew = tokio::time::interval((claim_idle / 3).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            ev = events.recv() => {
                let ev = match ev {
                    Ok(ev) => ev,
                    // missed some steps: the latest state is enough
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => match local.snapshot(&job_id) {
                        Some(ev) => ev,
                        None => continue,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                };
                if ev.job_id() != job_id {
                    continue;
                }
                match ev {
                    JobEvent::Queued { .. } => {}
                    // the result went to the front ends, which announce it once it is stored
                    JobEvent::Done { .. } => return Ok(()),
                    ev if ev.is_terminal() => {
                        publish_event(conn, &ev, None).await?;
                        return Ok(());
                    }
                    ev => {
                        publish_event(conn, &ev, None).await?;
                    }
                }
            }
            _ = renew.tick() => {
                // claiming our own entry resets its idle time: other workers leave it alone
                let _: redis::Value = redis::cmd("XCLAIM").arg(JOBS).arg(WORKERS).arg(consumer).arg(0).arg(&entry.id).arg("JUSTID").query_async(conn).await?;
            }
        }
    }
}

/// Sends a finished PNG to the front ends, unless another run of the job already did.
async fn deliver_result(conn: &mut ConnectionManager, job_id: &str, png: Vec<u8>, result: &JobResult) -> redis::RedisResult<bool> {
    let first: Option<String> = redis::cmd("SET").arg(result_key(job_id)).arg(1).arg("NX").arg("EX").arg(KEEP_SECS).query_async(conn).await?;
    if first.is_none() {
        return Ok(false);
    }
    let result = serde_json::to_string(result).expect("results serialize");
    let _: String = conn.xadd(RESULTS, "*", &[("job_id", job_id.as_bytes()), ("result", result.as_bytes()), ("png", png.as_slice())]).await?;
    Ok(true)
}

/// Stops the local job when a front end cancels it.
async fn hear_cancels(client: redis::Client, local: Arc<JobQueue>) {
    loop {
        if let Ok(mut pubsub) = client.get_async_pubsub().await {
            if pubsub.subscribe(CANCEL).await.is_ok() {
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(job_id) = msg.get_payload::<String>() {
                        let _ = local.cancel(&job_id);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The refusal of a prompt enhancement on a Redis front end: the workers' protocol carries image
/// jobs only.
pub fn enhancement_on_redis() -> StudioError {
    StudioError::new(
        ErrorKind::Unavailable,
        "Prompt enhancement is not available on a server whose jobs run on Redis workers (--queue redis://); it runs on servers that hold the model themselves.",
    )
}
