//! The forwarding hot path through the sans-IO core, and the bare SRTP cipher it pays for.
//!
//! Setup (not timed): one `rtc` client publishing VP8 and N `rtc` subscriber clients, connected
//! to one [`Sfu`] through ICE, DTLS and the offer/answer exchange over an in-memory network with
//! a virtual clock (the approach of `tests/forwarding.rs`). Timed: one real, already encrypted
//! 1,100-byte publisher SRTP datagram into `Sfu::handle_datagram`, then every datagram out of
//! `Sfu::poll_transmit` (decrypt, rewrite, N × protect with the subscriber's SRTP key, TWCC
//! number, RTX history). The subscribers' datagrams are counted and dropped.
//! `FORWARDING_BENCH_RTC_PATH=1` sends through rtc's pipeline instead (`write` + interceptors +
//! its SRTP), as before the fast path.
//!
//! SRTP replay protection forbids feeding a datagram twice, so each batch (`iter_custom`) is fed
//! freshly written packets that continue the publisher's sequence; between batches the virtual
//! clock moves one step and the SFU's and the publisher's timers run (not timed).
//!
//! Run: `cargo bench -p sfu --bench forwarding -- --warm-up-time 1 --measurement-time 3`.
//! Prints a summary: time per forwarded packet ÷ bare SRTP protect of the negotiated profile.

fn rtc_path() -> bool {
    std::env::var_os("FORWARDING_BENCH_RTC_PATH").is_some_and(|v| v != "0")
}

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use rtc::srtp::protection_profile::ProtectionProfile;
use rtc::statistics::StatsSelector;
use sfu::RouterId;
use sfu::core::{Direction, PeerId, Sfu, SfuConfig, SfuEvent};

const SFU_ADDR: &str = "127.0.0.1:50000";
const STEP: Duration = Duration::from_millis(2);
const PUB_SSRC: u32 = 0x1111_0001;
/// Size of the plain RTP packet the publisher writes (header 12 + payload).
const PACKET: usize = 1_100;
const SUBSCRIBERS: [usize; 3] = [1, 10, 100];

struct Client {
    addr: SocketAddr,
    pc: RTCPeerConnection,
    peer: PeerId,
    connected: bool,
}

struct Net {
    now: Instant,
    sfu_addr: SocketAddr,
    sfu: Sfu,
    clients: Vec<Client>,
    events: Vec<SfuEvent>,
    /// The publisher's video sender, payload type and next sequence number.
    sender: Option<(RTCRtpSenderId, u8, u16)>,
    payload: Bytes,
}

impl Net {
    fn new() -> Net {
        let sfu_addr: SocketAddr = SFU_ADDR.parse().unwrap();
        let mut payload = vec![0xABu8; PACKET - 12];
        payload[0] = 0x10; // VP8 payload descriptor: start of partition 0.
        Net {
            now: Instant::now(),
            sfu_addr,
            sfu: {
                let mut sfu = Sfu::new(SfuConfig {
                    advertised: sfu_addr,
                    advertised_tcp: None,
                })
                .unwrap();
                sfu.set_fast_path(!rtc_path());
                sfu
            },
            clients: Vec::new(),
            events: Vec::new(),
            sender: None,
            payload: Bytes::from(payload),
        }
    }

    fn new_client(&mut self, owner: &str, direction: Direction) -> usize {
        let port = 40_001 + self.clients.len() as u16;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let pc = sfu::engine::client_peer_connection(self.now, addr).unwrap();
        let room = RouterId("room-1".into());
        let peer = self
            .sfu
            .create_peer(self.now, &room, owner, direction)
            .unwrap();
        self.clients.push(Client {
            addr,
            pc,
            peer,
            connected: false,
        });
        self.clients.len() - 1
    }

