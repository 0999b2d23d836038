//! Sans-IO integration tests for the SFU core: `rtc` client peer connections play the browsers,
//! one [`Sfu`] plays the server, and an in-memory network with a virtual clock connects them.
//! No sockets, no sleeping: every test runs a few seconds of session time in milliseconds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::RTCRtpReceiverId;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use sfu::RouterId;
use sfu::core::{Direction, MediaKind, PLI_INTERVAL, PeerId, ProducerId, Sfu, SfuConfig, SfuEvent};

const SFU_ADDR: &str = "127.0.0.1:50000";
const STEP: Duration = Duration::from_millis(2);
/// Virtual time any one test may run before it is declared stuck.
const MAX_STEPS: u64 = 40_000;
const PUB_VIDEO_SSRC: u32 = 0x1111_0001;
const PUB_AUDIO_SSRC: u32 = 0x1111_0002;

// ---------------------------------------------------------------------------------------------
// Client ("browser") construction
// ---------------------------------------------------------------------------------------------

/// Full ICE, the default codecs and interceptors, one host candidate on a fake address.
fn client_pc(now: Instant, addr: SocketAddr) -> RTCPeerConnection {
    sfu::engine::client_peer_connection(now, addr).unwrap()
}

fn local_track(id: &str, kind: RtpCodecKind, codec: RTCRtpCodec, ssrc: u32) -> MediaStreamTrack {
    MediaStreamTrack::new(
        "camera".into(),
        id.into(),
        id.into(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    )
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One RTP packet as a client's application saw it.
#[derive(Debug, Clone)]
struct Rx {
    track: String,
    ssrc: u32,
    payload: Bytes,
}

struct PubTrack {
    kind: MediaKind,
    sender: RTCRtpSenderId,
    ssrc: u32,
    mime: &'static str,
    seq: u16,
}

/// What a subscriber was offered: (mid, producer, owner) per track, and the SDP.
type Offer = (Vec<(String, ProducerId, String)>, String);

struct Client {
    addr: SocketAddr,
    pc: RTCPeerConnection,
    peer: PeerId,
    /// Vanished: its datagrams are discarded and it is no longer driven.
    offline: bool,
    connected: bool,
    tracks: Vec<PubTrack>,
    /// track id → (receiver, ssrc) for tracks it receives.
    receivers: HashMap<String, (RTCRtpReceiverId, u32)>,
    rtp: Vec<Rx>,
    /// media SSRC of each PLI it received, with when.
    plis: Vec<(Instant, u32)>,
    /// (SSRC, packet count) of each sender report it received.
    srs: Vec<(u32, u32)>,
    /// Transport-wide feedback packets and NACKed sequence numbers it received.
    twcc_feedback: usize,
    nacked: Vec<u16>,
    /// Every SubscriberOffer it answered: (tracks, sdp).
    offers: Vec<Offer>,
}

impl Client {
    fn received(&self, producer: ProducerId, tag: &str) -> Vec<&Rx> {
        let track = producer.to_string();
        self.rtp
            .iter()
            .filter(|r| r.track == track && r.payload.starts_with(tag.as_bytes()))
            .collect()
    }

    fn last_offer_tracks(&self) -> Vec<ProducerId> {
        let mut v: Vec<ProducerId> = self
            .offers
            .last()
            .map(|(t, _)| t.iter().map(|t| t.1).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

type C = usize;

struct Net {
    now: Instant,
    steps: u64,
    sfu_addr: SocketAddr,
    sfu: Sfu,
    clients: Vec<Client>,
    /// Every event the SFU emitted, in order.
    events: Vec<SfuEvent>,
    next_port: u16,
    discarded: u64,
    /// Drop the next this many RTP datagrams the SFU sends to this address with this SSRC.
    lose: Option<(SocketAddr, u32, usize)>,
    /// Copies of the RTP datagrams sent to this address with this SSRC.
    tap: Option<(SocketAddr, u32, Vec<BytesMut>)>,
}

impl Net {
    fn new() -> Net {
        let now = Instant::now();
        let sfu_addr: SocketAddr = SFU_ADDR.parse().unwrap();
        Net {
            now,
            steps: 0,
            sfu_addr,
            sfu: Sfu::new(SfuConfig {
                advertised: sfu_addr,
                advertised_tcp: None,
            })
            .unwrap(),
            clients: Vec::new(),
            events: Vec::new(),
            next_port: 40001,
            discarded: 0,
            lose: None,
            tap: None,
        }
    }

    fn room() -> RouterId {
        RouterId("room-1".into())
    }

    fn new_client(&mut self, router: &RouterId, owner: &str, direction: Direction) -> C {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.next_port).parse().unwrap();
        self.next_port += 1;
        let pc = client_pc(self.now, addr);
        let peer = self
            .sfu
            .create_peer(self.now, router, owner, direction)
            .unwrap();
        self.clients.push(Client {
            addr,
            pc,
            peer,
            offline: false,
            connected: false,
            tracks: Vec::new(),
            receivers: HashMap::new(),
            rtp: Vec::new(),
            plis: Vec::new(),
            srs: Vec::new(),
            twcc_feedback: 0,
            nacked: Vec::new(),
            offers: Vec::new(),
        });
        self.clients.len() - 1
    }

    /// A participant sending VP8 video and Opus audio; signaled, not yet connected.
    fn publisher(&mut self, router: &RouterId, owner: &str) -> C {
        let c = self.new_client(router, owner, Direction::Publish);
        let now = self.now;
        let cl = &mut self.clients[c];
        for (id, kind, rkind, codec, ssrc, mime) in [
            (
                "cam",
                MediaKind::Video,
                RtpCodecKind::Video,
                sfu::engine::vp8(),
                PUB_VIDEO_SSRC,
                "video/VP8",
            ),
            (
                "mic",
                MediaKind::Audio,
                RtpCodecKind::Audio,
                sfu::engine::opus(),
                PUB_AUDIO_SSRC,
                "audio/opus",
            ),
        ] {
            let sender = cl
                .pc
                .add_track(local_track(id, rkind, codec, ssrc))
                .unwrap();
            cl.tracks.push(PubTrack {
                kind,
                sender,
                ssrc,
                mime,
                seq: 1000,
            });
        }
        let offer = cl.pc.create_offer(None).unwrap();
        cl.pc.set_local_description(now, offer.clone()).unwrap();
        let answer = self.sfu.publisher_offer(now, cl.peer, offer.sdp).unwrap();
        cl.pc
            .set_remote_description(now, RTCSessionDescription::answer(answer).unwrap())
            .unwrap();
        self.pump();
        c
    }

    /// A Subscribe peer; the SFU's offers to it are answered automatically.
    fn subscriber(&mut self, router: &RouterId, owner: &str) -> C {
        let c = self.new_client(router, owner, Direction::Subscribe);
        self.pump();
        c
    }

    /// Sends one RTP packet of `kind` from publisher `c`; the payload starts with `tag`.
    fn send(&mut self, c: C, kind: MediaKind, tag: &str) -> Bytes {
        let now = self.now;
        let cl = &mut self.clients[c];
        let t = cl.tracks.iter_mut().find(|t| t.kind == kind).unwrap();
        t.seq = t.seq.wrapping_add(1);
        let (sender, ssrc, seq, mime) = (t.sender, t.ssrc, t.seq, t.mime);
        let mut s = cl.pc.rtp_sender(sender).unwrap();
        let pt = s
            .get_parameters()
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
            .map(|c| c.payload_type)
            .unwrap();
        let payload = Bytes::from(format!("{tag}:{seq}:{}", "x".repeat(seq as usize % 200)));
        let step = if kind == MediaKind::Video { 3000 } else { 960 };
        let pkt = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker: kind == MediaKind::Video,
                payload_type: pt,
                sequence_number: seq,
                timestamp: (seq as u32).wrapping_mul(step),
                ssrc,
                ..Default::default()
            },
            payload: payload.clone(),
        };
        s.write_rtp(now, pkt).unwrap();
        payload
    }

    /// Streams `video` video and `audio` audio packets, one of each per step, then lets the
    /// network settle. Returns the payloads sent per kind.
    fn stream(&mut self, c: C, video: usize, audio: usize, tag: &str) -> (Vec<Bytes>, Vec<Bytes>) {
        let (mut v, mut a) = (Vec::new(), Vec::new());
        for i in 0..video.max(audio) {
            if i < video {
                v.push(self.send(c, MediaKind::Video, tag));
            }
            if i < audio {
                a.push(self.send(c, MediaKind::Audio, tag));
            }
            self.step();
        }
        self.run_for(Duration::from_millis(200));
        (v, a)
    }

    /// Bob subscribes, then Alice publishes camera and microphone; returns once Bob has both:
    /// (bob, alice, video, audio).
    fn bob_watches_alice(&mut self) -> (C, C, ProducerId, ProducerId) {
        let room = Net::room();
        let bob = self.subscriber(&room, "bob");
        let alice = self.publisher(&room, "alice");
        let (video, audio) = self.start_publishing(alice);
        self.wait_subscribed(bob, &[video, audio]);
        (bob, alice, video, audio)
    }

    fn client_by_peer(&self, peer: PeerId) -> Option<C> {
        self.clients.iter().position(|c| c.peer == peer)
    }

    /// Moves datagrams, events and reads until nothing is in flight at this instant.
    fn pump(&mut self) {
        for round in 0.. {
            assert!(round < 1000, "network did not settle");
            let mut wire: Vec<(SocketAddr, SocketAddr, BytesMut)> = Vec::new();
            for c in self.clients.iter_mut().filter(|c| !c.offline) {
                while let Some(m) = c.pc.poll_write() {
                    wire.push((c.addr, m.transport.peer_addr, m.message));
                }
            }
            while let Some(t) = self.sfu.poll_transmit() {
                wire.push((self.sfu_addr, t.to, t.data.into()));
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
            for c in 0..self.clients.len() {
                self.drain_client(c);
            }
        }
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, data: BytesMut) {
        if let Some((addr, ssrc, copies)) = self.tap.as_mut()
            && *addr == to
            && data.len() >= 12
            && !(192..224).contains(&data[1])
            && data[8..12] == ssrc.to_be_bytes()
        {
            copies.push(data.clone());
        }
        if let Some((addr, ssrc, n)) = self.lose.as_mut()
            && *addr == to
            && *n > 0
            && data.len() >= 12
            && !(192..224).contains(&data[1])
            && data[8..12] == ssrc.to_be_bytes()
        {
            *n -= 1;
            return;
        }
        if to == self.sfu_addr {
            self.sfu.handle_datagram(self.now, from, &data);
            return;
        }
        let now = self.now;
        match self.clients.iter_mut().find(|c| c.addr == to) {
            Some(c) if !c.offline => {
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
            _ => self.discarded += 1,
        }
    }

    fn on_sfu_event(&mut self, ev: SfuEvent) {
        self.events.push(ev.clone());
        let SfuEvent::SubscriberOffer { peer, sdp, tracks } = ev else {
            return;
        };
        let Some(c) = self.client_by_peer(peer) else {
            return;
        };
        let now = self.now;
        let cl = &mut self.clients[c];
        if cl.offline {
            return;
        }
        cl.pc
            .set_remote_description(now, RTCSessionDescription::offer(sdp.clone()).unwrap())
            .unwrap();
        let answer = cl.pc.create_answer(None).unwrap();
        cl.pc.set_local_description(now, answer.clone()).unwrap();
        cl.offers.push((tracks, sdp));
        self.sfu.subscriber_answer(now, peer, answer.sdp).unwrap();
    }

    fn drain_client(&mut self, c: C) {
        let now = self.now;
        let cl = &mut self.clients[c];
        if cl.offline {
            return;
        }
        while let Some(ev) = cl.pc.poll_event() {
            match ev {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) => {
                    cl.connected = s == RTCPeerConnectionState::Connected
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    cl.receivers
                        .insert(init.track_id, (init.receiver_id, init.ssrc));
                }
                _ => {}
            }
        }
        while let Some(m) = cl.pc.poll_read() {
            match m.message {
                RTCMessage::RtpPacket(track, pkt) => cl.rtp.push(Rx {
                    track,
                    ssrc: pkt.header.ssrc,
                    payload: pkt.payload,
                }),
                RTCMessage::RtcpPacket(_, pkts) => {
                    for p in &pkts {
                        if let Some(pli) = p.as_any().downcast_ref::<PictureLossIndication>() {
                            cl.plis.push((now, pli.media_ssrc));
                        }
                        if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                            cl.srs.push((sr.ssrc, sr.packet_count));
                        }
                        if p.as_any().is::<TransportLayerCc>() {
                            cl.twcc_feedback += 1;
                        }
                        if let Some(n) = p.as_any().downcast_ref::<TransportLayerNack>() {
                            cl.nacked
                                .extend(n.nacks.iter().flat_map(|p| p.packet_list()));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Advances the virtual clock by one step and fires due timers.
    fn step(&mut self) {
        self.pump();
        self.steps += 1;
        assert!(self.steps < MAX_STEPS, "test ran out of virtual time");
        self.now += STEP;
        let now = self.now;
        for c in self.clients.iter_mut().filter(|c| !c.offline) {
            if c.pc.poll_timeout().is_some_and(|t| t <= now) {
                let _ = c.pc.handle_timeout(now);
            }
        }
        if self.sfu.poll_timeout().is_some_and(|t| t <= now) {
            self.sfu.handle_timeout(now);
        }
        self.pump();
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while self.now < until {
            self.step();
        }
    }

    fn run_until(&mut self, what: &str, limit: Duration, cond: impl Fn(&Net) -> bool) {
        let until = self.now + limit;
        while !cond(self) {
            assert!(
                self.now < until,
                "timed out after {limit:?} waiting for: {what}"
            );
            self.step();
        }
    }

    fn sfu_connected(&self, peer: PeerId) -> bool {
        self.events.contains(&SfuEvent::Connected { peer })
    }

    fn producers_added(&self) -> Vec<(ProducerId, MediaKind, String, PeerId, Option<String>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SfuEvent::ProducerAdded {
                    producer,
                    kind,
                    owner,
                    peer,
                    mid,
                    ..
                } => Some((*producer, *kind, owner.clone(), *peer, mid.clone())),
                _ => None,
            })
            .collect()
    }

    fn producer(&self, owner: &str, kind: MediaKind) -> ProducerId {
        self.producers_added()
            .into_iter()
            .find(|p| p.2 == owner && p.1 == kind)
            .map(|p| p.0)
            .unwrap()
    }

    /// Connects publisher `c` and makes it send until the SFU has a producer for both tracks.
    fn start_publishing(&mut self, c: C) -> (ProducerId, ProducerId) {
        let peer = self.clients[c].peer;
        self.run_until("publisher connected", Duration::from_secs(5), |n| {
            n.clients[c].connected && n.sfu_connected(peer)
        });
        let mut tries = 0;
        while self
            .producers_added()
            .iter()
            .filter(|p| p.3 == peer)
            .count()
            < 2
        {
            tries += 1;
            assert!(tries < 100, "no producers after 100 packets");
            self.send(c, MediaKind::Video, "prime");
            self.send(c, MediaKind::Audio, "prime");
            self.step();
        }
        let owner = self
            .producers_added()
            .into_iter()
            .find(|p| p.3 == peer)
            .unwrap()
            .2;
        (
            self.producer(&owner, MediaKind::Video),
            self.producer(&owner, MediaKind::Audio),
        )
    }

    /// Waits until subscriber `c` is connected and has answered an offer with exactly `producers`.
    fn wait_subscribed(&mut self, c: C, producers: &[ProducerId]) {
        let mut want = producers.to_vec();
        want.sort();
        let peer = self.clients[c].peer;
        self.run_until(
            "subscriber connected with its tracks",
            Duration::from_secs(5),
            |n| {
                n.clients[c].connected
                    && n.sfu_connected(peer)
                    && n.clients[c].last_offer_tracks() == want
            },
        );
    }
}

/// (kind, mid, msid track id, direction) of each m-section of an SDP.
fn sdp_sections(sdp: &str) -> Vec<(String, String, Option<String>, String)> {
    sdp.split("\nm=")
        .skip(1)
        .map(|s| {
            let kind = s.split(' ').next().unwrap_or_default().to_string();
            let attr = |name: &str| {
                s.lines()
                    .find_map(|l| l.trim_end().strip_prefix(name).map(str::to_string))
            };
            let mid = attr("a=mid:").unwrap_or_default();
            let msid = attr("a=msid:").and_then(|m| m.split(' ').nth(1).map(str::to_string));
            let dir = ["sendonly", "recvonly", "sendrecv", "inactive"]
                .into_iter()
                .find(|d| s.lines().any(|l| l.trim_end() == format!("a={d}")))
                .unwrap_or("")
                .to_string();
            (kind, mid, msid, dir)
        })
        .collect()
}

/// Asserts `sub` received exactly `sent` on `producer` (in order, intact, no duplicates), with an
/// SSRC that is not the publisher's.
fn assert_received_all(
    net: &Net,
    sub: C,
    producer: ProducerId,
    tag: &str,
    sent: &[Bytes],
    publisher_ssrc: u32,
) {
    let got = net.clients[sub].received(producer, tag);
    let payloads: Vec<&Bytes> = got.iter().map(|r| &r.payload).collect();
    assert_eq!(
        payloads.len(),
        sent.len(),
        "subscriber {sub} got {} of {} packets of {producer}",
        payloads.len(),
        sent.len()
    );
    assert!(
        payloads.iter().zip(sent).all(|(a, b)| *a == b),
        "payloads of {producer} differ for subscriber {sub}"
    );
    let ssrcs: Vec<u32> = got.iter().map(|r| r.ssrc).collect();
    assert!(
        ssrcs.iter().all(|s| *s == ssrcs[0]),
        "SSRC changed mid-stream"
    );
    assert_ne!(
        ssrcs[0], publisher_ssrc,
        "subscriber sees the publisher's SSRC"
    );
    let (_, announced) = net.clients[sub].receivers[&producer.to_string()];
    assert_eq!(ssrcs[0], announced);
}

/// Asserts `sub` received each of `sent` on `producer`, in any order, repairs included. rtc's
/// NACK generator does not count a repair that came as RTX and asks again, so a client may see a
/// packet more than once (browsers do not).
fn assert_received_each(
    net: &Net,
    sub: C,
    producer: ProducerId,
    tag: &str,
    sent: &[Bytes],
    what: &str,
) {
    let mut got: Vec<Bytes> = net.clients[sub]
        .received(producer, tag)
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    got.sort();
    got.dedup();
    let mut want = sent.to_vec();
    want.sort();
    assert_eq!(got, want, "{what}");
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn forwards_every_packet_to_every_subscriber() {
    let mut net = Net::new();
    let room = Net::room();
    let bob = net.subscriber(&room, "bob");
    let carol = net.subscriber(&room, "carol");
    let alice = net.publisher(&room, "alice");
    let (video, audio) = net.start_publishing(alice);

    let added = net.producers_added();
    assert_eq!(added.len(), 2, "{added:?}");
    assert!(
        added
            .iter()
            .all(|p| p.2 == "alice" && p.3 == net.clients[alice].peer && p.4.is_some())
    );
    assert!(
        added
            .iter()
            .any(|p| p.0 == video && p.1 == MediaKind::Video)
    );
    assert!(
        added
            .iter()
            .any(|p| p.0 == audio && p.1 == MediaKind::Audio)
    );

    for sub in [bob, carol] {
        net.wait_subscribed(sub, &[video, audio]);
        // The offer's mids carry those producers: the m-section with that mid has the right kind,
        // is sendonly and its msid names the producer.
        let (tracks, sdp) = net.clients[sub].offers.last().unwrap().clone();
        let sections = sdp_sections(&sdp);
        for (mid, producer, owner) in &tracks {
            assert_eq!(owner, "alice");
            let (kind, _, msid, dir) = sections
                .iter()
                .find(|s| &s.1 == mid)
                .unwrap_or_else(|| panic!("no mid {mid} in offer"));
            assert_eq!(kind, if *producer == video { "video" } else { "audio" });
            assert_eq!(msid.as_deref(), Some(producer.to_string().as_str()));
            assert_eq!(dir, "sendonly");
        }
    }

    let (v, a) = net.stream(alice, 100, 50, "main");
    for sub in [bob, carol] {
        assert_received_all(&net, sub, video, "main", &v, PUB_VIDEO_SSRC);
        assert_received_all(&net, sub, audio, "main", &a, PUB_AUDIO_SSRC);
    }
    let (bob_v, carol_v) = (
        net.clients[bob].received(video, "main")[0].ssrc,
        net.clients[carol].received(video, "main")[0].ssrc,
    );
    assert_ne!(bob_v, carol_v, "each subscriber leg has its own SSRC");
    assert_eq!(net.sfu.stats().forward_errors, 0);
    assert_eq!(
        (
            net.sfu.stats().fast_path_connections,
            net.sfu.stats().rtc_path_connections
        ),
        (2, 0),
        "both subscribers' media is protected by the SFU itself"
    );
}

/// What rtc's send-side interceptors did for forwarded media, the SFU now does itself: a lost
/// packet is resent on the subscriber's NACK, TWCC feedback yields a bandwidth estimate, and
/// sender reports reach the subscriber. The same holds when media goes through rtc's pipeline.
fn send_side_features(fast_path: bool) {
    let mut net = Net::new();
    net.sfu.set_fast_path(fast_path);
    let (bob, alice, video, audio) = net.bob_watches_alice();
    let (v0, _) = net.stream(alice, 20, 20, "warm");

    let (_, bob_ssrc) = net.clients[bob].receivers[&video.to_string()];
    net.lose = Some((net.clients[bob].addr, bob_ssrc, 5));
    let (v, a) = net.stream(alice, 100, 50, "main");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.lose.unwrap().2, 0, "five video packets were lost");

    assert_received_each(&net, bob, video, "main", &v, "every lost packet was resent");
    assert_received_all(&net, bob, audio, "main", &a, PUB_AUDIO_SSRC);
    let stats = net.sfu.stats();
    assert!(stats.retransmitted >= 5, "{stats:?}");
    assert_eq!(stats.forward_errors, 0);
    let (fast, slow) = (stats.fast_path_connections, stats.rtc_path_connections);
    assert_eq!((fast, slow), if fast_path { (1, 0) } else { (0, 1) });

    let bob_peer = net.clients[bob].peer;
    assert!(
        net.sfu.send_estimate(bob_peer).is_some(),
        "TWCC feedback reached the estimator"
    );
    let sent = net.clients[bob]
        .srs
        .iter()
        .filter(|(ssrc, _)| *ssrc == bob_ssrc)
        .map(|(_, n)| *n as usize)
        .max()
        .expect("the subscriber got sender reports for the video");
    // The warm-up, the main stream and the first packets that made the producer known.
    assert!(sent >= v0.len() + v.len(), "{sent}");
}

#[test]
fn nack_twcc_and_sender_reports_on_the_fast_path() {
    send_side_features(true);
}

#[test]
fn nack_twcc_and_sender_reports_through_rtc() {
    send_side_features(false);
}

#[test]
fn late_subscriber_gets_existing_producers() {
    let mut net = Net::new();
    let room = Net::room();
    let alice = net.publisher(&room, "alice");
    let (video, audio) = net.start_publishing(alice);
    // Alice keeps sending while nobody listens.
    net.stream(alice, 20, 20, "early");

    let bob = net.subscriber(&room, "bob");
    let first = net.clients[bob]
        .offers
        .first()
        .expect("bob got an offer")
        .0
        .clone();
    let mut offered: Vec<ProducerId> = first.iter().map(|t| t.1).collect();
    offered.sort();
    assert_eq!(
        offered,
        {
            let mut v = vec![video, audio];
            v.sort();
            v
        },
        "first offer lists the existing producers"
    );
    net.wait_subscribed(bob, &[video, audio]);

    let (v, a) = net.stream(alice, 60, 30, "late");
    assert_received_all(&net, bob, video, "late", &v, PUB_VIDEO_SSRC);
    assert_received_all(&net, bob, audio, "late", &a, PUB_AUDIO_SSRC);
    assert!(
        net.clients[bob].received(video, "early").is_empty(),
        "packets from before bob joined are not replayed"
    );
}

#[test]
fn subscriber_pli_reaches_publisher_throttled() {
    let mut net = Net::new();
    let room = Net::room();
    let alice = net.publisher(&room, "alice");
    let bob = net.subscriber(&room, "bob");
    let (video, audio) = net.start_publishing(alice);
    net.wait_subscribed(bob, &[video, audio]);
    net.stream(alice, 10, 10, "warmup");
    // Let the keyframe request the SFU sends for a new subscriber age out of the throttle window.
    net.run_for(PLI_INTERVAL + Duration::from_millis(100));
    net.clients[alice].plis.clear();

    let pli = |net: &mut Net| {
        let now = net.now;
        let (receiver, ssrc) = net.clients[bob].receivers[&video.to_string()];
        let mut r = net.clients[bob].pc.rtp_receiver(receiver).unwrap();
        r.write_rtcp(
            now,
            vec![Box::new(PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: ssrc,
            })],
        )
        .unwrap();
    };
    let t0 = net.now;
    pli(&mut net);
    net.run_for(PLI_INTERVAL / 2);
    pli(&mut net);
    net.run_for(PLI_INTERVAL / 2 - Duration::from_millis(10));
    let plis = net.clients[alice].plis.clone();
    assert_eq!(
        plis.len(),
        1,
        "two PLIs within the interval reach the publisher once at first: {plis:?}"
    );
    assert_eq!(
        plis[0].1, PUB_VIDEO_SSRC,
        "the PLI names the publisher's own SSRC"
    );
    assert!(
        plis[0].0 - t0 < Duration::from_millis(20),
        "the first PLI is relayed at once"
    );

    // Video that is not a keyframe does not answer the deferred request.
    net.send(alice, MediaKind::Video, "delta");
    net.run_until("the end of the interval", Duration::from_secs(1), |n| {
        n.now >= t0 + PLI_INTERVAL + Duration::from_millis(50)
    });
    let plis = net.clients[alice].plis.clone();
    assert_eq!(
        plis.len(),
        2,
        "the request made inside the interval is sent once, when it ends: {plis:?}"
    );
    assert!(
        plis[1].0 - t0 >= PLI_INTERVAL && plis[1].0 - t0 < PLI_INTERVAL + Duration::from_millis(30),
        "deferred to the end of the interval: {:?}",
        plis[1].0 - t0
    );

    net.run_until("well after the interval", Duration::from_secs(1), |n| {
        n.now >= t0 + PLI_INTERVAL * 3
    });
    assert_eq!(net.clients[alice].plis.len(), 2, "nothing more was asked");
    pli(&mut net);
    net.run_for(Duration::from_millis(50));
    let plis = &net.clients[alice].plis;
    assert_eq!(
        plis.len(),
        3,
        "a PLI after the interval is relayed again: {plis:?}"
    );
    assert_eq!(plis[2].1, PUB_VIDEO_SSRC);
}

#[test]
fn participant_never_receives_own_tracks() {
    let mut net = Net::new();
    let room = Net::room();
    let alice_sub = net.subscriber(&room, "alice");
    let bob = net.subscriber(&room, "bob");
    let alice = net.publisher(&room, "alice");
    let (video, audio) = net.start_publishing(alice);
    net.wait_subscribed(bob, &[video, audio]);
    let (v, _) = net.stream(alice, 30, 10, "main");
    assert_received_all(&net, bob, video, "main", &v, PUB_VIDEO_SSRC);

    // A second subscriber of alice's that joins later gets nothing either.
    let alice_sub2 = net.subscriber(&room, "alice");
    net.stream(alice, 30, 10, "more");
    for s in [alice_sub, alice_sub2] {
        let c = &net.clients[s];
        assert!(
            c.offers.iter().all(|(t, _)| t.is_empty()),
            "alice was offered her own tracks: {:?}",
            c.offers
        );
        assert!(
            c.rtp.is_empty(),
            "alice received {} of her own packets",
            c.rtp.len()
        );
        assert!(
            c.offers
                .iter()
                .all(|(_, sdp)| !sdp.contains(&video.to_string())
                    && !sdp.contains(&audio.to_string()))
        );
    }
}

#[test]
fn garbage_is_dropped_and_session_survives() {
    let mut net = Net::new();
    let room = Net::room();
    let alice = net.publisher(&room, "alice");
    let bob = net.subscriber(&room, "bob");
    let (video, audio) = net.start_publishing(alice);
    net.wait_subscribed(bob, &[video, audio]);
    net.stream(alice, 10, 10, "before");

    let stranger: SocketAddr = "10.9.8.7:1234".parse().unwrap();
    let now = net.now;
    let mut dropped = net.sfu.stats().dropped_unknown;
    let mut feed = |net: &mut Net, what: &str, data: &[u8]| {
        net.sfu.handle_datagram(now, stranger, data);
        dropped += 1;
        assert_eq!(
            net.sfu.stats().dropped_unknown,
            dropped,
            "{what} not counted as dropped"
        );
    };

    // Random bytes (a fixed xorshift sequence, including every first-byte class).
    let mut x: u32 = 0x9E37_79B9;
    for len in [1usize, 7, 20, 64, 200, 1400] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        feed(&mut net, "random bytes", &bytes);
    }
    feed(&mut net, "empty datagram", &[]);
    // A STUN header cut short: type, length, cookie, half a transaction id.
    feed(
        &mut net,
        "truncated STUN",
        &[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4],
    );
    // A STUN header that claims attributes it does not carry.
    feed(
        &mut net,
        "STUN with a lying length",
        &[
            0x00, 0x01, 0x00, 0x40, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ],
    );
    // A well-formed binding request for a ufrag nobody has.
    let mut m = rtc::stun::message::Message::new();
    m.build(&[
        Box::new(rtc::stun::message::BINDING_REQUEST),
        Box::new(rtc::stun::message::TransactionId::new()),
        Box::new(rtc::stun::textattrs::Username::new(
            rtc::stun::attributes::ATTR_USERNAME,
            "nosuchufrag:client".into(),
        )),
    ])
    .unwrap();
    feed(&mut net, "binding request with unknown ufrag", &m.raw);
    // Plausible RTP (v2, PT 96) and RTCP from an address no peer uses.
    let mut rtp = vec![0x80, 96, 0x12, 0x34, 0, 0, 0x10, 0, 0x11, 0x11, 0x00, 0x01];
    rtp.extend_from_slice(&[0xAB; 100]);
    feed(&mut net, "RTP from unknown address", &rtp);
    feed(
        &mut net,
        "RTCP from unknown address",
        &[0x81, 201, 0, 1, 0x11, 0x11, 0x00, 0x01],
    );
    assert_eq!(
        net.sfu.peer_count(),
        2,
        "garbage created or removed no peer"
    );

    let (v, a) = net.stream(alice, 40, 20, "after");
    assert_received_all(&net, bob, video, "after", &v, PUB_VIDEO_SSRC);
    assert_received_all(&net, bob, audio, "after", &a, PUB_AUDIO_SSRC);
}

#[test]
fn closing_publisher_removes_its_tracks_from_subscribers() {
    let mut net = Net::new();
    let room = Net::room();
    let alice = net.publisher(&room, "alice");
    let bob = net.subscriber(&room, "bob");
    let carol = net.subscriber(&room, "carol");
    let (video, audio) = net.start_publishing(alice);
    net.wait_subscribed(bob, &[video, audio]);
    net.wait_subscribed(carol, &[video, audio]);
    net.stream(alice, 10, 10, "before");
    let offers_before = [
        net.clients[bob].offers.len(),
        net.clients[carol].offers.len(),
    ];
    let events_before = net.events.len();

    let peer = net.clients[alice].peer;
    net.sfu.close_peer(net.now, peer);
    net.clients[alice].offline = true;
    net.run_for(Duration::from_millis(200));

    let mut removed: Vec<ProducerId> = net.events[events_before..]
        .iter()
        .filter_map(|e| match e {
            SfuEvent::ProducerRemoved {
                producer,
                owner,
                router,
            } => {
                assert_eq!((owner.as_str(), router), ("alice", &room));
                Some(*producer)
            }
            _ => None,
        })
        .collect();
    removed.sort();
    assert_eq!(
        removed,
        {
            let mut v = vec![video, audio];
            v.sort();
            v
        },
        "one ProducerRemoved per producer"
    );
    assert_eq!(net.sfu.producer_count(), 0);
    assert_eq!(net.sfu.peer_count(), 2);

    for (sub, before) in [bob, carol].into_iter().zip(offers_before) {
        let c = &net.clients[sub];
        assert!(c.offers.len() > before, "subscriber {sub} got no new offer");
        let (tracks, sdp) = c.offers.last().unwrap();
        assert!(tracks.is_empty(), "the new offer still lists {tracks:?}");
        assert!(
            sdp_sections(sdp)
                .iter()
                .all(|s| s.3 != "sendonly" && s.3 != "sendrecv"),
            "the new offer still sends media: {:?}",
            sdp_sections(sdp)
        );
    }
}

#[test]
fn vanished_subscriber_does_not_stall_others() {
    let mut net = Net::new();
    let room = Net::room();
    let alice = net.publisher(&room, "alice");
    let bob = net.subscriber(&room, "bob");
    let carol = net.subscriber(&room, "carol");
    let (video, audio) = net.start_publishing(alice);
    net.wait_subscribed(bob, &[video, audio]);
    net.wait_subscribed(carol, &[video, audio]);

    net.clients[carol].offline = true;
    let carol_before = net.clients[carol].rtp.len();
    // A burst, while the SFU's state towards carol (send buffers, SRTP, NACK history) fills up.
    let (v, a) = net.stream(alice, 600, 300, "main");
    // Then a steady stream until the SFU gives up on carol (ICE failure, about 30 s), and on.
    let carol_peer = net.clients[carol].peer;
    let mut tail = Vec::new();
    let mut after_failure = 0;
    while after_failure < 50 {
        tail.push(net.send(alice, MediaKind::Video, "tail"));
        net.run_for(Duration::from_millis(40));
        assert!(
            tail.len() < 1200,
            "the SFU never reported carol as disconnected"
        );
        if net
            .events
            .contains(&SfuEvent::Disconnected { peer: carol_peer })
        {
            after_failure += 1;
        }
    }
    assert_received_all(&net, bob, video, "main", &v, PUB_VIDEO_SSRC);
    assert_received_all(&net, bob, audio, "main", &a, PUB_AUDIO_SSRC);
    assert_received_all(&net, bob, video, "tail", &tail, PUB_VIDEO_SSRC);
    let bob_peer = net.clients[bob].peer;
    assert!(
        !net.events
            .contains(&SfuEvent::Disconnected { peer: bob_peer })
    );
    assert_eq!(net.clients[carol].rtp.len(), carol_before, "carol is gone");
    assert!(
        net.discarded > 0,
        "the network discarded what the SFU sent carol"
    );
}

/// The publisher's leg: the SFU asks again for what it lost (NACK) and tells the publisher's
/// bandwidth estimator what arrived when (TWCC feedback); the subscribers get every packet.
/// The same whether the SFU opens the publisher's media itself or rtc does.
fn publisher_leg(fast_path: bool) {
    let mut net = Net::new();
    net.sfu.set_fast_path(fast_path);
    let (bob, alice, video, audio) = net.bob_watches_alice();
    net.stream(alice, 20, 20, "warm");

    let sfu_addr = net.sfu_addr;
    net.lose = Some((sfu_addr, PUB_VIDEO_SSRC, 3));
    let (v, a) = net.stream(alice, 60, 60, "main");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.lose.unwrap().2, 0, "three publisher packets were lost");
    let pub_client = &net.clients[alice];
    assert!(
        pub_client.nacked.len() >= 3,
        "the SFU asked for the lost packets: {:?}",
        pub_client.nacked
    );
    assert!(pub_client.twcc_feedback > 0, "no transport-wide feedback");
    assert_received_each(
        &net,
        bob,
        video,
        "main",
        &v,
        "the publisher's repairs reached the subscriber",
    );
    assert_received_all(&net, bob, audio, "main", &a, PUB_AUDIO_SSRC);
    let stats = net.sfu.stats();
    assert_eq!(
        stats.receive_fast_path_connections,
        u64::from(fast_path),
        "{stats:?}"
    );
    assert_eq!(stats.rejected_srtp, 0);
}

#[test]
fn publisher_gets_nacks_and_transport_feedback() {
    publisher_leg(true);
}

#[test]
fn publisher_gets_nacks_and_transport_feedback_through_rtc() {
    publisher_leg(false);
}

/// A publisher's packet replayed, altered on the way, or forged (junk from its address) is
/// refused: subscribers get each packet once, nothing the publisher did not send, and the
/// session goes on.
#[test]
fn replayed_and_altered_publisher_packets_are_refused() {
    let mut net = Net::new();
    let (bob, alice, _, audio) = net.bob_watches_alice();
    net.stream(alice, 0, 10, "warm");

    net.tap = Some((net.sfu_addr, PUB_AUDIO_SSRC, Vec::new()));
    let (_, a) = net.stream(alice, 0, 20, "main");
    let copies = net.tap.take().unwrap().2;
    assert_eq!(copies.len(), 20);
    let from = net.clients[alice].addr;
    let now = net.now;
    for d in &copies {
        net.sfu.handle_datagram(now, from, d);
        let mut altered = d.clone();
        let last = altered.len() - 20;
        altered[last] ^= 1;
        net.sfu.handle_datagram(now, from, &altered);
    }
    net.run_for(Duration::from_millis(200));
    assert_eq!(net.sfu.stats().rejected_srtp, 40);
    assert_received_all(&net, bob, audio, "main", &a, PUB_AUDIO_SSRC);

    // Junk that looks like RTP, from the publisher's own address: headers with and without
    // extensions (some lying about their length), padding flags, the known SSRC or others.
    let mut x: u32 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for i in 0..300 {
        let len = 12 + (next() % 300) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        d[0] = 0x80 | (next() as u8 & 0x3f);
        d[1] = 96 + (next() % 16) as u8;
        if i % 2 == 0 {
            d[8..12].copy_from_slice(&PUB_AUDIO_SSRC.to_be_bytes());
        }
        net.sfu.handle_datagram(now, from, &d);
    }
    assert!(
        net.sfu.stats().rejected_srtp > 40,
        "forged packets of a known stream refused"
    );
    // The session goes on.
    let (_, a) = net.stream(alice, 0, 10, "after");
    assert_received_all(&net, bob, audio, "after", &a, PUB_AUDIO_SSRC);
}

/// A datagram from the publisher's address that no key opens, sent where rtc reads it (an
/// SSRC the fast path does not know), leaves the transport-wide feedback alone: counted, its
/// forged sequence number far ahead would make the publisher's real packets look late, and
/// they would get no feedback at all (its estimate would starve).
#[test]
fn forged_transport_numbers_do_not_skew_the_feedback() {
    use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};
    let mut net = Net::new();
    let (_, alice, _, _) = net.bob_watches_alice();
    net.tap = Some((net.sfu_addr, PUB_AUDIO_SSRC, Vec::new()));
    net.stream(alice, 0, 10, "warm");
    let copy = net.tap.take().unwrap().2.pop().unwrap();
    let id = twcc_extension_id(&net.clients[alice].pc);
    let mut header = rtc::rtp::header::Header::unmarshal(&mut &copy[..]).unwrap();
    let body = copy[header.marshal_size()..].to_vec();
    let seq = header.get_extension(id).expect("a transport-wide number");
    let ahead = u16::from_be_bytes([seq[0], seq[1]]).wrapping_add(20_000);
    header
        .set_extension(id, Bytes::copy_from_slice(&ahead.to_be_bytes()))
        .unwrap();
    header.ssrc = 0x0bad_cafe;
    let mut forged = header.marshal().unwrap().to_vec();
    forged.extend_from_slice(&body);
    let from = net.clients[alice].addr;
    net.sfu.handle_datagram(net.now, from, &forged);

    net.clients[alice].twcc_feedback = 0;
    net.stream(alice, 0, 50, "after");
    let feedback = net.clients[alice].twcc_feedback;
    assert!(
        feedback >= 3,
        "{feedback} feedback packets after the forgery"
    );
}

/// The id the client's own description gives the transport-wide sequence number.
fn twcc_extension_id(pc: &RTCPeerConnection) -> u8 {
    let sdp = &pc.local_description().expect("described").sdp;
    sdp.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("a=extmap:")?;
            let (id, uri) = rest.split_once(' ')?;
            (uri.trim() == rtc::sdp::extmap::TRANSPORT_CC_URI).then(|| id.parse().ok())?
        })
        .expect("transport-wide congestion control negotiated")
}
