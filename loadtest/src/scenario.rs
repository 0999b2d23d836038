//! The scenarios (after LiveKit's published benchmark, scaled to one small machine) and the
//! runner that adds load in steps and measures each.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{Semaphore, watch};

use crate::client::{PubCounters, PublisherSpec, SubCounters, spawn_publisher, spawn_subscriber};
use crate::cpu;
use crate::media::{simulcast_720p, single_360p};
use crate::report::{self, Report, StepResult, Totals};
use crate::target::{JoinSpec, Participant, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Scenario {
    /// One publisher (720p camera in three simulcast layers, and a microphone) and S
    /// subscribers; steps are subscriber counts.
    Livestream,
    /// N participants, each publishing a camera (one 360p layer, a meeting tile) and a
    /// microphone and receiving everyone else; steps are participant counts (a fresh room each).
    Meeting,
    /// Ten speakers (microphone only, hearing each other) and S listeners; steps are listener
    /// counts.
    Audio,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Livestream => "livestream",
            Scenario::Meeting => "meeting",
            Scenario::Audio => "audio",
        }
    }
}

const SPEAKERS: usize = 10;

#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub steps: Vec<usize>,
    /// Measuring window per step.
    pub step_secs: u64,
    /// Wait after the step's joins before measuring.
    pub settle_secs: u64,
    /// Joins in flight at once.
    pub join_concurrency: usize,
    pub room: String,
    /// Where the clients' sockets bind: an address the server can reach.
    pub client_ip: IpAddr,
    pub server_pid: Option<u32>,
    /// Print a line per second of each window.
    pub verbose: bool,
}

/// Everyone joined so far, and the switch that stops their clients.
struct Crowd {
    stop: watch::Sender<bool>,
    participants: Vec<Participant>,
    pubs: Vec<Arc<PubCounters>>,
    subs: Vec<Arc<SubCounters>>,
    problems: Vec<String>,
    next_id: usize,
}

impl Crowd {
    fn new() -> Crowd {
        Crowd {
            stop: watch::channel(false).0,
            participants: Vec::new(),
            pubs: Vec::new(),
            subs: Vec::new(),
            problems: Vec::new(),
            next_id: 0,
        }
    }

    fn leave(self) {
        let _ = self.stop.send(true);
        drop(self.participants);
    }
}

/// What one participant should be.
#[derive(Clone, Copy)]
struct Role {
    video: bool,
    /// The 720p camera in three layers; otherwise one 360p layer.
    simulcast: bool,
    audio: bool,
    subscribe: bool,
    expect_publishers: usize,
}

impl Role {
    fn publishes(self) -> bool {
        self.video || self.audio
    }
}

