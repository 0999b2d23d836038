//! The sans-IO SFU: peers (one server-side peer connection each), producers (tracks a publisher
//! sends), consumers (a producer forwarded to one subscriber), grouped by router (a room).
//!
//! Input: datagrams, commands and the time. Output: datagrams to send ([`Sfu::poll_transmit`]),
//! events for signaling ([`Sfu::poll_event`]) and the next deadline ([`Sfu::poll_timeout`]).
//! Each router auto-subscribes its subscriber peers to every producer of other participants.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{
    RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverId,
    RTCRtpTransceiverInit,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

use crate::RouterId;
use crate::engine;
use crate::fastpath::{self, Kept, Outbound, Rollover, Seal, Sealer, SendStats, SentRing};
use crate::forwarder::{self, Forwarder, Layer, LayerState, Verdict};
use crate::inbound::{self, Inbound, Open};

/// Keyframe requests for one layer are sent at most this often; one asked for sooner is sent
/// when the interval ends (a viewer who connects just after a keyframe waits at most this long,
/// not until the encoder's next periodic one). Shorter means faster joins but more keyframes
/// (big, so a quality dip for everyone) while many viewers join at once.
pub const PLI_INTERVAL: Duration = Duration::from_millis(100);
/// How often layer bitrates are measured and layers reassigned.
pub const TICK: Duration = Duration::from_millis(500);
/// A layer with no packet for this long is treated as off (paused or dropped by the publisher).
pub const LAYER_IDLE: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProducerId(pub u64);

impl fmt::Display for ProducerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TR_{}", self.0)
    }
}

impl ProducerId {
    pub fn parse(s: &str) -> Option<ProducerId> {
        s.strip_prefix("TR_")?.parse().ok().map(ProducerId)
    }
}

/// Which way media flows on a peer connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The client sends (and offers); the server answers.
    Publish,
    /// The server sends (and offers); the client answers.
    Subscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Audio,
    Video,
}

#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("no such peer")]
    NoPeer,
    #[error("that peer does not {0}")]
    WrongDirection(&'static str),
    #[error("invalid SDP: {0}")]
    BadSdp(String),
    #[error("media engine: {0}")]
    Engine(String),
}

impl From<engine::EngineError> for SfuError {
    fn from(e: engine::EngineError) -> Self {
        SfuError::Engine(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SfuEvent {
    /// A publisher's track started to arrive.
    ProducerAdded {
        router: RouterId,
        peer: PeerId,
        owner: String,
        producer: ProducerId,
        kind: MediaKind,
        mid: Option<String>,
    },
    ProducerRemoved {
        router: RouterId,
        owner: String,
        producer: ProducerId,
    },
    /// Send this offer to the subscriber; `tracks` maps each mid to the producer it carries.
    SubscriberOffer {
        peer: PeerId,
        sdp: String,
        tracks: Vec<(String, ProducerId, String)>,
    },
    Connected {
        peer: PeerId,
    },
    /// ICE or DTLS failed or the connection closed.
    Disconnected {
        peer: PeerId,
    },
    /// Tell the publisher which simulcast layers to encode (index = layer).
    PublisherLayers {
        peer: PeerId,
        producer: ProducerId,
        active: Vec<bool>,
    },
    /// Who is speaking in a router now, loudest first (sent when it changes).
    ActiveSpeakers {
        router: RouterId,
        speakers: Vec<String>,
    },
}

/// A datagram to send from the shared socket.
#[derive(Debug)]
pub struct Transmit {
    pub to: SocketAddr,
    /// Goes out on the ICE-TCP connection from `to` rather than the UDP socket.
    pub tcp: bool,
    pub data: Bytes,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SfuStats {
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    pub rtp_in: u64,
    pub rtp_forwarded: u64,
    pub dropped_unknown: u64,
    pub forward_errors: u64,
    pub plis: u64,
    pub layer_switches: u64,
    /// Packets subscribers asked again for (NACK), and how many of them were resent from the
    /// send history.
    pub nacks_received: u64,
    pub retransmitted: u64,
    /// Subscriber connections whose media the SFU protects itself, and those that fell back to
    /// rtc's send pipeline.
    pub fast_path_connections: u64,
    pub rtc_path_connections: u64,
    /// Publisher connections whose media the SFU opens itself.
    pub receive_fast_path_connections: u64,
    /// Publisher packets refused: failed authentication, replays.
    pub rejected_srtp: u64,
}

struct Consumer {
    sender: RTCRtpSenderId,
    transceiver: RTCRtpTransceiverId,
    /// Known once the subscriber has answered.
    ssrc_pt: Option<(u32, u8)>,
    mime: String,
    /// Video only: which simulcast layer this subscriber gets, and the rewriting that hides
    /// switches. Audio passes through unchanged.
    forwarder: Option<Forwarder>,
    /// The highest layer the subscriber asked for (from the size it displays).
    cap: Layer,
    clock_rate: u32,
    /// Video: what was sent lately, to answer NACKs; the RTX stream (SSRC, payload type) once
    /// negotiated, and its next sequence number.
    sent: Option<SentRing>,
    rtx: Option<(u32, u8)>,
    rtx_seq: u16,
    /// SRTP rollover counters of the stream and its RTX stream.
    roc: Rollover,
    rtx_roc: Rollover,
    /// For sender reports.
    send_stats: SendStats,
}

struct Peer {
    router: RouterId,
    owner: String,
    direction: Direction,
    pc: RTCPeerConnection,
    ufrag: String,
    // Publish side: engine track id → producer.
    producers: HashMap<String, ProducerId>,
    // Subscribe side.
    consumers: HashMap<ProducerId, Consumer>,
    sender_tracks: HashMap<String, ProducerId>,
    awaiting_answer: bool,
    needs_offer: bool,
    connected: bool,
    /// What the subscriber's browser says it can receive (REMB), if it says so.
    remb_bps: Option<u64>,
    /// Our send-side estimate from its transport-wide feedback (TWCC).
    twcc: engine::EstimateHandle,
    /// The engine's next deadline as last read, and whether it must be read again (anything
    /// but forwarding touched the connection).
    timer: Option<Instant>,
    dirty: bool,
    /// Subscribers: the send side (protection, TWCC, reports) the SFU runs itself.
    out: Option<Outbound>,
    /// Publishers: the receive side (opening, NACKs, TWCC feedback, reports).
    inb: Option<Inbound>,
}

/// One simulcast layer (or the only stream) of a producer.
struct ProducerLayer {
    ssrc: u32,
    bytes: u64,
    bitrate_bps: u64,
    last_packet: Option<Instant>,
    last_pli: Option<Instant>,
    /// A keyframe was asked for inside the throttle interval: send it when the interval ends.
    pli_pending: bool,
    /// We asked the publisher to stop sending this layer.
    paused: bool,
}

struct Producer {
    router: RouterId,
    peer: PeerId,
    owner: String,
    receiver: RTCRtpReceiverId,
    /// Indexed by layer: 0 is the smallest picture. A plain track has one.
    layers: Vec<Option<ProducerLayer>>,
    kind: MediaKind,
    codec: RTCRtpCodec,
    consumers: Vec<PeerId>,
    /// Audio: the negotiated id of the audio-level extension, and the levels seen since the
    /// last tick (in -dBov: 0 is loudest, 127 silence).
    audio_level_id: Option<u8>,
    level_sum: u32,
    level_count: u32,
    loud_count: u32,
}

impl Producer {
    fn layer_of(&self, ssrc: u32) -> Option<Layer> {
        self.layers
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.ssrc == ssrc))
            .map(|i| i as Layer)
    }

    fn layer_states(&self, now: Instant) -> [LayerState; 3] {
        let mut out = [LayerState {
            active: false,
            bitrate_bps: 0,
        }; 3];
        for (i, l) in self.layers.iter().enumerate().take(3) {
            if let Some(l) = l {
                // A layer we paused is still there for the asking.
                out[i] = LayerState {
                    active: l.paused
                        || l.last_packet
                            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_IDLE),
                    bitrate_bps: l.bitrate_bps,
                };
            }
        }
        out
    }

    fn is_keyframe_start(&self, payload: &[u8]) -> bool {
        let mime = self.codec.mime_type.to_ascii_lowercase();
        match mime.as_str() {
            "video/vp8" => forwarder::vp8_keyframe_start(payload),
            "video/h264" => forwarder::h264_keyframe_start(payload),
            _ => false,
        }
    }
}

impl ProducerLayer {
    fn new(ssrc: u32) -> ProducerLayer {
        ProducerLayer {
            ssrc,
            bytes: 0,
            bitrate_bps: 0,
            last_packet: None,
            last_pli: None,
            pli_pending: false,
            paused: false,
        }
    }
}

/// The simulcast layer a RID names (Chrome's and LiveKit's conventions).
fn layer_of_rid(rid: Option<&str>) -> Layer {
    match rid {
        Some("h" | "m" | "mid" | "1") => 1,
        Some("f" | "high" | "2") => 2,
        _ => 0,
    }
}

pub struct SfuConfig {
    /// The address put in every candidate: the shared socket as clients reach it.
    pub advertised: SocketAddr,
    /// The ICE-TCP listener as clients reach it (a passive TCP candidate), when there is one.
    pub advertised_tcp: Option<SocketAddr>,
}

pub struct Sfu {
    advertised: SocketAddr,
    cert: RTCCertificate,
    next_id: u64,
    peers: HashMap<PeerId, Peer>,
    by_ufrag: HashMap<String, PeerId>,
    /// (over TCP?, remote address) → peer.
    by_addr: HashMap<(bool, SocketAddr), PeerId>,
    advertised_tcp: Option<SocketAddr>,
    producers: HashMap<ProducerId, Producer>,
    routers: HashMap<RouterId, Vec<PeerId>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SfuEvent>,
    stats: SfuStats,
    next_tick: Option<Instant>,
    speakers: HashMap<RouterId, Vec<String>>,
    rx: BytesMut,
    /// Every connection's next engine deadline, soonest first: reading them all on every turn
    /// would cost O(peers) per datagram.
    timers: BTreeSet<(Instant, PeerId)>,
    /// Connections whose deadline must be read again before the next wait.
    dirty: Vec<PeerId>,
    /// When the earliest deferred keyframe request is due.
    next_pli: Option<Instant>,
    /// When publishers are next sent transport-wide feedback and NACKs.
    next_feedback: Option<Instant>,
    /// Where each forwarded packet is marshalled before it is protected.
    bufs: SendBufs,
    /// Protect forwarded media with the connection's own key (else through rtc's pipeline).
    fast_path: bool,
}

/// Where forwarded packets are built: the send arena they are protected in place in, and a
/// scratch buffer for profiles that rtc's context protects.
struct SendBufs {
    scratch: Vec<u8>,
    tx: BytesMut,
}

/// Size of each chunk of the send arena: one allocation serves dozens of datagrams.
const TX_ARENA: usize = 64 * 1024;

/// Size of the receive arena that incoming datagrams are copied into.
const RX_ARENA: usize = 64 * 1024;

/// Audio level (in -dBov) below which a packet counts as loud.
pub const SPEAKING_LEVEL: u32 = 50;

impl Sfu {
    pub fn new(config: SfuConfig) -> Result<Sfu, SfuError> {
        Ok(Sfu {
            advertised: config.advertised,
            cert: engine::certificate().map_err(SfuError::Engine)?,
            next_id: 1,
            peers: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            advertised_tcp: config.advertised_tcp,
            producers: HashMap::new(),
            routers: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: SfuStats::default(),
            next_tick: None,
            speakers: HashMap::new(),
            rx: BytesMut::with_capacity(RX_ARENA),
            timers: BTreeSet::new(),
            dirty: Vec::new(),
            next_pli: None,
            next_feedback: None,
            bufs: SendBufs {
                scratch: Vec::with_capacity(1500),
                tx: BytesMut::with_capacity(TX_ARENA),
            },
            fast_path: true,
        })
    }