    /// Client 0: sends one VP8 track.
    fn publisher(&mut self) {
        let c = self.new_client("alice", Direction::Publish);
        let now = self.now;
        let pc = &mut self.clients[c].pc;
        let track = MediaStreamTrack::new(
            "camera".into(),
            "cam".into(),
            "cam".into(),
            RtpCodecKind::Video,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(PUB_SSRC),
                    ..Default::default()
                },
                codec: sfu::engine::vp8(),
                ..Default::default()
            }],
        );
        let sender = pc.add_track(track).unwrap();
        let offer = pc.create_offer(None).unwrap();
        pc.set_local_description(now, offer.clone()).unwrap();
        let answer = self
            .sfu
            .publisher_offer(now, self.clients[c].peer, offer.sdp)
            .unwrap();
        let pc = &mut self.clients[c].pc;
        pc.set_remote_description(now, RTCSessionDescription::answer(answer).unwrap())
            .unwrap();
        let pt = pc
            .rtp_sender(sender)
            .unwrap()
            .get_parameters()
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case("video/VP8"))
            .map(|c| c.payload_type)
            .unwrap();
        self.sender = Some((sender, pt, 1000));
        self.pump();
    }

    /// Writes one video packet on the publisher; returns what its engine puts on the wire.
    fn write(&mut self, out: &mut Vec<BytesMut>) {
        let (sender, pt, seq) = self.sender.unwrap();
        self.sender = Some((sender, pt, seq.wrapping_add(1)));
        let now = self.now;
        let pc = &mut self.clients[0].pc;
        let pkt = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker: seq % 4 == 3,
                payload_type: pt,
                sequence_number: seq,
                timestamp: u32::from(seq / 4).wrapping_mul(3000),
                ssrc: PUB_SSRC,
                ..Default::default()
            },
            payload: self.payload.clone(),
        };
        pc.rtp_sender(sender).unwrap().write_rtp(now, pkt).unwrap();
        while let Some(m) = pc.poll_write() {
            out.push(m.message);
        }
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, data: BytesMut) {
        if to == self.sfu_addr {
            self.sfu.handle_datagram(self.now, from, &data);
            return;
        }
        let now = self.now;
        if let Some(c) = self.clients.iter_mut().find(|c| c.addr == to) {
            let transport = TransportContext {
                local_addr: to,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            };
            let _ = c.pc.handle_read(TaggedBytesMut {
                now,
                transport,
                message: data,
            });
        }
    }

    /// Moves datagrams and events until nothing is in flight; `only_publisher` drops what the
    /// SFU sends the subscribers and leaves them alone.
    fn pump_with(&mut self, only_publisher: bool) {
        for round in 0.. {
            assert!(round < 1000, "network did not settle");
            let mut wire = Vec::new();
            let driven = if only_publisher {
                1
            } else {
                self.clients.len()
            };
            for c in &mut self.clients[..driven] {
                while let Some(m) = c.pc.poll_write() {
                    wire.push((c.addr, m.transport.peer_addr, m.message));
                }
            }
            let publisher = self.clients[0].addr;
            while let Some(t) = self.sfu.poll_transmit() {
                if !only_publisher || t.to == publisher {
                    wire.push((self.sfu_addr, t.to, t.data.into()));
                }
            }
            let mut events = Vec::new();
            while let Some(ev) = self.sfu.poll_event() {
                events.push(ev);
            }
            if wire.is_empty() && events.is_empty() {
                break;
            }
            for (from, to, data) in wire {
                self.deliver(from, to, data);
            }
            while let Some(ev) = self.sfu.poll_event() {
                events.push(ev);
            }
            for ev in events {
                self.on_sfu_event(ev);
            }
            for c in &mut self.clients[..driven] {
                while let Some(ev) = c.pc.poll_event() {
                    if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                        c.connected = s == RTCPeerConnectionState::Connected;
                    }
                }
                while c.pc.poll_read().is_some() {}
            }
        }
    }

    fn pump(&mut self) {
        self.pump_with(false);
    }

    fn on_sfu_event(&mut self, ev: SfuEvent) {
        if let SfuEvent::SubscriberOffer { peer, sdp, .. } = &ev {
            let now = self.now;
            if let Some(c) = self.clients.iter_mut().find(|c| c.peer == *peer) {
                c.pc.set_remote_description(
                    now,
                    RTCSessionDescription::offer(sdp.clone()).unwrap(),
                )
                .unwrap();
                let answer = c.pc.create_answer(None).unwrap();
                c.pc.set_local_description(now, answer.clone()).unwrap();
                self.sfu.subscriber_answer(now, *peer, answer.sdp).unwrap();
            }
        }
        self.events.push(ev);
    }

    /// Advances the virtual clock one step and fires due timers.
    fn step_with(&mut self, only_publisher: bool) {
        self.pump_with(only_publisher);
        self.now += STEP;
        let now = self.now;
        let driven = if only_publisher {
            1
        } else {
            self.clients.len()
        };
        for c in &mut self.clients[..driven] {
            if c.pc.poll_timeout().is_some_and(|t| t <= now) {
                let _ = c.pc.handle_timeout(now);
            }
        }
        if self.sfu.poll_timeout().is_some_and(|t| t <= now) {
            self.sfu.handle_timeout(now);
        }
        self.pump_with(only_publisher);
    }

    fn sfu_connected(&self, peer: PeerId) -> bool {
        self.events.contains(&SfuEvent::Connected { peer })
    }

    fn run_until(&mut self, what: &str, cond: impl Fn(&Net) -> bool) {
        for _ in 0..10_000 {
            if cond(self) {
                return;
            }
            self.step_with(false);
        }
        panic!("setup stuck waiting for: {what}");
    }

    /// A publisher with a producer and `n` subscribers receiving it, all connected.
    fn setup(n: usize) -> Net {
        let mut net = Net::new();
        net.publisher();
        let peer = net.clients[0].peer;
        net.run_until("publisher connected", |n| {
            n.clients[0].connected && n.sfu_connected(peer)
        });
        let mut prime = Vec::new();
        while !net
            .events
            .iter()
            .any(|e| matches!(e, SfuEvent::ProducerAdded { .. }))
        {
            net.write(&mut prime);
            for d in prime.drain(..) {
                let from = net.clients[0].addr;
                net.deliver(from, net.sfu_addr, d);
            }
            net.step_with(false);
        }
        for i in 0..n {
            net.new_client(&format!("viewer-{i}"), Direction::Subscribe);
        }
        net.pump();
        net.run_until("subscribers connected", |net| {
            net.clients[1..].iter().all(|c| {
                c.connected
                    && net.sfu_connected(c.peer)
                    && net.events.iter().any(|e| {
                        matches!(e, SfuEvent::SubscriberOffer { peer, tracks, .. }
                            if *peer == c.peer && !tracks.is_empty())
                    })
            })
        });
        // Let the new subscribers' keyframe requests and first reports settle.
        for _ in 0..50 {
            net.step_with(false);
        }
        net
    }

    /// The SRTP profile the publisher's connection negotiated, as its stats name it.
    fn profile(&mut self) -> String {
        let now = self.now;
        let report = self.clients[0].pc.get_stats(now, StatsSelector::None);
        report
            .transport()
            .map(|t| t.srtp_cipher.clone())
            .unwrap_or_default()
    }
}