pub async fn run(target: Arc<dyn Target>, plan: &Plan) -> anyhow::Result<Report> {
    let mut steps = Vec::new();
    let mut problems = Vec::new();
    let mut all_joins = Vec::new();
    match plan.scenario {
        Scenario::Livestream | Scenario::Audio => {
            let (speakers, speaker) = if plan.scenario == Scenario::Livestream {
                (
                    1,
                    Role {
                        video: true,
                        simulcast: true,
                        audio: true,
                        subscribe: false,
                        expect_publishers: 0,
                    },
                )
            } else {
                (
                    SPEAKERS,
                    Role {
                        video: false,
                        simulcast: false,
                        audio: true,
                        subscribe: true,
                        expect_publishers: SPEAKERS - 1,
                    },
                )
            };
            let listener = Role {
                video: false,
                simulcast: false,
                audio: false,
                subscribe: true,
                expect_publishers: speakers,
            };
            target.prepare(&plan.room, speakers).await?;
            let mut crowd = Crowd::new();
            add(&target, plan, &mut crowd, &plan.room, speaker, speakers).await?;
            wait_publishers(&crowd).await?;
            let base = crowd.subs.len();
            for &s in &plan.steps {
                let first = crowd.subs.len();
                let want = (s + base).saturating_sub(first);
                add(&target, plan, &mut crowd, &plan.room, listener, want).await?;
                let step = measure_step(plan, &crowd, first).await;
                all_joins.extend(joins(&crowd.subs[first..]));
                if plan.verbose {
                    println!("{}", step.line());
                }
                steps.push(step);
            }
            problems.append(&mut crowd.problems);
            problems.extend(client_problems(&crowd));
            crowd.leave();
        }
        Scenario::Meeting => {
            for &n in &plan.steps {
                let room = format!("{}-{n}", plan.room);
                target.prepare(&room, n).await?;
                let mut crowd = Crowd::new();
                // One layer: servers choose layers differently (dangjian by each viewer's estimate,
                // Janus the one asked for), and the comparison must be at equal load.
                let role = Role {
                    video: true,
                    simulcast: false,
                    audio: true,
                    subscribe: true,
                    expect_publishers: n.saturating_sub(1),
                };
                add(&target, plan, &mut crowd, &room, role, n).await?;
                wait_publishers(&crowd).await?;
                let step = measure_step(plan, &crowd, 0).await;
                all_joins.extend(joins(&crowd.subs));
                if plan.verbose {
                    println!("{}", step.line());
                }
                steps.push(step);
                problems.append(&mut crowd.problems);
                problems.extend(client_problems(&crowd));
                crowd.leave();
                // Let the server notice everyone left before the next room fills.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    let loss = {
        let (lost, expected) = steps.iter().fold((0.0, 0.0), |(l, e), s: &StepResult| {
            let exp = s.packets_per_second * s.seconds;
            (l + s.loss_ratio * exp, e + exp)
        });
        if expected > 0.0 { lost / expected } else { 0.0 }
    };
    let mut joins_ms: Vec<u64> = all_joins.iter().map(|us| us / 1000).collect();
    problems.sort();
    problems.dedup();
    Ok(Report {
        server: target.name().into(),
        scenario: plan.scenario.name().into(),
        machine: cpu::machine(),
        packets_forwarded_per_cpu_second: steps.last().and_then(|s| s.packets_per_cpu_second),
        steps,
        loss_ratio: loss,
        join_ms_p50: report::percentile(&mut joins_ms, 50.0) as f64,
        join_ms_p99: report::percentile(&mut joins_ms, 99.0) as f64,
        problems,
    })
}

fn joins(subs: &[Arc<SubCounters>]) -> Vec<u64> {
    stage(subs, |s| &s.join_us)
}

/// The subscribers' times (µs) to one stage of joining, of those that reached it.
fn stage(subs: &[Arc<SubCounters>], which: impl Fn(&SubCounters) -> &AtomicU64) -> Vec<u64> {
    subs.iter()
        .map(|s| which(s).load(Ordering::Relaxed))
        .filter(|j| *j > 0)
        .collect()
}

fn median_ms(mut v: Vec<u64>) -> f64 {
    report::percentile(&mut v, 50.0) as f64 / 1000.0
}

fn client_problems(crowd: &Crowd) -> Vec<String> {
    let p = |slot: &std::sync::Mutex<Option<String>>| {
        slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    };
    crowd
        .pubs
        .iter()
        .filter_map(|c| p(&c.problem).map(|e| format!("publisher: {e}")))
        .chain(
            crowd
                .subs
                .iter()
                .filter_map(|c| p(&c.problem).map(|e| format!("subscriber: {e}"))),
        )
        .collect()
}

/// Joins `count` participants in `room`, `plan.join_concurrency` at a time, and starts their
/// clients. A join the server refuses is a problem of the run, not the end of it.
async fn add(
    target: &Arc<dyn Target>,
    plan: &Plan,
    crowd: &mut Crowd,
    room: &str,
    role: Role,
    count: usize,
) -> anyhow::Result<()> {
    let gate = Arc::new(Semaphore::new(plan.join_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let id = crowd.next_id;
        crowd.next_id += 1;
        let spec = JoinSpec {
            room: room.into(),
            identity: format!("{}-{id}", if role.publishes() { "pub" } else { "sub" }),
            publish: role.publishes(),
            subscribe: role.subscribe,
            expect_publishers: role.expect_publishers,
        };
        let (target, gate, stop, ip) = (
            target.clone(),
            gate.clone(),
            crowd.stop.subscribe(),
            plan.client_ip,
        );
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let asked = Instant::now();
            let mut p = target
                .join(&spec)
                .await
                .with_context(|| format!("{} joins", spec.identity))?;
            let mut publisher = None;
            if let Some(link) = p.publish.take() {
                let spec = PublisherSpec {
                    layers: match (role.video, role.simulcast) {
                        (false, _) => Vec::new(),
                        (true, true) => simulcast_720p(),
                        (true, false) => single_360p(),
                    },
                    audio: role.audio,
                };
                publisher =
                    Some(spawn_publisher(ip, link, spec, id as u32 + 1, stop.clone()).await?);
            }
            let mut subscriber = None;
            if let Some(link) = p.subscribe.take() {
                subscriber = Some(spawn_subscriber(ip, link, asked, stop).await?);
            }
            anyhow::Ok((p, publisher, subscriber))
        });
    }
    while let Some(r) = tasks.join_next().await {
        match r.context("join task")? {
            Ok((p, publisher, subscriber)) => {
                crowd.participants.push(p);
                crowd.pubs.extend(publisher);
                crowd.subs.extend(subscriber);
            }
            Err(e) => crowd.problems.push(format!("{e:#}")),
        }
    }
    Ok(())
}

/// Until every publisher is connected (and sending), at most 30 s.
async fn wait_publishers(crowd: &Crowd) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while !crowd
        .pubs
        .iter()
        .all(|p| p.connected.load(Ordering::Relaxed))
    {
        if Instant::now() > until {
            let up = crowd
                .pubs
                .iter()
                .filter(|p| p.connected.load(Ordering::Relaxed))
                .count();
            anyhow::bail!(
                "only {up} of {} publishers connected within 30 s",
                crowd.pubs.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits for the new subscribers' first frames (≤ 30 s), settles, then measures a window.
async fn measure_step(plan: &Plan, crowd: &Crowd, first_new: usize) -> StepResult {
    let new = &crowd.subs[first_new..];
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until && new.iter().any(|s| s.join_us.load(Ordering::Relaxed) == 0) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(plan.settle_secs)).await;
    let subs = &crowd.subs;
    report::take_latencies(subs);
    let start = Instant::now();
    let cpu0 = plan.server_pid.and_then(cpu::process_cpu_seconds);
    let self0 = cpu::self_cpu_seconds();
    let t0 = report::totals(subs);
    let mut prev = (t0, start, cpu0);
    for i in 1..=plan.step_secs {
        tokio::time::sleep_until((start + Duration::from_secs(i)).into()).await;
        let now = (
            report::totals(subs),
            Instant::now(),
            plan.server_pid.and_then(cpu::process_cpu_seconds),
        );
        if plan.verbose {
            println!("  {}", second_line(i, &prev, &now));
        }
        prev = now;
    }
    let (t1, end, cpu1) = prev;
    let secs = end.duration_since(start).as_secs_f64();
    let mut lat: Vec<u64> = report::take_latencies(subs)
        .into_iter()
        .map(u64::from)
        .collect();
    let mut join: Vec<u64> = joins(new);
    let server_cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let packets = t1.packets - t0.packets;
    let subscribers = subs.len().max(1) as f64;
    StepResult {
        subscribers: subs.len(),
        connected: t1.connected,
        publishers: crowd.pubs.len(),
        seconds: secs,
        packets_per_second: packets as f64 / secs,
        megabits_per_second: (t1.bytes - t0.bytes) as f64 * 8.0 / secs / 1e6,
        retransmissions_per_second: (t1.retransmissions - t0.retransmissions) as f64 / secs,
        loss_ratio: report::loss(&t0, &t1),
        jitter_ms: t1.jitter_us as f64 / 1000.0,
        nacks_per_second: (t1.nacks - t0.nacks) as f64 / secs,
        fps_per_subscriber: (t1.frames - t0.frames) as f64 / secs / subscribers,
        latency_ms_p50: report::percentile(&mut lat, 50.0) as f64 / 1000.0,
        latency_ms_p99: report::percentile(&mut lat, 99.0) as f64 / 1000.0,
        join_ms_p50: report::percentile(&mut join, 50.0) as f64 / 1000.0,
        join_ms_p99: report::percentile(&mut join, 99.0) as f64 / 1000.0,
        offer_ms_p50: median_ms(stage(new, |s| &s.offer_us)),
        connected_ms_p50: median_ms(stage(new, |s| &s.connected_us)),
        first_packet_ms_p50: median_ms(stage(new, |s| &s.first_packet_us)),
        joins_pending: new.len() - joins(new).len(),
        server_cpu_seconds: server_cpu,
        server_cpu_percent: server_cpu.map(|c| c / secs * 100.0),
        packets_per_cpu_second: server_cpu.filter(|c| *c > 0.0).map(|c| packets as f64 / c),
        client_cpu_percent: (cpu::self_cpu_seconds() - self0) / secs * 100.0,
    }
}

fn second_line(
    i: u64,
    (a, ta, ca): &(Totals, Instant, Option<f64>),
    (b, tb, cb): &(Totals, Instant, Option<f64>),
) -> String {
    let secs = tb.duration_since(*ta).as_secs_f64().max(1e-3);
    let pkts = (b.packets - a.packets) as f64 / secs;
    let cpu = ca.zip(*cb).map(|(x, y)| (y - x) / secs * 100.0);
    format!(
        "t={i:>3}s connected {:>5}  {:>9.0} pkt/s  {:>7.1} Mbit/s  loss {:>6.3}%  jitter {:>5.2} ms  nacks {:>5.0}/s  server cpu {}",
        b.connected,
        pkts,
        (b.bytes - a.bytes) as f64 * 8.0 / secs / 1e6,
        report::loss(a, b) * 100.0,
        b.jitter_us as f64 / 1000.0,
        (b.nacks - a.nacks) as f64 / secs,
        cpu.map_or("-".into(), |c| format!("{c:.0}%")),
    )
}