    /// Whether new subscriber connections may protect their media in the SFU (the default),
    /// rather than through rtc's send pipeline. For comparisons; both are correct.
    pub fn set_fast_path(&mut self, on: bool) {
        self.fast_path = on;
    }

    pub fn stats(&self) -> SfuStats {
        self.stats
    }

    pub fn advertised(&self) -> SocketAddr {
        self.advertised
    }

    /// The send-side bandwidth estimate towards a subscriber, once its TWCC feedback came in.
    pub fn send_estimate(&self, peer: PeerId) -> Option<u64> {
        self.peers.get(&peer)?.twcc.bps()
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A new server-side connection for `owner` in `router`. Subscribe peers get an offer (as an
    /// event) for every producer already in the router.
    pub fn create_peer(
        &mut self,
        now: Instant,
        router: &RouterId,
        owner: &str,
        direction: Direction,
    ) -> Result<PeerId, SfuError> {
        let id = PeerId(self.id());
        let ufrag = hex::encode(rand::random::<[u8; 8]>());
        let pwd = hex::encode(rand::random::<[u8; 16]>());
        let engine::ServerConnection {
            pc,
            estimate: twcc,
            outbound,
            mut inbound,
        } = engine::server_peer_connection(
            now,
            &ufrag,
            &pwd,
            self.advertised,
            self.advertised_tcp,
            &self.cert,
            direction == Direction::Publish,
        )?;
        if let Some(inb) = inbound.as_mut().filter(|_| !self.fast_path) {
            inb.open = Open::Rtc;
        }
        self.by_ufrag.insert(ufrag.clone(), id);
        self.peers.insert(
            id,
            Peer {
                router: router.clone(),
                owner: owner.to_string(),
                direction,
                pc,
                ufrag,
                producers: HashMap::new(),
                consumers: HashMap::new(),
                sender_tracks: HashMap::new(),
                awaiting_answer: false,
                needs_offer: false,
                connected: false,
                remb_bps: None,
                twcc,
                timer: None,
                dirty: false,
                out: outbound,
                inb: inbound,
            },
        );
        self.mark(id);
        self.routers.entry(router.clone()).or_default().push(id);
        if direction == Direction::Subscribe {
            let existing: Vec<ProducerId> = self
                .producers
                .iter()
                .filter(|(_, p)| &p.router == router && p.owner != owner)
                .map(|(id, _)| *id)
                .collect();
            for producer in existing {
                self.add_consumer(producer, id)?;
            }
            self.offer(now, id)?;
        }
        Ok(id)
    }

    /// Applies a publisher's offer and returns the answer.
    pub fn publisher_offer(
        &mut self,
        now: Instant,
        peer: PeerId,
        sdp: String,
    ) -> Result<String, SfuError> {
        let p = self.peers.get_mut(&peer).ok_or(SfuError::NoPeer)?;
        if p.direction != Direction::Publish {
            return Err(SfuError::WrongDirection("publish"));
        }
        let offer =
            RTCSessionDescription::offer(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        p.pc.set_remote_description(now, offer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let answer = p.pc.create_answer(None)?;
        p.pc.set_local_description(now, answer.clone())?;
        self.drain(now, peer);
        Ok(with_opus_dtx(&answer.sdp))
    }

    /// Applies a subscriber's answer to our last offer.
    pub fn subscriber_answer(
        &mut self,
        now: Instant,
        peer: PeerId,
        sdp: String,
    ) -> Result<(), SfuError> {
        let p = self.peers.get_mut(&peer).ok_or(SfuError::NoPeer)?;
        if p.direction != Direction::Subscribe {
            return Err(SfuError::WrongDirection("subscribe"));
        }
        let answer =
            RTCSessionDescription::answer(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        p.pc.set_remote_description(now, answer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        p.awaiting_answer = false;
        for c in p.consumers.values_mut() {
            c.ssrc_pt = sender_ssrc_pt(&mut p.pc, c.sender, &c.mime);
            c.rtx = c
                .ssrc_pt
                .and_then(|(_, pt)| sender_rtx(&mut p.pc, c.sender, pt));
        }
        if let Some(out) = p.out.as_mut() {
            // One transport-wide sequence for the bundle: every m-section has the same id.
            out.cc.ext_id = p
                .consumers
                .values()
                .find_map(|c| twcc_ext_id(&mut p.pc, c.sender));
        }
        let again = std::mem::take(&mut p.needs_offer);
        if again {
            self.offer(now, peer)?;
        }
        self.allocate(now, peer);
        self.drain(now, peer);
        Ok(())
    }

    /// Removes a peer, its producers (and their consumers elsewhere) and its consumers.
    pub fn close_peer(&mut self, now: Instant, peer: PeerId) {
        let Some(mut p) = self.peers.remove(&peer) else {
            return;
        };
        if let Some(t) = p.timer {
            self.timers.remove(&(t, peer));
        }
        self.by_ufrag.remove(&p.ufrag);
        self.by_addr.retain(|_, id| *id != peer);
        if let Some(list) = self.routers.get_mut(&p.router) {
            list.retain(|id| *id != peer);
            if list.is_empty() {
                self.routers.remove(&p.router);
            }
        }
        let _ = p.pc.close();
        while let Some(m) = p.pc.poll_write() {
            queue_transmit(&mut self.stats, &mut self.transmits, m);
        }
        for producer in p.producers.into_values() {
            self.remove_producer(now, producer);
        }
        for producer in p.consumers.keys() {
            if let Some(pr) = self.producers.get_mut(producer) {
                pr.consumers.retain(|id| *id != peer);
            }
        }
    }

    /// Stops forwarding a producer and tells its subscribers.
    pub fn remove_producer(&mut self, now: Instant, producer: ProducerId) {
        let Some(pr) = self.producers.remove(&producer) else {
            return;
        };
        if let Some(p) = self.peers.get_mut(&pr.peer) {
            p.producers.retain(|_, id| *id != producer);
            if let Some(inb) = p.inb.as_mut() {
                inb.remove_producer(producer.0);
            }
        }
        for sub in &pr.consumers {
            let Some(p) = self.peers.get_mut(sub) else {
                continue;
            };
            if let Some(c) = p.consumers.remove(&producer) {
                p.sender_tracks.retain(|_, id| *id != producer);
                let _ = p.pc.remove_track(c.sender);
                let _ = self.offer(now, *sub);
            }
        }
        self.events.push_back(SfuEvent::ProducerRemoved {
            router: pr.router,
            owner: pr.owner,
            producer,
        });
    }

    /// Owner of a producer, for permission checks in signaling.
    pub fn producer_owner(&self, producer: ProducerId) -> Option<&str> {
        self.producers.get(&producer).map(|p| p.owner.as_str())
    }

    /// Asks the publisher of `producer` for a keyframe of `layer` (throttled per layer).
    pub fn request_keyframe(&mut self, now: Instant, producer: ProducerId, layer: Layer) {
        let Some(pr) = self.producers.get_mut(&producer) else {
            return;
        };
        if pr.kind != MediaKind::Video {
            return;
        }
        let Some(l) = pr.layers.get_mut(layer as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Some(last) = l.last_pli
            && now.saturating_duration_since(last) < PLI_INTERVAL
        {
            l.pli_pending = true;
            let due = last + PLI_INTERVAL;
            self.next_pli = Some(self.next_pli.map_or(due, |n| n.min(due)));
            return;
        }
        l.last_pli = Some(now);
        l.pli_pending = false;
        let (peer, receiver, ssrc) = (pr.peer, pr.receiver, l.ssrc);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(mut r) = p.pc.rtp_receiver(receiver) {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: ssrc,
            };
            if r.write_rtcp(now, vec![Box::new(pli)]).is_ok() {
                self.stats.plis += 1;
            }
        }
        self.drain_writes(peer);
    }

    /// The subscriber's wish for one video track: the highest layer it wants (0 = smallest).
    pub fn set_preference(&mut self, now: Instant, peer: PeerId, producer: ProducerId, cap: Layer) {
        if let Some(c) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.consumers.get_mut(&producer))
        {
            c.cap = cap.min(2);
        }
        self.allocate(now, peer);
    }

    /// Which layer each of a subscriber's video consumers should get now; asks for keyframes
    /// where a switch is pending.
    fn allocate(&mut self, now: Instant, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let videos = p
            .consumers
            .values()
            .filter(|c| c.forwarder.is_some())
            .count()
            .max(1) as u64;
        let connected = p.connected;
        // REMB is the receiver's own word; otherwise our TWCC estimate. Shared by its videos.
        let budget = p.remb_bps.or_else(|| p.twcc.bps()).map(|e| e / videos);
        let mut wanted = Vec::new();
        for (producer, c) in p.consumers.iter_mut() {
            let (Some(f), Some(pr)) = (c.forwarder.as_mut(), self.producers.get(producer)) else {
                continue;
            };
            let target = forwarder::select_layer(&pr.layer_states(now), c.cap, budget);
            if target != f.target() && f.set_target(target) {
                self.stats.layer_switches += 1;
            }
            // Keep asking (throttled) until the switch has happened.
            if let Some(t) = target
                && f.current() != Some(t)
            {
                wanted.push((*producer, t));
            }
        }
        // A keyframe for a subscriber that cannot receive yet is wasted, and it would hold back
        // the one it needs once connected (requests are throttled): that one is asked for then.
        if !connected {
            return;
        }
        for (producer, layer) in wanted {
            self.request_keyframe(now, producer, layer);
        }
    }

    /// Active speakers per router from the levels of the last tick; an event when they change.
    fn detect_speakers(&mut self) {
        let mut now_speaking: HashMap<RouterId, Vec<(u32, String)>> = HashMap::new();
        for pr in self.producers.values_mut() {
            if pr.kind != MediaKind::Audio {
                continue;
            }
            // Speech comes in bursts: someone speaks when a fair share of the window was loud.
            let (sum, loud, total) = (pr.level_sum, pr.loud_count, pr.level_count);
            (pr.level_sum, pr.loud_count, pr.level_count) = (0, 0, 0);
            let list = now_speaking.entry(pr.router.clone()).or_default();
            if total > 0 && loud * 5 >= total && !list.iter().any(|(_, o)| *o == pr.owner) {
                list.push((sum / total, pr.owner.clone()));
            }
        }
        let routers: Vec<RouterId> = now_speaking
            .keys()
            .chain(self.speakers.keys())
            .cloned()
            .collect();
        for router in routers {
            let mut list = now_speaking.remove(&router).unwrap_or_default();
            list.sort();
            let speakers: Vec<String> = list.into_iter().map(|(_, o)| o).collect();
            let before = self.speakers.get(&router).cloned().unwrap_or_default();
            if before == speakers {
                continue;
            }
            if speakers.is_empty() {
                self.speakers.remove(&router);
            } else {
                self.speakers.insert(router.clone(), speakers.clone());
            }
            self.events
                .push_back(SfuEvent::ActiveSpeakers { router, speakers });
        }
    }

    /// Measures layer bitrates and reassigns layers, every [`TICK`].
    fn tick(&mut self, now: Instant) {
        // Forwarding does not re-read deadlines; should a write ever bring one closer, it is
        // read here at the latest.
        let all: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in all {
            self.mark(id);
        }
        let secs = TICK.as_secs_f64();
        for pr in self.producers.values_mut() {
            for l in pr.layers.iter_mut().flatten() {
                // Keep the last figure of a paused layer: it is what resuming it would cost.
                if !l.paused || l.bytes > 0 {
                    l.bitrate_bps = (l.bytes as f64 * 8.0 / secs) as u64;
                }
                l.bytes = 0;
            }
        }
        self.detect_speakers();
        self.send_reports(now);
        self.send_receiver_reports(now);
        let subs: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.direction == Direction::Subscribe)
            .map(|(id, _)| *id)
            .collect();
        for sub in subs {
            self.allocate(now, sub);
        }
        self.pause_unwatched_layers();
    }

    /// Sender reports for every stream the SFU sends (receivers use them to line up audio with
    /// video, and for round-trip times), and old send history written off.
    fn send_reports(&mut self, now: Instant) {
        self.send_rtcp(now, |p| {
            let Peer { out, consumers, .. } = p;
            let Some(out) = out.as_mut() else {
                return Vec::new();
            };
            out.cc.on_tick(now);
            consumers
                .values()
                .filter_map(|c| {
                    let (ssrc, _) = c.ssrc_pt?;
                    let sr = c.send_stats.report(now, ssrc, c.clock_rate, &out.wall)?;
                    Some(Box::new(sr) as Box<dyn rtc::rtcp::Packet>)
                })
                .collect()
        });
    }

    /// What publishers are owed as receivers: transport-wide feedback (their bandwidth estimate
    /// depends on it) and NACKs for lost packets.
    fn send_feedback(&mut self, now: Instant) {
        self.send_rtcp(now, |p| {
            p.inb.as_mut().map(|i| i.feedback(now)).unwrap_or_default()
        });
    }

    fn send_receiver_reports(&mut self, now: Instant) {
        self.send_rtcp(now, |p| {
            p.inb
                .as_mut()
                .and_then(|i| i.report(now))
                .map(|rr| Box::new(rr) as Box<dyn rtc::rtcp::Packet>)
                .into_iter()
                .collect()
        });
    }

    /// Sends each connected peer the RTCP `what` makes for it (rtc protects it).
    fn send_rtcp(
        &mut self,
        now: Instant,
        mut what: impl FnMut(&mut Peer) -> Vec<Box<dyn rtc::rtcp::Packet>>,
    ) {
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            let pkts = what(p);
            if pkts.is_empty() {
                continue;
            }
            let _ = p.pc.handle_write(TaggedRTCMessage {
                now,
                message: RTCMessage::RtcpPacket(String::new(), pkts),
            });
            self.drain_writes(id);
        }
    }

    /// Asks publishers to stop encoding layers no subscriber wants (the smallest always runs, so
    /// a new viewer starts at once). Signaling relays the change to the publishing client.
    fn pause_unwatched_layers(&mut self) {
        for (id, pr) in self.producers.iter_mut() {
            if pr.kind != MediaKind::Video || pr.layers.len() < 2 {
                continue;
            }
            let mut wanted = vec![false; pr.layers.len()];
            wanted[0] = true;
            for sub in &pr.consumers {
                let Some(f) = self
                    .peers
                    .get(sub)
                    .and_then(|p| p.consumers.get(id))
                    .and_then(|c| c.forwarder.as_ref())
                else {
                    continue;
                };
                for l in [f.target(), f.current()].into_iter().flatten() {
                    if let Some(w) = wanted.get_mut(l as usize) {
                        *w = true;
                    }
                }
            }
            let mut changed = false;
            for (l, want) in pr.layers.iter_mut().zip(&wanted) {
                if let Some(l) = l
                    && l.paused == *want
                {
                    l.paused = !want;
                    changed = true;
                }
            }
            if changed {
                self.events.push_back(SfuEvent::PublisherLayers {
                    peer: pr.peer,
                    producer: *id,
                    active: wanted,
                });
            }
        }
    }

    fn add_consumer(&mut self, producer: ProducerId, sub: PeerId) -> Result<(), SfuError> {
        let Some(pr) = self.producers.get(&producer) else {
            return Ok(());
        };
        let (kind, codec, owner) = (pr.kind, pr.codec.clone(), pr.owner.clone());
        let Some(p) = self.peers.get_mut(&sub) else {
            return Ok(());
        };
        if p.consumers.contains_key(&producer) {
            return Ok(());
        }
        let ssrc: u32 = rand::random();
        let track_id = producer.to_string();
        let track = MediaStreamTrack::new(
            owner,
            track_id.clone(),
            track_id.clone(),
            match kind {
                MediaKind::Audio => RtpCodecKind::Audio,
                MediaKind::Video => RtpCodecKind::Video,
            },
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: codec.clone(),
                ..Default::default()
            }],
        );
        let init = RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Sendonly,
            ..Default::default()
        };
        let transceiver = p.pc.add_transceiver_from_track(track, Some(init))?;
        if kind == MediaKind::Video {
            // A connection's video codecs are settled by the first answer that has video: later
            // m-sections may only use those. Offer every video codec, this track's first, so that
            // a later track in another codec (the room switched between H.264 and VP8) can still
            // be sent on this connection. Where the subscriber already settled on fewer, this
            // fails and the track offers its own codec only.
            let mut prefs = engine::video_codecs();
            prefs.sort_by_key(|c| !c.rtp_codec.mime_type.eq_ignore_ascii_case(&codec.mime_type));
            if let Some(mut t) = p.pc.rtp_transceiver(transceiver) {
                let _ = t.set_codec_preferences(prefs);
            }
        }
        let sender =
            p.pc.rtp_transceiver(transceiver)
                .and_then(|t| t.sender())
                .ok_or_else(|| SfuError::Engine("new transceiver has no sender".into()))?;
        p.consumers.insert(
            producer,
            Consumer {
                sender,
                transceiver,
                ssrc_pt: None,
                forwarder: (kind == MediaKind::Video).then(|| Forwarder::new(codec.clock_rate)),
                mime: codec.mime_type,
                cap: 2,
                clock_rate: codec.clock_rate,
                sent: (kind == MediaKind::Video).then(SentRing::default),
                rtx: None,
                rtx_seq: rand::random(),
                roc: Rollover::default(),
                rtx_roc: Rollover::default(),
                send_stats: SendStats::default(),
            },
        );
        p.sender_tracks.insert(track_id, producer);
        if let Some(pr) = self.producers.get_mut(&producer) {
            pr.consumers.push(sub);
        }
        Ok(())
    }

