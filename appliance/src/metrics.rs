//! Process-wide counters and histograms that the threads record as things happen (stream
//! traffic, storage commit latency). Figures that live in a thread's own state (links, routes,
//! members, Raft) are read from that thread at scrape time instead (`api::metrics`).
//!
//! Recording is an atomic add: a stream worker never waits on a scrape.

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, Registry};

/// The recorded metrics and the registry they are in.
pub struct Recorded {
    /// Where they are registered (gathered at every scrape).
    pub registry: Registry,
    /// Client data messages published (new ones, at their source).
    pub stream_published: IntCounter,
    /// Publishes of an already stored seq (a producer's retry, answered without storing).
    pub stream_duplicate_publishes: IntCounter,
    /// Messages that arrived again at a target and were dropped by seq (dedupe hits).
    pub stream_duplicate_arrivals: IntCounter,
    /// Messages handed to a subscriber.
    pub stream_delivered: IntCounter,
    /// Messages a subscriber acknowledged as processed.
    pub stream_processed: IntCounter,
    /// From a batch's publish to its answer (durable per its policy), seconds.
    pub stream_ack_latency: Histogram,
    /// One stream worker turn's commit to the storage backend (durable), seconds.
    pub stream_commit_latency: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("a valid metric name");
    registry
        .register(Box::new(counter.clone()))
        .expect("registered once");
    counter
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let histogram =
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid");
    registry
        .register(Box::new(histogram.clone()))
        .expect("registered once");
    histogram
}

/// The process's recorded metrics.
pub static RECORDED: LazyLock<Recorded> = LazyLock::new(|| {
    let registry = Registry::new();
    // 100 µs to ~13 s, doubling: fsyncs and acks on one host and across a mesh.
    let latency = prometheus::exponential_buckets(0.000_1, 2.0, 18).expect("valid buckets");
    Recorded {
        stream_published: counter(
            &registry,
            "meshd_stream_published_total",
            "Client data messages published at this node (new seqs).",
        ),
        stream_duplicate_publishes: counter(
            &registry,
            "meshd_stream_duplicate_publishes_total",
            "Publishes of a seq already stored (producer retries), answered without storing.",
        ),
        stream_duplicate_arrivals: counter(
            &registry,
            "meshd_stream_duplicate_arrivals_total",
            "Stream messages that arrived again at this target and were dropped by seq.",
        ),
        stream_delivered: counter(
            &registry,
            "meshd_stream_delivered_total",
            "Stream messages handed to subscribers at this node.",
        ),
        stream_processed: counter(
            &registry,
            "meshd_stream_processed_total",
            "Stream messages subscribers at this node acknowledged as processed.",
        ),
        stream_ack_latency: histogram(
            &registry,
            "meshd_stream_ack_latency_seconds",
            "From a publish batch's arrival to its answer (durable per its policy).",
            latency.clone(),
        ),
        stream_commit_latency: histogram(
            &registry,
            "meshd_storage_commit_latency_seconds",
            "One stream worker turn's commit to the storage backend (redb or PostgreSQL), durable when it returns.",
            latency,
        ),
        registry,
    }
});