/// Mean nanoseconds per iteration of each benchmark, collected from `iter_custom`.
type Means = RefCell<BTreeMap<String, (Duration, u64)>>;

fn record(means: &Means, key: &str, elapsed: Duration, iters: u64) {
    let mut m = means.borrow_mut();
    let e = m.entry(key.to_string()).or_default();
    e.0 += elapsed;
    e.1 += iters;
}

fn mean_ns(means: &Means, key: &str) -> Option<f64> {
    means
        .borrow()
        .get(key)
        .filter(|(_, n)| *n > 0)
        .map(|(d, n)| d.as_nanos() as f64 / *n as f64)
}

fn forwarding(c: &mut Criterion, means: &Means) -> Option<String> {
    let mut negotiated = None;
    let mut g = c.benchmark_group("forward");
    for n in SUBSCRIBERS {
        let t0 = Instant::now();
        let mut net = Net::setup(n);
        if negotiated.is_none() {
            negotiated = Some(net.profile());
        }
        eprintln!("setup with {n} subscribers took {:?}", t0.elapsed());
        let from = net.clients[0].addr;
        let (mut fed, mut out) = (0u64, 0u64);
        let mut batch = Vec::new();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("subscribers", n), &n, |b, _| {
            b.iter_custom(|iters| {
                // Not timed: fresh packets (replay protection), an empty transmit queue.
                batch.clear();
                for _ in 0..iters {
                    net.write(&mut batch);
                }
                while net.sfu.poll_transmit().is_some() {}
                let start = Instant::now();
                for d in &batch {
                    net.sfu.handle_datagram(net.now, from, d);
                    while let Some(t) = net.sfu.poll_transmit() {
                        black_box(&t);
                        out += 1;
                    }
                }
                let elapsed = start.elapsed();
                fed += batch.len() as u64;
                record(means, &format!("forward/{n}"), elapsed, iters);
                // Not timed: one step of the virtual clock for the SFU's and publisher's timers.
                net.step_with(true);
                elapsed
            })
        });
        eprintln!(
            "{n} subscribers: {fed} datagrams in, {out} out ({:.2} per input); forward errors {}",
            out as f64 / fed.max(1) as f64,
            net.sfu.stats().forward_errors
        );
    }
    g.finish();
    negotiated
}