    /// Offers the subscriber its current set of tracks, or queues the offer until it answers.
    fn offer(&mut self, now: Instant, peer: PeerId) -> Result<(), SfuError> {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        // With no m-section yet an offer carries no ICE credentials: no client can apply it (and
        // the answer to it would be rejected, leaving us awaiting it forever). Offer on the first track.
        if p.pc.get_transceivers().next().is_none() {
            return Ok(());
        }
        if p.awaiting_answer {
            p.needs_offer = true;
            return Ok(());
        }
        let offer = p.pc.create_offer(None)?;
        p.pc.set_local_description(now, offer.clone())?;
        p.awaiting_answer = true;
        let mut tracks = Vec::with_capacity(p.consumers.len());
        for (producer, c) in &p.consumers {
            if let Some(mid) =
                p.pc.rtp_transceiver(c.transceiver)
                    .and_then(|t| t.mid().clone())
            {
                let owner = self
                    .producers
                    .get(producer)
                    .map(|pr| pr.owner.clone())
                    .unwrap_or_default();
                tracks.push((mid, *producer, owner));
            }
        }
        self.events.push_back(SfuEvent::SubscriberOffer {
            peer,
            sdp: offer.sdp,
            tracks,
        });
        self.drain_writes(peer);
        Ok(())
    }

