//! What a run measured: per-second lines while it runs, one [`StepResult`] per load step, and
//! the [`Report`] written as JSON.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::client::SubCounters;

/// The subscribers' counters summed at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub connected: usize,
    pub packets: u64,
    pub bytes: u64,
    pub retransmissions: u64,
    pub expected: u64,
    pub received: u64,
    pub frames: u64,
    pub nacks: u64,
    /// Mean over subscribers with video of their worst video stream's jitter, µs.
    pub jitter_us: u64,
}

pub fn totals(subs: &[Arc<SubCounters>]) -> Totals {
    let mut t = Totals::default();
    let (mut jitter_sum, mut jitter_n) = (0u64, 0u64);
    for s in subs {
        t.connected += usize::from(s.connected.load(Ordering::Relaxed));
        t.packets += s.packets.load(Ordering::Relaxed);
        t.bytes += s.bytes.load(Ordering::Relaxed);
        t.retransmissions += s.retransmissions.load(Ordering::Relaxed);
        t.expected += s.expected.load(Ordering::Relaxed);
        t.received += s.received.load(Ordering::Relaxed);
        t.frames += s.video_frames.load(Ordering::Relaxed);
        t.nacks += s.nacks.load(Ordering::Relaxed);
        let j = s.jitter_us.load(Ordering::Relaxed);
        if j > 0 {
            jitter_sum += j;
            jitter_n += 1;
        }
    }
    t.jitter_us = jitter_sum.checked_div(jitter_n).unwrap_or(0);
    t
}

/// Takes every subscriber's one-way delay samples so far (µs).
pub fn take_latencies(subs: &[Arc<SubCounters>]) -> Vec<u32> {
    let mut all = Vec::new();
    for s in subs {
        let mut l = s.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        all.append(&mut l);
    }
    all
}

/// The `p`th percentile (0–100) of `v`, by nearest rank; 0 for none.
pub fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Loss over a window: packets the sequence numbers said were sent but did not arrive the
/// first time.
pub fn loss(before: &Totals, after: &Totals) -> f64 {
    let expected = after.expected.saturating_sub(before.expected);
    let received = after.received.saturating_sub(before.received);
    if expected == 0 {
        0.0
    } else {
        expected.saturating_sub(received) as f64 / expected as f64
    }
}

/// One load step, measured over its window.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// Subscriber connections asked for, and those connected at the end of the window.
    pub subscribers: usize,
    pub connected: usize,
    pub publishers: usize,
    pub seconds: f64,
    /// RTP packets (and bytes) the subscribers received per second: what the server forwarded.
    pub packets_per_second: f64,
    pub megabits_per_second: f64,
    pub retransmissions_per_second: f64,
    pub loss_ratio: f64,
    pub jitter_ms: f64,
    pub nacks_per_second: f64,
    pub fps_per_subscriber: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Join time of the subscribers added in this step (asked → first whole frame).
    pub join_ms_p50: f64,
    pub join_ms_p99: f64,
    /// Medians of where that went: the server's offer, the connection up, the first packet.
    pub offer_ms_p50: f64,
    pub connected_ms_p50: f64,
    pub first_packet_ms_p50: f64,
    pub joins_pending: usize,
    /// The server's CPU seconds in the window, and as a share of one core.
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub packets_per_cpu_second: Option<f64>,
    /// The load tool's own CPU share of one core (it competes for the same machine).
    pub client_cpu_percent: f64,
}

impl StepResult {
    /// Server CPU microseconds per forwarded packet.
    pub fn cpu_us_per_packet(&self) -> Option<f64> {
        self.packets_per_cpu_second.map(|p| 1e6 / p.max(1e-9))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub server: String,
    pub scenario: String,
    pub machine: String,
    pub steps: Vec<StepResult>,
    /// At the largest step (the most load, where fixed costs matter least).
    pub packets_forwarded_per_cpu_second: Option<f64>,
    /// Over every step's window.
    pub loss_ratio: f64,
    /// Over every subscriber of the run.
    pub join_ms_p50: f64,
    pub join_ms_p99: f64,
    pub problems: Vec<String>,
}

pub fn header() -> String {
    format!(
        "{:>6} {:>6} {:>9} {:>8} {:>7} {:>7} {:>7} {:>6} {:>8} {:>8} {:>7} {:>9} {:>6}",
        "subs",
        "conn",
        "pkt/s",
        "Mbit/s",
        "loss%",
        "jit ms",
        "nack/s",
        "fps",
        "lat p50",
        "join p99",
        "srv cpu",
        "pkt/cpu-s",
        "cli"
    )
}

fn opt(v: Option<f64>, scale: f64, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{:.0}{unit}", v * scale))
}

impl StepResult {
    pub fn line(&self) -> String {
        format!(
            "{:>6} {:>6} {:>9.0} {:>8.1} {:>7.3} {:>7.2} {:>7.1} {:>6.1} {:>8.1} {:>8.0} {:>7} {:>9} {:>5.0}%",
            self.subscribers,
            self.connected,
            self.packets_per_second,
            self.megabits_per_second,
            self.loss_ratio * 100.0,
            self.jitter_ms,
            self.nacks_per_second,
            self.fps_per_subscriber,
            self.latency_ms_p50,
            self.join_ms_p99,
            opt(self.server_cpu_percent, 1.0, "%"),
            opt(self.packets_per_cpu_second, 1.0, ""),
            self.client_cpu_percent,
        )
    }
}

impl Report {
    pub fn print(&self) {
        println!(
            "\n== {} · {} · {} ==",
            self.server, self.scenario, self.machine
        );
        println!("{}", header());
        for s in &self.steps {
            println!("{}", s.line());
        }
        println!(
            "packets forwarded per server CPU-second (largest step): {}",
            opt(self.packets_forwarded_per_cpu_second, 1.0, "")
        );
        println!(
            "loss {:.4} %, join p50 {:.0} ms, p99 {:.0} ms",
            self.loss_ratio * 100.0,
            self.join_ms_p50,
            self.join_ms_p99
        );
        for p in &self.problems {
            println!("problem: {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut v, 50.0), 50);
        assert_eq!(percentile(&mut v, 99.0), 99);
        assert_eq!(percentile(&mut v, 100.0), 100);
        assert_eq!(percentile(&mut [], 50.0), 0);
        assert_eq!(percentile(&mut [7], 99.0), 7);
    }

    #[test]
    fn loss_counts_only_the_window() {
        let a = Totals {
            expected: 1000,
            received: 900,
            ..Default::default()
        };
        let b = Totals {
            expected: 2000,
            received: 1890,
            ..Default::default()
        };
        assert!((loss(&a, &b) - 0.01).abs() < 1e-9);
        assert_eq!(loss(&b, &b), 0.0);
    }
}
