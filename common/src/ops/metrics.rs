//! Metrics for fleet tooling: `--metrics-listen ADDR` on both daemons serves the current
//! state as OpenMetrics text (the Prometheus exposition format, encoded by the
//! `prometheus-client` crate) on `GET /metrics`.
//!
//! A daemon hands the server a function that takes a [`Snapshot`] of its counters; every
//! scrape calls it, so the server holds no copy of the state and nothing is updated for it.
//! One thread serves the scrapes one at a time, each with a short deadline: a slow or silent
//! scraper delays the next scrape, never the migration.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use thiserror::Error;

/// Labels of one sample: (name, value) pairs.
pub type Labels = Vec<(String, String)>;

/// Whether a metric only grows (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows.
    Counter,
    /// Any value.
    Gauge,
}

/// A metric with its samples (one per label set).
#[derive(Debug, Clone)]
pub struct Metric {
    /// Name, without the `_total` suffix the encoder adds to counters.
    pub name: String,
    /// One line of help.
    pub help: String,
    /// Counter or gauge.
    pub kind: Kind,
    /// Samples.
    pub samples: Vec<(Labels, f64)>,
}

/// A histogram: cumulative bucket counts by upper bound, and the sum and count.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Name.
    pub name: String,
    /// One line of help.
    pub help: String,
    /// Labels of its one sample.
    pub labels: Labels,
    /// Sum of the observed values.
    pub sum: f64,
    /// Observations.
    pub count: u64,
    /// (upper bound, observations at or below it), increasing; `+Inf` is added.
    pub buckets: Vec<(f64, u64)>,
}

/// Everything a scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Counters and gauges.
    pub metrics: Vec<Metric>,
    /// Histograms.
    pub histograms: Vec<Histogram>,
}

impl Snapshot {
    /// Adds a metric with one unlabelled sample.
    pub fn one(&mut self, name: &str, help: &str, kind: Kind, value: f64) {
        self.labelled(name, help, kind, Vec::new(), value);
    }

    /// Adds a sample of a metric (the metric is created on first use).
    pub fn labelled(&mut self, name: &str, help: &str, kind: Kind, labels: Labels, value: f64) {
        match self.metrics.iter_mut().find(|m| m.name == name) {
            Some(m) => m.samples.push((labels, value)),
            None => self.metrics.push(Metric {
                name: name.to_owned(),
                help: help.to_owned(),
                kind,
                samples: vec![(labels, value)],
            }),
        }
    }

    /// The OpenMetrics text of the snapshot.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SnapshotCollector(self.clone())));
        let mut out = String::new();
        // Encoding into a String cannot fail but for a formatter error.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for m in &self.0.metrics {
            let kind = match m.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut family = encoder.encode_descriptor(&m.name, &m.help, None, kind)?;
            if let [(labels, value)] = &m.samples[..]
                && labels.is_empty()
            {
                encode_value(m.kind, *value, family)?;
                continue;
            }
            for (labels, value) in &m.samples {
                encode_value(m.kind, *value, family.encode_family(labels)?)?;
            }
        }
        for h in &self.0.histograms {
            let mut family =
                encoder.encode_descriptor(&h.name, &h.help, None, MetricType::Histogram)?;
            // (no labels: the descriptor's encoder is the sample's)
            let mut sample = if h.labels.is_empty() {
                family
            } else {
                family.encode_family(&h.labels)?
            };
            let mut buckets = h.buckets.clone();
            // prometheus-client writes `le="+Inf"` for f64::MAX (not for infinity).
            buckets.push((f64::MAX, h.count));
            // The encoder takes per-bucket counts and accumulates them itself.
            let mut previous = 0;
            let per_bucket: Vec<(f64, u64)> = buckets
                .iter()
                .map(|&(upper, cumulative)| {
                    let n = cumulative.saturating_sub(previous);
                    previous = cumulative.max(previous);
                    (upper, n)
                })
                .collect();
            sample.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum,
                h.count,
                &per_bucket,
                None,
            )?;
        }
        Ok(())
    }
}