    /// One datagram from the shared socket.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.handle_input(now, from, false, data);
    }

    /// One RFC 4571 frame (its payload) from the ICE-TCP connection of `from`.
    pub fn handle_tcp_frame(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.handle_input(now, from, true, data);
    }

    fn handle_input(&mut self, now: Instant, from: SocketAddr, tcp: bool, data: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += data.len() as u64;
        let local_addr = match (tcp, self.advertised_tcp) {
            (false, _) => self.advertised,
            (true, Some(a)) => a,
            (true, None) => return,
        };
        let peer = match self.by_addr.get(&(tcp, from)) {
            Some(id) => Some(*id),
            None => engine::stun_local_ufrag(data).and_then(|u| self.by_ufrag.get(&u).copied()),
        };
        let Some(peer) = peer else {
            self.stats.dropped_unknown += 1;
            return;
        };
        // A STUN check with the right ufrag from a new address binds that address (ICE picks
        // the pair; a later check from elsewhere, as after a network change, rebinds).
        self.by_addr.entry((tcp, from)).or_insert(peer);
        if !self.peers.contains_key(&peer) {
            return;
        }
        if fastpath::is_rtp(data) && self.receive(now, peer, data) {
            return;
        }
        let message = self.take_rx(data);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let msg = TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr,
                peer_addr: from,
                ecn: None,
                transport_protocol: if tcp {
                    TransportProtocol::TCP
                } else {
                    TransportProtocol::UDP
                },
            },
            message,
        };
        // A connectivity check from somewhere other than where its media goes: the client may
        // have moved (ICE picks the new pair). Media follows rtc's own datagrams, so ask for one.
        let moved = p.out.as_ref().is_some_and(|o| {
            matches!(o.seal, Seal::Own(_)) && o.dest != Some((from, tcp)) && is_stun(data)
        });
        if p.pc.handle_read(msg).is_err() {
            self.stats.dropped_unknown += 1;
        }
        self.drain(now, peer);
        if moved {
            self.probe(now, peer);
        }
    }

    /// A publisher's RTP packet: opened and forwarded here when its stream is known and the
    /// connection's key found (true). Otherwise rtc gets it (false); its interceptor chain notes
    /// the arrival for the transport-wide feedback once rtc has opened it.
    fn receive(&mut self, now: Instant, peer: PeerId, data: &[u8]) -> bool {
        let Some(inb) = self.peers.get_mut(&peer).and_then(|p| p.inb.as_mut()) else {
            return false;
        };
        let Some(view) = inb.view(data) else {
            return false;
        };
        let pending = matches!(inb.open, Open::Pending(_));
        if !(inb.stream(view.ssrc).is_some() && inb.try_find(data)) {
            return false;
        }
        if pending {
            self.stats.receive_fast_path_connections += 1;
        }
        let mut buf = self.take_rx(data);
        let opened = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.inb.as_mut())
            .and_then(|inb| inb.open_packet(now, &mut buf, &view));
        let Some((producer, end)) = opened else {
            self.stats.rejected_srtp += 1;
            return true;
        };
        let payload = buf.freeze().slice(view.header_len..end);
        self.stats.rtp_in += 1;
        let m = Incoming {
            ssrc: view.ssrc,
            seq: view.seq,
            ts: view.ts,
            marker: view.marker,
            audio_level: view.audio_level,
            payload: &payload,
        };
        self.forward_media(now, ProducerId(producer), &m);
        true
    }

    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.rearm_dirty();
        let tick = if self.producers.is_empty() {
            None
        } else {
            self.next_tick
        };
        self.timers
            .first()
            .map(|(t, _)| *t)
            .into_iter()
            .chain(tick)
            .chain(self.next_pli)
            .chain(tick.and(self.next_feedback))
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.rearm_dirty();
        let media = !self.producers.is_empty();
        if periodic(&mut self.next_tick, now, TICK, media) {
            self.tick(now);
        }
        if periodic(
            &mut self.next_feedback,
            now,
            inbound::FEEDBACK_INTERVAL,
            media,
        ) {
            self.send_feedback(now);
        }
        if self.next_pli.is_some_and(|t| t <= now) {
            self.send_deferred_plis(now);
        }
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(p) = self.peers.get_mut(&id) {
                p.timer = None;
                let _ = p.pc.handle_timeout(now);
            }
            self.drain(now, id);
        }
    }

    /// The connection's deadline must be read again: it was touched other than by forwarding.
    fn mark(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer)
            && !p.dirty
        {
            p.dirty = true;
            self.dirty.push(peer);
        }
    }

    /// Reads again the deadlines of every connection touched since the last time.
    fn rearm_dirty(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            self.rearm(id);
        }
    }

    /// Reads one connection's deadline into the timer set.
    fn rearm(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.dirty = false;
        let t = p.pc.poll_timeout();
        if t != p.timer {
            if let Some(old) = p.timer {
                self.timers.remove(&(old, id));
            }
            if let Some(t) = t {
                self.timers.insert((t, id));
            }
            p.timer = t;
        }
    }

    /// Sends the keyframe requests deferred by the throttle whose interval has ended.
    fn send_deferred_plis(&mut self, now: Instant) {
        self.next_pli = None;
        let pending: Vec<(ProducerId, Layer)> = self
            .producers
            .iter()
            .flat_map(|(id, pr)| {
                pr.layers.iter().enumerate().filter_map(move |(i, l)| {
                    l.as_ref()
                        .filter(|l| l.pli_pending)
                        .map(|_| (*id, i as Layer))
                })
            })
            .collect();
        for (producer, layer) in pending {
            // Sends it, or defers it again (and sets `next_pli`) if it is not due yet.
            self.request_keyframe(now, producer, layer);
        }
    }

    /// Copies a datagram into the receive arena. Buffers come back to the arena once the engine
    /// drops them, so steady traffic needs no new allocation per datagram.
    fn take_rx(&mut self, data: &[u8]) -> BytesMut {
        if self.rx.capacity() < data.len() {
            self.rx.reserve(RX_ARENA.max(data.len()));
        }
        self.rx.extend_from_slice(data);
        self.rx.split()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.events.pop_front()
    }

    /// Queues what a connection has to send; its deadline is read again before the next wait.
    fn drain_writes(&mut self, peer: PeerId) {
        self.flush(peer);
        self.mark(peer);
    }

    /// Queues what a connection has to send, leaving its deadline as it was: the forwarding
    /// path (writing media does not bring an engine deadline closer).
    fn flush(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        while let Some(m) = p.pc.poll_write() {
            if let Some(out) = p.out.as_mut() {
                watch_outbound(out, &m);
            }
            queue_transmit(&mut self.stats, &mut self.transmits, m);
        }
    }

    /// A subscriber just connected: find its SRTP key and start sending. rtc protects a probe
    /// (an empty receiver report); the captured key that authenticates it is ours.
    fn start_outbound(&mut self, now: Instant, peer: PeerId) {
        let fast_path = self.fast_path;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(out) = p.out.as_mut() else {
            return;
        };
        // Connected again (after a disconnection): the way media is sealed was decided once
        // and stays; only where it goes may have changed.
        let decided = !matches!(out.seal, Seal::Pending);
        if !fast_path && !decided {
            out.seal = Seal::Rtc;
            out.keys = Default::default();
        }
        self.probe(now, peer);
        if decided {
            return;
        }
        let Some(out) = self.peers.get_mut(&peer).and_then(|p| p.out.as_mut()) else {
            return;
        };
        if matches!(out.seal, Seal::Pending) {
            tracing::warn!(?peer, "no SRTP key matched the probe: sending through rtc");
            out.seal = Seal::Rtc;
        }
        match &out.seal {
            Seal::Own(sealer) => {
                tracing::debug!(?peer, profile = ?sealer.profile, in_place = sealer.in_place(), "fast path");
                self.stats.fast_path_connections += 1;
            }
            _ => self.stats.rtc_path_connections += 1,
        }
    }

    /// Has rtc protect and send an empty receiver report on a subscriber's connection. What it
    /// sends shows which key is ours (at the start) and where the selected pair sends now.
    fn probe(&mut self, now: Instant, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let ssrc = p
            .consumers
            .values()
            .find_map(|c| c.ssrc_pt.map(|(s, _)| s))
            .unwrap_or(1);
        let probe = ReceiverReport {
            ssrc,
            ..Default::default()
        };
        let _ = p.pc.handle_write(TaggedRTCMessage {
            now,
            message: RTCMessage::RtcpPacket(String::new(), vec![Box::new(probe)]),
        });
        self.drain_writes(peer);
    }

    /// Everything a peer has to say after an input: events first (so tracks exist before their
    /// packets), then media, then datagrams.
    fn drain(&mut self, now: Instant, peer: PeerId) {
        loop {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            let Some(ev) = p.pc.poll_event() else { break };
            self.on_engine_event(now, peer, ev);
        }
        loop {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            let Some(msg) = p.pc.poll_read() else { break };
            match msg.message {
                RTCMessage::RtpPacket(track, pkt) => self.forward(now, peer, &track, pkt),
                RTCMessage::RtcpPacket(track, pkts) => {
                    self.on_subscriber_rtcp(now, peer, &track, &pkts)
                }
                _ => {}
            }
        }
        self.drain_writes(peer);
    }

    fn on_subscriber_rtcp(
        &mut self,
        now: Instant,
        peer: PeerId,
        track: &str,
        pkts: &[Box<dyn rtc::rtcp::Packet>],
    ) {
        let asked: u32 = pkts
            .iter()
            .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
            .flat_map(|n| n.nacks.iter())
            .map(|n| 1 + n.lost_packets.count_ones())
            .sum();
        self.stats.nacks_received += u64::from(asked);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(inb) = p.inb.as_mut() {
            for sr in pkts
                .iter()
                .filter_map(|p| p.as_any().downcast_ref::<SenderReport>())
            {
                inb.on_sender_report(now, sr.ssrc, sr.ntp_time);
            }
        }
        if let Some(out) = p.out.as_mut() {
            for pkt in pkts {
                let pkt = pkt.as_any();
                if let Some(fb) = pkt.downcast_ref::<TransportLayerCc>() {
                    out.cc.on_feedback(now, fb);
                } else if let Some(nack) = pkt.downcast_ref::<TransportLayerNack>() {
                    resend(
                        now,
                        &mut p.pc,
                        out,
                        &mut p.consumers,
                        nack,
                        &mut self.bufs,
                        &mut self.transmits,
                        &mut self.stats,
                    );
                }
            }
        }
        for pkt in pkts {
            if let Some(remb) = pkt
                .as_any()
                .downcast_ref::<ReceiverEstimatedMaximumBitrate>()
            {
                p.remb_bps = Some(remb.bitrate as u64);
            }
        }
        let wants_keyframe = pkts.iter().any(|p| {
            p.as_any().is::<PictureLossIndication>() || p.as_any().is::<FullIntraRequest>()
        });
        let Some(producer) = p.sender_tracks.get(track).copied() else {
            return;
        };
        let layer = p
            .consumers
            .get(&producer)
            .and_then(|c| c.forwarder.as_ref())
            .and_then(|f| f.current().or(f.target()));
        if wants_keyframe {
            self.request_keyframe(now, producer, layer.unwrap_or(0));
        }
    }

    fn on_engine_event(&mut self, now: Instant, peer: PeerId, ev: RTCPeerConnectionEvent) {
        match ev {
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                if p.direction != Direction::Publish {
                    return;
                }
                let layer = layer_of_rid(init.rid.as_deref()) as usize;
                // Another simulcast layer of a track we know (or the same one again after a
                // renegotiation).
                if let Some(id) = p.producers.get(&init.track_id).copied() {
                    if let Some(pr) = self.producers.get_mut(&id)
                        && pr.layer_of(init.ssrc).is_none()
                    {
                        pr.layers
                            .resize_with(pr.layers.len().max(layer + 1), || None);
                        pr.layers[layer] = Some(ProducerLayer::new(init.ssrc));
                        if let Some(inb) = p.inb.as_mut() {
                            let video = pr.kind == MediaKind::Video;
                            inb.add_stream(
                                init.ssrc,
                                id.0,
                                layer as u8,
                                pr.codec.clock_rate,
                                video,
                            );
                        }
                    }
                    return;
                }
                let Some(codec) =
                    p.pc.rtp_receiver(init.receiver_id)
                        .and_then(|r| r.track().codec(init.ssrc).cloned())
                else {
                    return;
                };
                let mid =
                    p.pc.rtp_transceiver(RTCRtpTransceiverId::from(init.receiver_id))
                        .and_then(|t| t.mid().clone());
                let kind = if codec.mime_type.to_ascii_lowercase().starts_with("audio/") {
                    MediaKind::Audio
                } else {
                    MediaKind::Video
                };
                let (audio_level_id, twcc_id) =
                    p.pc.rtp_receiver(init.receiver_id)
                        .map(|mut r| {
                            let params = &r.get_parameters().rtp_parameters;
                            (
                                extension_id(params, engine::AUDIO_LEVEL_URI),
                                extension_id(params, rtc::sdp::extmap::TRANSPORT_CC_URI),
                            )
                        })
                        .unwrap_or_default();
                let id = ProducerId(self.next_id + 1);
                self.next_id += 1;
                p.producers.insert(init.track_id.clone(), id);
                if let Some(inb) = p.inb.as_mut() {
                    let video = kind == MediaKind::Video;
                    inb.add_stream(init.ssrc, id.0, layer as u8, codec.clock_rate, video);
                    inb.learn_extensions(twcc_id, audio_level_id);
                }
                let (router, owner) = (p.router.clone(), p.owner.clone());
                self.producers.insert(
                    id,
                    Producer {
                        router: router.clone(),
                        peer,
                        owner: owner.clone(),
                        receiver: init.receiver_id,
                        layers: {
                            let mut layers: Vec<Option<ProducerLayer>> =
                                (0..=layer).map(|_| None).collect();
                            layers[layer] = Some(ProducerLayer::new(init.ssrc));
                            layers
                        },
                        kind,
                        codec,
                        consumers: Vec::new(),
                        audio_level_id,
                        level_sum: 0,
                        level_count: 0,
                        loud_count: 0,
                    },
                );
                self.next_tick.get_or_insert(now + TICK);
                self.events.push_back(SfuEvent::ProducerAdded {
                    router: router.clone(),
                    peer,
                    owner: owner.clone(),
                    producer: id,
                    kind,
                    mid,
                });
                let subs: Vec<PeerId> = self
                    .routers
                    .get(&router)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                for sub in subs {
                    let is_other_subscriber = self
                        .peers
                        .get(&sub)
                        .is_some_and(|s| s.direction == Direction::Subscribe && s.owner != owner);
                    if is_other_subscriber && self.add_consumer(id, sub).is_ok() {
                        let _ = self.offer(now, sub);
                    }
                }
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track)) => {
                let producer = self
                    .peers
                    .get(&peer)
                    .and_then(|p| p.producers.get(&track).copied());
                if let Some(producer) = producer {
                    self.remove_producer(now, producer);
                }
            }
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                RTCPeerConnectionState::Connected => {
                    let Some(p) = self.peers.get_mut(&peer) else {
                        return;
                    };
                    p.connected = true;
                    self.events.push_back(SfuEvent::Connected { peer });
                    self.start_outbound(now, peer);
                    // A new subscriber needs a keyframe to start decoding: allocation picks its
                    // layers and asks for one on each.
                    self.allocate(now, peer);
                }
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                    self.events.push_back(SfuEvent::Disconnected { peer });
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// A publisher packet rtc opened: noted as received (rtc delivers repairs it unwrapped from
    /// RTX too, and the odd duplicate), then forwarded.
    fn forward(&mut self, now: Instant, from: PeerId, track: &str, pkt: rtc::rtp::Packet) {
        self.stats.rtp_in += 1;
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        let Some(producer) = p.producers.get(track).copied() else {
            return;
        };
        let h = &pkt.header;
        if p.inb.as_mut().is_some_and(|inb| {
            inb.arrived(now, h.ssrc, h.sequence_number, h.timestamp) == inbound::Verdict::Drop
        }) {
            return;
        }
        let audio_level = self
            .producers
            .get(&producer)
            .and_then(|pr| pr.audio_level_id)
            .and_then(|id| h.get_extension(id))
            .and_then(|b| b.first().copied());
        let m = Incoming {
            ssrc: h.ssrc,
            seq: h.sequence_number,
            ts: h.timestamp,
            marker: h.marker,
            audio_level,
            payload: &pkt.payload,
        };
        self.forward_media(now, producer, &m);
    }

    /// Sends one publisher packet to every consumer of its producer, rewritten for each.
    fn forward_media(&mut self, now: Instant, producer: ProducerId, pkt: &Incoming<'_>) {
        let Some(pr) = self.producers.get_mut(&producer) else {
            return;
        };
        let Some(layer) = pr.layer_of(pkt.ssrc) else {
            return;
        };
        if let Some(l) = pr.layers[layer as usize].as_mut() {
            l.bytes += pkt.payload.len() as u64;
            l.last_packet = Some(now);
        }
        if let Some(level) = pkt.audio_level.filter(|_| pr.audio_level_id.is_some()) {
            let level = u32::from(level & 0x7f);
            pr.level_sum += level;
            pr.level_count += 1;
            pr.loud_count += u32::from(level < SPEAKING_LEVEL);
        }
        // With one layer there is nothing to switch between: any packet may start the stream
        // (the subscriber's decoder asks for a keyframe itself if it needs one).
        let real_keyframe = pr.kind == MediaKind::Video && pr.is_keyframe_start(pkt.payload);
        let keyframe = pr.layers.len() == 1 || real_keyframe;
        if real_keyframe && let Some(l) = pr.layers[layer as usize].as_mut() {
            // Whoever asked since the last request gets this one: nothing more to ask.
            l.pli_pending = false;
        }
        for i in 0..pr.consumers.len() {
            let Some(pr) = self.producers.get(&producer) else {
                return;
            };
            let sub = pr.consumers[i];
            let Some(p) = self.peers.get_mut(&sub) else {
                continue;
            };
            if !p.connected {
                continue;
            }
            let Some(c) = p.consumers.get_mut(&producer) else {
                continue;
            };
            let Some((ssrc, pt)) = c.ssrc_pt else {
                continue;
            };
            let (seq, ts) = match c.forwarder.as_mut() {
                None => (pkt.seq, pkt.ts),
                Some(f) => match f.on_packet(now, layer, pkt.seq, pkt.ts, keyframe) {
                    Verdict::Send { seq, ts } => (seq, ts),
                    Verdict::Drop => continue,
                },
            };
            let Peer { pc, out, .. } = p;
            let Some(out) = out.as_mut() else {
                continue;
            };
            let media = Media {
                marker: pkt.marker,
                pt,
                seq,
                ts,
                ssrc,
                osn: None,
                roc: c.roc.roc(seq),
                payload: pkt.payload,
            };
            let sent = send_media(
                now,
                pc,
                out,
                c,
                &media,
                &mut self.bufs,
                &mut self.transmits,
                &mut self.stats,
            );
            if sent {
                self.stats.rtp_forwarded += 1;
            } else {
                self.stats.forward_errors += 1;
            }
        }
    }
}

