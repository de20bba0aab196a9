//! `/metrics` in the Prometheus text format: jobs by outcome, queue depth, refusals, step / job /
//! queue-wait latency histograms and GPU memory, from the `prometheus` crate's registry.

use prometheus::{Encoder, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Latency buckets in seconds: a tiny-model step is milliseconds, a 2048² job on a CPU minutes.
const SECONDS_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

pub struct Metrics {
    registry: Registry,
    /// Finished jobs by outcome (`done`, `error`, `cancelled`).
    pub jobs: IntCounterVec,
    /// Submissions refused before queueing, by reason (`rate_limited`, `client_cap`, `queue_full`,
    /// `unavailable`).
    pub refusals: IntCounterVec,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub step_seconds: Histogram,
    pub job_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub gpu_memory_used_bytes: GaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("zimage".into()), None).expect("a valid prefix");
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec())).expect("valid histogram")
        };
        let m = Metrics {
            jobs: IntCounterVec::new(Opts::new("jobs_total", "Finished jobs by outcome."), &["outcome"]).expect("valid counter"),
            refusals: IntCounterVec::new(Opts::new("submissions_refused_total", "Submissions refused before queueing, by reason."), &["reason"])
                .expect("valid counter"),
            queue_depth: IntGauge::new("queue_depth", "Jobs waiting for a worker.").expect("valid gauge"),
            running: IntGauge::new("jobs_running", "Jobs on a worker now.").expect("valid gauge"),
            step_seconds: histogram("step_seconds", "Time of one denoising step."),
            job_seconds: histogram("job_seconds", "Time from a job's start on a worker to its final event."),
            queue_wait_seconds: histogram("queue_wait_seconds", "Time a job waited in the queue before a worker took it."),
            gpu_memory_used_bytes: GaugeVec::new(Opts::new("gpu_memory_used_bytes", "Memory in use on each GPU (whole device)."), &["device"])
                .expect("valid gauge"),
            registry,
        };
        for c in [&m.jobs, &m.refusals] {
            m.registry.register(Box::new(c.clone())).expect("registered once");
        }
        for g in [&m.queue_depth, &m.running] {
            m.registry.register(Box::new(g.clone())).expect("registered once");
        }
        for h in [&m.step_seconds, &m.job_seconds, &m.queue_wait_seconds] {
            m.registry.register(Box::new(h.clone())).expect("registered once");
        }
        m.registry.register(Box::new(m.gpu_memory_used_bytes.clone())).expect("registered once");
        // the outcomes exist (at 0) from the start, so a dashboard's rate() has a series to read
        for outcome in ["done", "error", "cancelled"] {
            m.jobs.with_label_values(&[outcome]);
        }
        m
    }

    /// Everything in the text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // encoding our own well-formed families into a Vec cannot fail
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
