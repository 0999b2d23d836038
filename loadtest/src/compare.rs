//! Two servers' reports side by side, at equal load, and the targets checked against
//! them.

use serde::Serialize;

use crate::report::Report;

/// The same step (subscriber count) on both servers.
#[derive(Debug, Clone, Serialize)]
pub struct StepPair {
    pub subscribers: usize,
    pub dangjian_packets_per_second: f64,
    pub janus_packets_per_second: f64,
    /// Server CPU seconds per million forwarded packets.
    pub dangjian_cpu_s_per_million: Option<f64>,
    pub janus_cpu_s_per_million: Option<f64>,
    /// Janus CPU per packet ÷ ours.
    pub janus_cpu_ratio: Option<f64>,
    pub dangjian_loss_ratio: f64,
    pub janus_loss_ratio: f64,
    pub dangjian_latency_ms_p50: f64,
    pub janus_latency_ms_p50: f64,
    pub dangjian_latency_ms_p99: f64,
    pub janus_latency_ms_p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub scenario: String,
    pub machine: String,
    /// dangjian's figures, as `run` reports them.
    pub packets_forwarded_per_cpu_second: Option<f64>,
    pub loss_ratio: f64,
    pub join_ms_p50: f64,
    pub join_ms_p99: f64,
    /// Janus CPU per forwarded packet ÷ dangjian's, at the largest step both ran.
    pub janus_cpu_ratio: Option<f64>,
    pub steps: Vec<StepPair>,
    pub checks: Vec<Check>,
    pub dangjian: Report,
    pub janus: Report,
}

fn per_million(pps_per_cpu: Option<f64>) -> Option<f64> {
    pps_per_cpu.filter(|p| *p > 0.0).map(|p| 1e6 / p)
}

pub fn compare(dangjian: Report, janus: Report) -> Comparison {
    let steps: Vec<StepPair> = dangjian
        .steps
        .iter()
        .filter_map(|d| {
            let j = janus
                .steps
                .iter()
                .find(|j| j.subscribers == d.subscribers)?;
            let (dc, jc) = (
                per_million(d.packets_per_cpu_second),
                per_million(j.packets_per_cpu_second),
            );
            Some(StepPair {
                subscribers: d.subscribers,
                dangjian_packets_per_second: d.packets_per_second,
                janus_packets_per_second: j.packets_per_second,
                dangjian_cpu_s_per_million: dc,
                janus_cpu_s_per_million: jc,
                janus_cpu_ratio: dc.zip(jc).map(|(d, j)| j / d),
                dangjian_loss_ratio: d.loss_ratio,
                janus_loss_ratio: j.loss_ratio,
                dangjian_latency_ms_p50: d.latency_ms_p50,
                janus_latency_ms_p50: j.latency_ms_p50,
                dangjian_latency_ms_p99: d.latency_ms_p99,
                janus_latency_ms_p99: j.latency_ms_p99,
            })
        })
        .collect();
    let janus_cpu_ratio = steps.iter().rev().find_map(|s| s.janus_cpu_ratio);
    let mut checks = vec![Check {
        target: "≥ 3× less server CPU per forwarded packet than Janus".into(),
        measured: janus_cpu_ratio.map_or("-".into(), |r| format!("{r:.2}×")),
        met: janus_cpu_ratio.map(|r| r >= 3.0),
    }];
    checks.extend(checks_for(&dangjian));
    Comparison {
        scenario: dangjian.scenario.clone(),
        machine: dangjian.machine.clone(),
        packets_forwarded_per_cpu_second: dangjian.packets_forwarded_per_cpu_second,
        loss_ratio: dangjian.loss_ratio,
        join_ms_p50: dangjian.join_ms_p50,
        join_ms_p99: dangjian.join_ms_p99,
        janus_cpu_ratio,
        steps,
        checks,
        dangjian,
        janus,
    }
}

/// The targets one server's run can be held to.
pub fn checks_for(r: &Report) -> Vec<Check> {
    let pps = r.packets_forwarded_per_cpu_second;
    // "No loss added up to 80 % CPU": the worst step whose server CPU stayed at or under 80 %
    // of one core.
    let light: Vec<f64> = r
        .steps
        .iter()
        .filter(|s| s.server_cpu_percent.is_some_and(|c| c <= 80.0))
        .map(|s| s.loss_ratio)
        .collect();
    let worst = light
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, l| Some(m.map_or(l, |m| m.max(l))));
    vec![
        Check {
            target: "≥ 150,000 forwarded packets per server CPU-second".into(),
            measured: pps.map_or("-".into(), |p| format!("{p:.0}")),
            met: pps.map(|p| p >= 150_000.0),
        },
        Check {
            target: "no loss added by the server up to 80 % CPU (≤ 0.01 %)".into(),
            measured: worst.map_or("no step at ≤ 80 % CPU".into(), |l| {
                format!("{:.4} %", l * 100.0)
            }),
            met: worst.map(|l| l <= 0.0001),
        },
        Check {
            target: "join time p99 < 300 ms".into(),
            measured: format!("{:.0} ms", r.join_ms_p99),
            met: Some(r.join_ms_p99 > 0.0 && r.join_ms_p99 < 300.0),
        },
    ]
}

pub fn print_checks(checks: &[Check]) {
    println!("\ntargets:");
    for c in checks {
        let verdict = match c.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        println!("  {:<62} {:>14}  {verdict}", c.target, c.measured);
    }
}

impl Comparison {
    pub fn print(&self) {
        self.dangjian.print();
        self.janus.print();
        println!(
            "\n== side by side · {} · {} ==",
            self.scenario, self.machine
        );
        println!(
            "{:>6} {:>10} {:>10} {:>12} {:>12} {:>7} {:>8} {:>8} {:>9} {:>9}",
            "subs",
            "dj pkt/s",
            "janus",
            "dj cpu-s/M",
            "janus",
            "ratio",
            "dj loss%",
            "janus",
            "dj lat99",
            "janus"
        );
        let f = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        for s in &self.steps {
            println!(
                "{:>6} {:>10.0} {:>10.0} {:>12} {:>12} {:>7} {:>8.3} {:>8.3} {:>9.1} {:>9.1}",
                s.subscribers,
                s.dangjian_packets_per_second,
                s.janus_packets_per_second,
                f(s.dangjian_cpu_s_per_million, 2),
                f(s.janus_cpu_s_per_million, 2),
                f(s.janus_cpu_ratio, 2),
                s.dangjian_loss_ratio * 100.0,
                s.janus_loss_ratio * 100.0,
                s.dangjian_latency_ms_p99,
                s.janus_latency_ms_p99,
            );
        }
        print_checks(&self.checks);
    }
}