/// A timer that runs every `every` while `running`: whether it fires now (not when it is first
/// armed).
fn periodic(next: &mut Option<Instant>, now: Instant, every: Duration, running: bool) -> bool {
    if !running {
        *next = None;
        return false;
    }
    if next.is_some_and(|t| t > now) {
        return false;
    }
    let fires = next.is_some();
    *next = Some(now + every);
    fires
}

/// A publisher's packet as the forwarding path reads it, whichever path opened it.
struct Incoming<'a> {
    ssrc: u32,
    seq: u16,
    ts: u32,
    marker: bool,
    audio_level: Option<u8>,
    payload: &'a Bytes,
}

/// Counts a datagram the engine wants sent and queues it for the socket it belongs to (the
/// close notice of a peer on ICE-TCP goes back over TCP too).
fn queue_transmit<'a>(
    stats: &mut SfuStats,
    transmits: &'a mut VecDeque<Transmit>,
    m: TaggedBytesMut,
) -> &'a Transmit {
    stats.datagrams_out += 1;
    stats.bytes_out += m.message.len() as u64;
    transmits.push_back(Transmit {
        to: m.transport.peer_addr,
        tcp: m.transport.transport_protocol == TransportProtocol::TCP,
        data: m.message.freeze(),
    });
    &transmits[transmits.len() - 1]
}