/// Encodes one value: whole numbers as integers, the rest as floats.
fn encode_value(
    kind: Kind,
    value: f64,
    sample: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let whole = value.fract() == 0.0 && value.abs() < 9.0e15;
    match (kind, whole) {
        (Kind::Counter, true) if value >= 0.0 => ConstCounter::new(value as u64).encode(sample),
        (Kind::Counter, _) => ConstCounter::new(value.max(0.0)).encode(sample),
        (Kind::Gauge, true) => ConstGauge::new(value as i64).encode(sample),
        (Kind::Gauge, false) => ConstGauge::new(value).encode(sample),
    }
}

/// The metrics endpoint failed to start.
#[derive(Debug, Error)]
#[error("cannot serve metrics on {addr}")]
pub struct MetricsError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// A running metrics endpoint; it serves until the process ends.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
}

/// The function that takes a snapshot on each scrape.
pub type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

impl MetricsServer {
    /// Listens on `addr` and serves `GET /metrics` from `snapshot` on a thread of its own.
    ///
    /// # Errors
    /// Binding the address.
    pub fn start(addr: SocketAddr, snapshot: SnapshotFn) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr).map_err(|source| MetricsError { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| MetricsError { addr, source })?;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(conn) => {
                            let _ = serve_one(conn, &snapshot);
                        }
                        // Out of file descriptors, say: do not spin on it.
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .map_err(|source| MetricsError { addr, source })?;
        Ok(MetricsServer { addr: bound })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Longest a client may take to send its request (and to take the answer).
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// Answers one HTTP request (one per connection; 2 s in all to send it).
fn serve_one(mut conn: TcpStream, snapshot: &SnapshotFn) -> std::io::Result<()> {
    // One deadline for the whole request, however slowly it trickles in.
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    conn.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        conn.set_read_timeout(Some(left))?;
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            snapshot().render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served here\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())
}

/// Cumulative power-of-two microsecond buckets (bucket `i` counts values in
/// `[2^i, 2^(i+1))` µs, the first also everything below 1 µs) as histogram buckets in
/// seconds.
pub fn pow2_us_buckets(counts: &[u64]) -> Vec<(f64, u64)> {
    let mut total = 0;
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            total += n;
            ((1u64 << (i + 1)) as f64 / 1e6, total)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot::default();
        s.one(
            "faultd_pages_total",
            "Pages of guest RAM.",
            Kind::Gauge,
            1024.0,
        );
        s.labelled(
            "faultd_pages_placed",
            "Pages placed, by how they came.",
            Kind::Counter,
            vec![("how".into(), "pushed".into())],
            700.0,
        );
        s.labelled(
            "faultd_pages_placed",
            "Pages placed, by how they came.",
            Kind::Counter,
            vec![("how".into(), "requested".into())],
            20.0,
        );
        s.histograms.push(Histogram {
            name: "faultd_fault_latency_seconds".into(),
            help: "Fault latency.".into(),
            labels: Vec::new(),
            sum: 0.003,
            count: 3,
            buckets: pow2_us_buckets(&[1, 0, 2]),
        });
        s
    }

    #[test]
    fn a_snapshot_renders_as_openmetrics() {
        let text = sample().render();
        assert!(text.contains("# TYPE faultd_pages_total gauge"), "{text}");
        assert!(text.contains("faultd_pages_total 1024"), "{text}");
        assert!(
            text.contains("faultd_pages_placed_total{how=\"pushed\"} 700"),
            "{text}"
        );
        assert!(
            text.contains("faultd_pages_placed_total{how=\"requested\"} 20"),
            "{text}"
        );
        assert!(
            text.contains("faultd_fault_latency_seconds_bucket{le=\"0.000008\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("faultd_fault_latency_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains("faultd_fault_latency_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn the_endpoint_serves_metrics_and_nothing_else() {
        let server =
            MetricsServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(sample)).unwrap();
        let get = |request: &str| {
            let mut c = TcpStream::connect(server.addr()).unwrap();
            c.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(ok.contains("faultd_pages_total 1024"), "{ok}");
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        // A silent client, or one that trickles its request, holds the endpoint 2 s at most.
        let _silent = TcpStream::connect(server.addr()).unwrap();
        let mut slow = TcpStream::connect(server.addr()).unwrap();
        let started = std::time::Instant::now();
        std::thread::spawn(move || {
            for _ in 0..40 {
                if slow.write_all(b"G").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        assert!(get("GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
