//! wal-receive's metrics, and the HTTP endpoint that serves them in Prometheus text format
//! (`--metrics-addr`): positions received, reported and stored, the lag in bytes and seconds, the
//! last store latency, reconnects and errors. Lock-free counters, written by the stream and
//! upload tasks; the page and the endpoint are `crate::prometheus`'s.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use walvault_wal::Lsn;

use crate::prometheus::{Kind, Page};

#[derive(Default)]
pub(crate) struct Metrics {
    received_lsn: AtomicU64,
    flushed_lsn: AtomicU64,
    stored_lsn: AtomicU64,
    server_lsn: AtomicU64,
    /// When the oldest byte not yet stored arrived (µs since the Unix epoch; 0: none).
    unstored_since_us: AtomicU64,
    store_latency_us: AtomicU64,
    fragments: AtomicU64,
    segments: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Metrics {
    pub(crate) fn received(&self, end: Lsn) {
        self.received_lsn.fetch_max(end.0, Ordering::Relaxed);
    }

    /// When the oldest byte not yet stored arrived; `None` when there is none.
    pub(crate) fn backlog_since(&self, since: Option<SystemTime>) {
        let us = since.map_or(0, |t| {
            t.duration_since(UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        });
        self.unstored_since_us.store(us, Ordering::Relaxed);
    }

    pub(crate) fn server_end(&self, end: Lsn) {
        self.server_lsn.fetch_max(end.0, Ordering::Relaxed);
    }

    pub(crate) fn flushed(&self, lsn: Lsn) {
        self.flushed_lsn.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub(crate) fn stored(&self, lsn: Lsn) {
        self.stored_lsn.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub(crate) fn fragment_stored(&self, latency: Duration) {
        self.fragments.fetch_add(1, Ordering::Relaxed);
        self.latency(latency);
    }

    pub(crate) fn segment_stored(&self, latency: Duration) {
        self.segments.fetch_add(1, Ordering::Relaxed);
        self.latency(latency);
    }

    fn latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.store_latency_us.store(us, Ordering::Relaxed);
    }

    pub(crate) fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The page in Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (received, stored, server) = (
            get(&self.received_lsn),
            get(&self.stored_lsn),
            get(&self.server_lsn),
        );
        let since = get(&self.unstored_since_us);
        let lag_seconds = if since == 0 {
            0.0
        } else {
            now_us().saturating_sub(since) as f64 / 1e6
        };
        let rows: [(&str, &str, &str, String); 11] = [
            (
                "walvault_receive_received_lsn",
                "gauge",
                "End of the WAL received from the server (byte position).",
                received.to_string(),
            ),
            (
                "walvault_receive_flushed_lsn",
                "gauge",
                "Flush position last reported to the server (byte position).",
                get(&self.flushed_lsn).to_string(),
            ),
            (
                "walvault_receive_stored_lsn",
                "gauge",
                "End of the WAL durable in the repository (byte position).",
                stored.to_string(),
            ),
            (
                "walvault_receive_server_lsn",
                "gauge",
                "The server's end of WAL as last reported by it (byte position).",
                server.to_string(),
            ),
            (
                "walvault_receive_lag_bytes",
                "gauge",
                "WAL on the server not yet durable in the repository.",
                server.max(received).saturating_sub(stored).to_string(),
            ),
            (
                "walvault_receive_lag_seconds",
                "gauge",
                "Age of the oldest received WAL not yet durable in the repository.",
                format!("{lag_seconds:.3}"),
            ),
            (
                "walvault_receive_store_latency_seconds",
                "gauge",
                "Duration of the last store into the repository.",
                format!("{:.6}", get(&self.store_latency_us) as f64 / 1e6),
            ),
            (
                "walvault_receive_fragments_stored_total",
                "counter",
                "Fragments of unfinished segments stored.",
                get(&self.fragments).to_string(),
            ),
            (
                "walvault_receive_segments_stored_total",
                "counter",
                "Complete segments stored.",
                get(&self.segments).to_string(),
            ),
            (
                "walvault_receive_reconnects_total",
                "counter",
                "Connections to the server after the first.",
                get(&self.reconnects).to_string(),
            ),
            (
                "walvault_receive_errors_total",
                "counter",
                "Failed connections, streams and stores.",
                get(&self.errors).to_string(),
            ),
        ];
        let mut page = Page::default();
        for (name, kind, help, value) in rows {
            let kind = if kind == "counter" {
                Kind::Counter
            } else {
                Kind::Gauge
            };
            page.one(name, kind, help, value);
        }
        page.finish()
    }
}

/// Serves `metrics` on `addr` until the process ends.
pub(crate) async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    crate::prometheus::serve(addr, move || {
        let metrics = Arc::clone(&metrics);
        async move { metrics.render() }
    })
    .await
    .map(|_| ())
}