/// RFC 7983: STUN messages start with 0 or 1.
fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= 20 && datagram[0] < 2
}

/// Learns from what rtc sends on a subscriber's connection: where the selected pair sends
/// (its SRTCP follows ICE), and, from the first SRTCP, which captured key is ours.
fn watch_outbound(out: &mut Outbound, m: &TaggedBytesMut) {
    let d = &m.message;
    if !fastpath::is_rtcp(d) && !fastpath::is_rtp(d) {
        return;
    }
    let tcp = m.transport.transport_protocol == TransportProtocol::TCP;
    out.dest = Some((m.transport.peer_addr, tcp));
    if matches!(out.seal, Seal::Pending)
        && fastpath::is_rtcp(d)
        && let Some(sealer) = Sealer::find(&out.keys, d)
    {
        out.seal = Seal::Own(sealer);
    }
}

/// Answers a NACK from the send history: each lost packet goes out again as RTX (its original
/// sequence number first, on the RTX SSRC). Without negotiated RTX nothing is resent: a second,
/// different packet under the old sequence number would reuse its SRTP nonce.
#[allow(clippy::too_many_arguments)]
fn resend(
    now: Instant,
    pc: &mut RTCPeerConnection,
    out: &mut Outbound,
    consumers: &mut HashMap<ProducerId, Consumer>,
    nack: &TransportLayerNack,
    bufs: &mut SendBufs,
    transmits: &mut VecDeque<Transmit>,
    stats: &mut SfuStats,
) {
    let Some(c) = consumers
        .values_mut()
        .find(|c| c.ssrc_pt.is_some_and(|(s, _)| s == nack.media_ssrc))
    else {
        return;
    };
    let (Some(ring), Some((rtx_ssrc, rtx_pt))) = (c.sent.as_ref(), c.rtx) else {
        return;
    };
    for pair in &nack.nacks {
        for seq in pair.packet_list() {
            let Some(k) = ring.get(seq) else {
                continue;
            };
            let packet = Media {
                marker: k.marker,
                pt: rtx_pt,
                seq: c.rtx_seq,
                ts: k.ts,
                ssrc: rtx_ssrc,
                osn: Some(seq),
                roc: c.rtx_roc.roc(c.rtx_seq),
                payload: &k.payload,
            };
            if emit(now, pc, out, &packet, bufs, transmits, stats) {
                c.rtx_seq = c.rtx_seq.wrapping_add(1);
                stats.retransmitted += 1;
            }
        }
    }
}