fn srtp_protect(c: &mut Criterion, means: &Means, negotiated: &str) {
    let provider = rtc::crypto::default_provider().unwrap();
    let mut g = c.benchmark_group("srtp_protect");
    g.throughput(Throughput::Elements(1));
    for (name, profile) in [
        (
            "AES128_CM_HMAC_SHA1_80",
            ProtectionProfile::Aes128CmHmacSha1_80,
        ),
        ("AEAD_AES_128_GCM", ProtectionProfile::AeadAes128Gcm),
    ] {
        let key: Vec<u8> = (0..profile.key_len()).map(|_| rand::random()).collect();
        let salt: Vec<u8> = (0..profile.salt_len()).map(|_| rand::random()).collect();
        let mut ctx =
            rtc::srtp::context::Context::new(&key, &salt, profile, None, None, provider.crypto())
                .unwrap();
        let mut pkt = vec![0xABu8; PACKET];
        pkt[..12].copy_from_slice(&[0x80, 96, 0, 0, 0, 0, 0, 0, 0x22, 0x22, 0, 1]);
        let mut seq: u16 = 0;
        let key_name = if negotiated.ends_with(name) {
            "srtp/negotiated".to_string()
        } else {
            format!("srtp/{name}")
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    seq = seq.wrapping_add(1);
                    pkt[2..4].copy_from_slice(&seq.to_be_bytes());
                    black_box(ctx.encrypt_rtp(black_box(&pkt)).unwrap());
                }
                let elapsed = start.elapsed();
                record(means, &key_name, elapsed, iters);
                elapsed
            })
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let means = Means::default();
    let negotiated = forwarding(&mut c, &means);
    let name = negotiated.unwrap_or_default();
    srtp_protect(&mut c, &means, &name);
    c.final_summary();

    println!(
        "\nsummary (means over warm-up and measurement; {})",
        if rtc_path() {
            "through rtc's send pipeline"
        } else {
            "forwarding fast path"
        }
    );
    let cipher = mean_ns(&means, "srtp/negotiated");
    println!(
        "  bare SRTP protect, negotiated profile {name}: {}",
        cipher.map_or("-".into(), |c| format!("{c:.0} ns"))
    );
    for n in SUBSCRIBERS {
        let Some(per_input) = mean_ns(&means, &format!("forward/{n}")) else {
            continue;
        };
        let per_fwd = per_input / n as f64;
        println!(
            "  {n:>3} subscribers: {:.1} µs per input packet, {:.2} µs per forwarded packet \
             = {:.0} forwarded packets/s per core; ÷ bare cipher = {}",
            per_input / 1e3,
            per_fwd / 1e3,
            1e9 / per_fwd,
            cipher.map_or("-".into(), |c| format!("{:.1}×", per_fwd / c)),
        );
    }
}
