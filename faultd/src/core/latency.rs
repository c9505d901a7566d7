//! Fault latency recording: every fault's time from its read to its wake, as percentiles
//! and a power-of-two histogram (QEMU's postcopy-latency-dist).

use std::time::Duration;

use serde::Serialize;

/// Fault latencies (from reading the fault to the wake), in nanoseconds.
#[derive(Debug, Default)]
pub struct LatencyRecorder {
    samples_ns: Vec<u32>,
    /// The power-of-two distribution, kept as faults come.
    buckets: [u64; LATENCY_BUCKETS],
    sum_ns: u64,
}

/// Power-of-two microsecond buckets: latencies are capped at 2^32 ns, i.e. bucket 22.
pub const LATENCY_BUCKETS: usize = 23;

impl LatencyRecorder {
    /// Records one fault's latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = latency.as_nanos().min(u128::from(u32::MAX)) as u32;
        self.samples_ns.push(ns);
        self.buckets[bucket_of(ns)] += 1;
        self.sum_ns = self.sum_ns.saturating_add(u64::from(ns));
    }

    /// Every bucket of the distribution so far (see [`LatencyRecorder::distribution`]) and
    /// the sum of the latencies, in seconds.
    pub fn live(&self) -> (&[u64; LATENCY_BUCKETS], f64) {
        (&self.buckets, self.sum_ns as f64 / 1e9)
    }

    /// Percentiles and maximum, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let mut sorted = self.samples_ns.clone();
        sorted.sort_unstable();
        let pick = |q: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            f64::from(sorted[rank - 1]) / 1000.0
        };
        LatencySummary {
            count: sorted.len() as u64,
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            p999: pick(0.999),
            max: sorted.last().map_or(0.0, |&ns| f64::from(ns) / 1000.0),
        }
    }

    /// Counts per power-of-two microsecond bucket: `buckets[i]` counts latencies in
    /// `[2^i, 2^(i+1))` µs (bucket 0 also holds anything under 1 µs), like QEMU's
    /// postcopy-latency-dist.
    pub fn distribution(&self) -> Vec<u64> {
        let used = self
            .buckets
            .iter()
            .rposition(|&n| n > 0)
            .map_or(1, |i| i + 1);
        self.buckets[..used].to_vec()
    }
}

/// The power-of-two microsecond bucket of a latency in nanoseconds.
fn bucket_of(ns: u32) -> usize {
    let us = (ns / 1000).max(1);
    (31 - us.leading_zeros()) as usize
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Faults measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_percentiles_and_buckets() {
        let mut r = LatencyRecorder::default();
        for us in 1..=1000u64 {
            r.record(Duration::from_micros(us));
        }
        let s = r.summary();
        assert_eq!(
            (s.count, s.p50, s.p90, s.p99, s.max),
            (1000, 500.0, 900.0, 990.0, 1000.0)
        );
        let d = r.distribution();
        assert_eq!(d[0], 1); // 1 µs
        assert_eq!(d[1], 2); // 2-3 µs
        assert_eq!(d[9], 489); // 512-999 µs
        assert_eq!(d.iter().sum::<u64>(), 1000);
    }

    #[test]
    fn test_empty_summary_is_zero() {
        let s = LatencyRecorder::default().summary();
        assert_eq!(s.count, 0);
        assert_eq!(s.max, 0.0);
    }
}