/// One packet for one subscriber, as the forwarder rewrote it.
struct Media<'a> {
    marker: bool,
    pt: u8,
    seq: u16,
    ts: u32,
    ssrc: u32,
    /// RTX: the original sequence number, which goes before the payload.
    osn: Option<u16>,
    /// The SRTP rollover counter of `seq`.
    roc: u32,
    payload: &'a Bytes,
}

/// Sends one forwarded packet on a subscriber's connection and keeps it for NACKs and sender
/// reports.
#[allow(clippy::too_many_arguments)]
fn send_media(
    now: Instant,
    pc: &mut RTCPeerConnection,
    out: &mut Outbound,
    c: &mut Consumer,
    m: &Media<'_>,
    bufs: &mut SendBufs,
    transmits: &mut VecDeque<Transmit>,
    stats: &mut SfuStats,
) -> bool {
    if !emit(now, pc, out, m, bufs, transmits, stats) {
        return false;
    }
    if let Some(ring) = c.sent.as_mut() {
        ring.push(Kept {
            seq: m.seq,
            ts: m.ts,
            marker: m.marker,
            payload: m.payload.clone(),
        });
    }
    c.send_stats.on_packet(now, m.ts, m.payload.len());
    true
}

/// Numbers a packet for TWCC and protects it (with the connection's key, or through rtc) onto
/// the wire. Extension ids are per connection: the publisher's are dropped, not mislabelled.
fn emit(
    now: Instant,
    pc: &mut RTCPeerConnection,
    out: &mut Outbound,
    m: &Media<'_>,
    bufs: &mut SendBufs,
    transmits: &mut VecDeque<Transmit>,
    stats: &mut SfuStats,
) -> bool {
    let twcc = out.cc.number();
    let osn = m.osn.map(u16::to_be_bytes);
    let osn: &[u8] = osn.as_ref().map_or(&[], |b| &b[..]);
    let header_len = if twcc.is_some() { 20 } else { 12 };
    let size = header_len + osn.len() + m.payload.len();
    match &mut out.seal {
        Seal::Pending => return false,
        Seal::Own(sealer) => {
            let Some((to, tcp)) = out.dest else {
                return false;
            };
            let data = if sealer.in_place() {
                let tx = &mut bufs.tx;
                if tx.capacity() < size + fastpath::MAX_TAG {
                    tx.reserve(TX_ARENA);
                }
                fastpath::write_header(tx, m.marker, m.pt, m.seq, m.ts, m.ssrc, twcc);
                tx.extend_from_slice(osn);
                tx.extend_from_slice(m.payload);
                if sealer
                    .seal_in_place(tx, header_len, m.ssrc, m.seq, m.roc)
                    .is_err()
                {
                    tx.clear();
                    return false;
                }
                tx.split().freeze()
            } else {
                let scratch = &mut bufs.scratch;
                scratch.clear();
                fastpath::write_header(scratch, m.marker, m.pt, m.seq, m.ts, m.ssrc, twcc);
                scratch.extend_from_slice(osn);
                scratch.extend_from_slice(m.payload);
                let Ok(data) = sealer.seal(scratch, fill_header(&mut out.header, m, twcc)) else {
                    return false;
                };
                data
            };
            stats.datagrams_out += 1;
            stats.bytes_out += data.len() as u64;
            transmits.push_back(Transmit { to, tcp, data });
        }
        Seal::Rtc => {
            let payload = if osn.is_empty() {
                m.payload.clone()
            } else {
                Bytes::from([osn, &m.payload[..]].concat())
            };
            let packet = rtc::rtp::Packet {
                header: fill_header(&mut out.header, m, twcc).clone(),
                payload,
            };
            let msg = TaggedRTCMessage {
                now,
                message: RTCMessage::RtpPacket(String::new(), packet),
            };
            if pc.handle_write(msg).is_err() {
                return false;
            }
            while let Some(w) = pc.poll_write() {
                queue_transmit(stats, transmits, w);
            }
        }
    }
    if twcc.is_some() {
        out.cc.sent(m.ssrc, m.seq, size, now);
    }
    true
}

/// The packet's header as rtc's types have it (for the paths through rtc's SRTP).
fn fill_header<'h>(
    h: &'h mut rtc::rtp::header::Header,
    m: &Media<'_>,
    twcc: Option<(u8, u16)>,
) -> &'h rtc::rtp::header::Header {
    h.marker = m.marker;
    h.payload_type = m.pt;
    h.sequence_number = m.seq;
    h.timestamp = m.ts;
    h.ssrc = m.ssrc;
    h.extensions.clear();
    h.extension = twcc.is_some();
    h.extension_profile = if twcc.is_some() { 0xBEDE } else { 0 };
    if let Some((id, tseq)) = twcc {
        h.extensions.push(rtc::rtp::header::Extension {
            id,
            payload: Bytes::copy_from_slice(&tseq.to_be_bytes()),
        });
    }
    h
}

/// The negotiated id of the transport-wide sequence number extension on a sender's m-section.
fn twcc_ext_id(pc: &mut RTCPeerConnection, sender: RTCRtpSenderId) -> Option<u8> {
    let mut s = pc.rtp_sender(sender)?;
    extension_id(
        &s.get_parameters().rtp_parameters,
        rtc::sdp::extmap::TRANSPORT_CC_URI,
    )
}

/// The negotiated id of the header extension `uri` in a sender's or receiver's parameters.
fn extension_id(params: &RTCRtpParameters, uri: &str) -> Option<u8> {
    params
        .header_extensions
        .iter()
        .find(|e| e.uri == uri)
        .and_then(|e| u8::try_from(e.id).ok())
}

/// The RTX stream of a sender: its SSRC and the payload type whose `apt` is `pt`.
fn sender_rtx(pc: &mut RTCPeerConnection, sender: RTCRtpSenderId, pt: u8) -> Option<(u32, u8)> {
    let mut s = pc.rtp_sender(sender)?;
    let ssrc = s
        .track()
        .codings()
        .iter()
        .find_map(|c| c.rtp_coding_parameters.rtx.as_ref())?
        .ssrc;
    let apt = format!("apt={pt}");
    let rtx_pt = s
        .get_parameters()
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| {
            c.rtp_codec.mime_type.eq_ignore_ascii_case("video/rtx")
                && c.rtp_codec
                    .sdp_fmtp_line
                    .split(';')
                    .any(|p| p.trim() == apt)
        })?
        .payload_type;
    Some((ssrc, rtx_pt))
}

fn sender_ssrc_pt(
    pc: &mut RTCPeerConnection,
    sender: RTCRtpSenderId,
    mime: &str,
) -> Option<(u32, u8)> {
    let mut s = pc.rtp_sender(sender)?;
    let ssrc = s.track().ssrcs().next()?;
    let pt = s
        .get_parameters()
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)?;
    Some((ssrc, pt))
}

/// Asks the publisher to send Opus with DTX (silence costs almost nothing, and silent
/// participants drop out of the active-speaker list) by adding `usedtx=1` to the Opus `fmtp`
/// lines of our answer. The engine answers with the offer's parameters, so it is added here.
pub fn with_opus_dtx(sdp: &str) -> String {
    let opus_pts: Vec<&str> = sdp
        .lines()
        .filter_map(|l| l.strip_prefix("a=rtpmap:"))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, codec)| codec.to_ascii_lowercase().starts_with("opus/"))
        .map(|(pt, _)| pt)
        .collect();
    let mut out = String::with_capacity(sdp.len() + 16 * opus_pts.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let is_opus_fmtp = body
            .strip_prefix("a=fmtp:")
            .and_then(|l| l.split_once(' '))
            .is_some_and(|(pt, params)| opus_pts.contains(&pt) && !params.contains("usedtx"));
        if is_opus_fmtp {
            out.push_str(body);
            out.push_str(";usedtx=1");
            out.push_str(&line[body.len()..]);
        } else {
            out.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_ask_for_opus_dtx_only() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\na=fmtp:96 x-google=1\r\n";
        let out = with_opus_dtx(sdp);
        assert!(
            out.contains("a=fmtp:111 minptime=10;useinbandfec=1;usedtx=1\r\n"),
            "{out}"
        );
        assert!(out.contains("a=fmtp:96 x-google=1\r\n"), "video untouched");
        assert_eq!(with_opus_dtx(&out), out, "applied once");
        assert_eq!(with_opus_dtx("garbage"), "garbage");
    }
}
