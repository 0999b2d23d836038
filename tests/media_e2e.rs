//! Media end to end through the real server: `rtc` peer connections play the browsers, each on
//! its own UDP socket on 127.0.0.1 and driven by a small async loop, signaling over the `/rtc`
//! WebSocket exactly as `docs/protocol.md` describes. The publisher sends synthetic VP8 (real
//! payload descriptors and frame headers, several packets per frame) and Opus; the subscribers
//! record what their peer connections hand up, and the tests check what a viewer would notice:
//! every frame arrives, lost packets are repaired, and a narrow link gets the small picture.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::rtc::{Ws, join, sdp_candidates, sdp_mids, ws_send};
use common::{Backend, TestApp};
use futures_util::StreamExt;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// How long connecting (signaling, ICE, DTLS, first packets) may take.
/// Serialises the media tests of this file (each runs a server, several clients and timers).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONNECT: Duration = Duration::from_secs(10);
/// The longest a client loop sleeps, so that it notices the test's instructions quickly.
const IDLE: Duration = Duration::from_millis(5);
const FRAME_INTERVAL: Duration = Duration::from_micros(33_333);
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Every `KEYFRAME_EVERY`th frame is a keyframe (once a second at 30 fps).
const KEYFRAME_EVERY: u32 = 30;
const VIDEO_MAGIC: u8 = 0xD3;
const AUDIO_MAGIC: u8 = 0xA5;
/// Video trailer: magic, layer, frame (4), packet index, packets in the frame, keyframe, magic.
const VIDEO_TRAILER: usize = 10;
/// How much a narrow link lets through in one burst: its rate for this long.
const BUCKET_DEPTH: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Synthetic media
// ---------------------------------------------------------------------------------------------

/// What the publisher wrote at the end of every video packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    layer: u8,
    frame: u32,
    idx: u8,
    count: u8,
    key: bool,
}

/// The RTP payloads of one VP8 frame of `bytes` payload bytes in all: an RFC 7741 payload
/// descriptor on each (S=1 on the first), the VP8 frame header on the first (with the keyframe
/// start code and a 640x480 size on keyframes), filler, and a [`Tag`] at the end.
fn vp8_frame(layer: u8, frame: u32, key: bool, bytes: usize) -> Vec<Bytes> {
    loadtest::media::vp8_payloads(frame, key, bytes, (640, 480), |idx, count| {
        let mut t = vec![VIDEO_MAGIC, layer];
        t.extend_from_slice(&frame.to_be_bytes());
        t.extend_from_slice(&[idx as u8, count as u8, u8::from(key), VIDEO_MAGIC]);
        t
    })
}

fn video_tag(p: &[u8]) -> Option<Tag> {
    let t = p.get(p.len().checked_sub(VIDEO_TRAILER)?..)?;
    (t[0] == VIDEO_MAGIC && t[9] == VIDEO_MAGIC).then(|| Tag {
        layer: t[1],
        frame: u32::from_be_bytes([t[2], t[3], t[4], t[5]]),
        idx: t[6],
        count: t[7],
        key: t[8] == 1,
    })
}

/// A 20 ms Opus packet (one CELT frame's TOC byte, filler) numbered `n`.
fn opus_packet(n: u32) -> Bytes {
    let mut p = vec![0x78];
    p.resize(60, n as u8);
    p.push(AUDIO_MAGIC);
    p.extend_from_slice(&n.to_be_bytes());
    p.push(AUDIO_MAGIC);
    Bytes::from(p)
}

fn audio_number(p: &[u8]) -> Option<u32> {
    let t = p.get(p.len().checked_sub(6)?..)?;
    (t[0] == AUDIO_MAGIC && t[5] == AUDIO_MAGIC)
        .then(|| u32::from_be_bytes([t[1], t[2], t[3], t[4]]))
}

/// Payload type, sequence number and SSRC of an SRTP datagram (those header fields travel in
/// the clear); `None` for STUN, DTLS and RTCP.
fn rtp_fields(d: &[u8]) -> Option<(u8, u16, u32)> {
    if d.len() < 12 || d[0] >> 6 != 2 {
        return None;
    }
    let pt = d[1] & 0x7f;
    if (64..=95).contains(&pt) {
        return None;
    }
    Some((
        pt,
        u16::from_be_bytes([d[2], d[3]]),
        u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
    ))
}

/// A seeded xorshift generator: the same datagrams are dropped on every run with the same input.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn vp8() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.into(),
        clock_rate: 90000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.into(),
        clock_rate: 48000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

// ---------------------------------------------------------------------------------------------
// A peer connection on a real UDP socket
// ---------------------------------------------------------------------------------------------

/// A browser-like peer connection (full ICE, default codecs and interceptors: NACK, RTX, reports)
/// with one host candidate: its own socket on 127.0.0.1.
struct Endpoint {
    pc: RTCPeerConnection,
    sock: UdpSocket,
    addr: SocketAddr,
    /// Where it sent datagrams to: only ever the server's media socket.
    sent_to: HashSet<SocketAddr>,
}

impl Endpoint {
    async fn new() -> Endpoint {
        Endpoint::with(|addr| sfu::engine::client_peer_connection(Instant::now(), addr).unwrap())
            .await
    }

    async fn with(make_pc: impl FnOnce(SocketAddr) -> RTCPeerConnection) -> Endpoint {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        widen_receive_buffer(&sock);
        let addr = sock.local_addr().unwrap();
        let pc = make_pc(addr);
        Endpoint {
            pc,
            sock,
            addr,
            sent_to: HashSet::new(),
        }
    }

    /// Sends everything the peer connection has queued.
    async fn flush(&mut self) {
        while let Some(m) = self.pc.poll_write() {
            let to = m.transport.peer_addr;
            self.sent_to.insert(to);
            let _ = self.sock.send_to(&m.message, to).await;
        }
    }

    fn feed(&mut self, from: SocketAddr, data: &[u8]) {
        let _ = self.pc.handle_read(TaggedBytesMut {
            now: Instant::now(),
            transport: TransportContext {
                local_addr: self.addr,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(data),
        });
    }

    fn fire_timers(&mut self, now: Instant) {
        if self.pc.poll_timeout().is_some_and(|t| t <= now) {
            let _ = self.pc.handle_timeout(now);
        }
    }

    fn deadline(&mut self, latest: Instant) -> Instant {
        self.pc.poll_timeout().map_or(latest, |t| t.min(latest))
    }
}

/// Room for bursts: the server answers a NACK listing many packets with all of them at once, and
/// after heavy loss the default receive buffer (~200 KiB) overflows, which is loss no test asked
/// for.
fn widen_receive_buffer(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    // SAFETY: an open socket, and an option value of the length given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

/// [`sfu::engine::client_peer_connection`], but asking for a lost packet at most `max_nacks`
/// times, as a browser does.
fn bounded_nack_client(addr: SocketAddr, max_nacks: u16) -> RTCPeerConnection {
    use rtc::interceptor::{NackGeneratorBuilder, Slot};
    use rtc::peer_connection::RTCPeerConnectionBuilder;
    use rtc::peer_connection::configuration::RTCConfigurationBuilder;
    use rtc::peer_connection::configuration::interceptor_registry::{
        Registry, register_default_interceptors,
    };
    use rtc::peer_connection::configuration::media_engine::MediaEngine;
    use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
    let mut me = MediaEngine::default();
    me.register_default_codecs().unwrap();
    let registry = Registry::new().with(
        Slot::from(14_000),
        sfu::engine::DeliverRtcpFeedback::default(),
    );
    let registry = register_default_interceptors(registry, &mut me)
        .unwrap()
        .with(
            Slot::NackGenerator,
            NackGeneratorBuilder::new()
                .with_max_nacks_per_packet(max_nacks)
                .build(),
        );
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(SettingEngineBuilder::new().build())
        .with_interceptor_registry(registry)
        .build(Instant::now())
        .unwrap();
    pc.add_local_candidate(sfu::engine::host_candidate(addr, false).unwrap())
        .unwrap();
    pc
}

// ---------------------------------------------------------------------------------------------
// Signaling
// ---------------------------------------------------------------------------------------------

/// Payload types of the RTX codecs in an SDP.
fn rtx_payload_types(sdp: &str) -> HashSet<u8> {
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix("a=rtpmap:"))
        .filter_map(|l| {
            let (pt, codec) = l.split_once(' ')?;
            codec
                .to_ascii_lowercase()
                .starts_with("rtx/")
                .then(|| pt.parse().ok())?
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------------------

struct LayerSpec {
    /// Empty for a plain (non-simulcast) track.
    rid: &'static str,
    /// Payload bytes per frame: the layer's bitrate is about this × 8 × 30.
    frame_bytes: usize,
    /// Payload bytes per keyframe.
    key_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct SentFrame {
    at: Instant,
    layer: u8,
    frame: u32,
    packets: u8,
    key: bool,
}

#[derive(Default)]
struct PubLog {
    connected_at: Option<Instant>,
    frames: Vec<SentFrame>,
    audio: Vec<(Instant, u32)>,
    /// Keyframe requests from the server: (when, media SSRC).
    plis: Vec<(Instant, u32)>,
    write_errors: u64,
    /// Anything the server objected to, or that went wrong on the way.
    problems: Vec<String>,
}

#[derive(Default)]
struct PubCtl {
    stop_media: bool,
    quit: bool,
}

struct PubHandle {
    log: Arc<Mutex<PubLog>>,
    ctl: Arc<Mutex<PubCtl>>,
    task: JoinHandle<Endpoint>,
}

struct Publisher {
    ws: Ws,
    ep: Endpoint,
    log: Arc<Mutex<PubLog>>,
    ctl: Arc<Mutex<PubCtl>>,
    layers: Vec<LayerSpec>,
    ssrcs: Vec<u32>,
    seqs: Vec<u16>,
    key_pending: Vec<bool>,
    video: RTCRtpSenderId,
    audio: Option<(RTCRtpSenderId, u32)>,
    audio_seq: u16,
    video_mid: String,
    /// Known once the answer is applied: payload types, and the mid/rid extension ids.
    negotiated: Option<Negotiated>,
    media_start: Option<Instant>,
    next_frame: u32,
    next_audio: u32,
}

struct Negotiated {
    video_pt: u8,
    audio_pt: u8,
    mid_ext: Option<u8>,
    rid_ext: Option<u8>,
}

fn payload_type(pc: &mut RTCPeerConnection, sender: RTCRtpSenderId, mime: &str) -> u8 {
    pc.rtp_sender(sender)
        .unwrap()
        .get_parameters()
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
        .unwrap_or_else(|| panic!("{mime} was not negotiated"))
}

async fn spawn_publisher(
    app: &TestApp,
    room: &str,
    identity: &str,
    layers: Vec<LayerSpec>,
    with_audio: bool,
) -> PubHandle {
    let ws = join(app, room, identity, "publish").await;
    let mut ep = Endpoint::new().await;
    let ssrcs: Vec<u32> = (0..layers.len() as u32).map(|i| 0x5EED_0010 + i).collect();
    let encodings = layers
        .iter()
        .zip(&ssrcs)
        .map(|(l, ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: l.rid.into(),
                ssrc: Some(*ssrc),
                ..Default::default()
            },
            codec: vp8(),
            ..Default::default()
        })
        .collect();
    let video = ep
        .pc
        .add_track(MediaStreamTrack::new(
            "camera".into(),
            "camera-track".into(),
            "camera".into(),
            RtpCodecKind::Video,
            encodings,
        ))
        .unwrap();
    let audio = with_audio.then(|| {
        let ssrc = 0x5EED_0A0D;
        let sender = ep
            .pc
            .add_track(MediaStreamTrack::new(
                "camera".into(),
                "microphone-track".into(),
                "microphone".into(),
                RtpCodecKind::Audio,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: opus(),
                    ..Default::default()
                }],
            ))
            .unwrap();
        (sender, ssrc)
    });
    let log = Arc::new(Mutex::new(PubLog::default()));
    let ctl = Arc::new(Mutex::new(PubCtl::default()));
    let n = layers.len();
    let p = Publisher {
        ws,
        ep,
        log: log.clone(),
        ctl: ctl.clone(),
        layers,
        ssrcs,
        seqs: (0..n).map(|i| 1000 + 20_000 * i as u16).collect(),
        key_pending: vec![true; n],
        video,
        audio,
        audio_seq: 500,
        video_mid: String::new(),
        negotiated: None,
        media_start: None,
        next_frame: 0,
        next_audio: 0,
    };
    PubHandle {
        log,
        ctl,
        task: tokio::spawn(p.run()),
    }
}

impl Publisher {
    async fn run(mut self) -> Endpoint {
        let offer = self.ep.pc.create_offer(None).unwrap();
        self.ep
            .pc
            .set_local_description(Instant::now(), offer.clone())
            .unwrap();
        let mut intents = Vec::new();
        for (kind, mid) in sdp_mids(&offer.sdp) {
            let source = if kind == "video" {
                self.video_mid = mid.clone();
                "camera"
            } else {
                "microphone"
            };
            intents.push(json!({"mid": mid, "source": source}));
        }
        ws_send(
            &mut self.ws,
            json!({"type": "offer", "sdp": offer.sdp, "tracks": intents}),
        )
        .await;
        let mut buf = vec![0u8; 2048];
        loop {
            let (stop_media, quit) = {
                let c = lock(&self.ctl);
                (c.stop_media, c.quit)
            };
            if quit {
                break;
            }
            let now = Instant::now();
            if !stop_media {
                self.send_due_media(now);
            }
            self.ep.fire_timers(now);
            self.drain(now);
            self.ep.flush().await;
            let mut wake = now + IDLE;
            if let Some(start) = self.media_start.filter(|_| !stop_media) {
                wake = wake
                    .min(start + FRAME_INTERVAL * self.next_frame)
                    .min(start + AUDIO_INTERVAL * self.next_audio);
            }
            let wake = self.ep.deadline(wake);
            tokio::select! {
                r = self.ep.sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        self.ep.feed(from, &buf[..n]);
                        while let Ok((n, from)) = self.ep.sock.try_recv_from(&mut buf) {
                            self.ep.feed(from, &buf[..n]);
                        }
                    }
                }
                m = self.ws.next() => match m {
                    Some(Ok(Message::Text(t))) => self.on_signal(&t),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => {
                        lock(&self.log).problems.push(format!("publisher WebSocket ended: {other:?}"));
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        self.ep
    }

    fn on_signal(&mut self, text: &str) {
        let v: Value = serde_json::from_str(text).unwrap();
        match v["type"].as_str().unwrap_or_default() {
            "answer" => {
                let sdp = v["sdp"].as_str().unwrap().to_string();
                let cands = sdp_candidates(&sdp);
                if let Err(e) = self.ep.pc.set_remote_description(
                    Instant::now(),
                    RTCSessionDescription::answer(sdp).unwrap(),
                ) {
                    lock(&self.log)
                        .problems
                        .push(format!("cannot apply the answer: {e}"));
                    return;
                }
                lock(&self.log).problems.extend(
                    cands
                        .into_iter()
                        .filter(|c| !c.starts_with("127.0.0.1:"))
                        .map(|c| format!("answer candidate {c}")),
                );
                let pc = &mut self.ep.pc;
                let video_pt = payload_type(pc, self.video, MIME_TYPE_VP8);
                let audio_pt = self
                    .audio
                    .map_or(0, |(s, _)| payload_type(pc, s, MIME_TYPE_OPUS));
                let exts = pc
                    .rtp_sender(self.video)
                    .unwrap()
                    .get_parameters()
                    .rtp_parameters
                    .header_extensions
                    .clone();
                let ext = |uri: &str| exts.iter().find(|e| e.uri == uri).map(|e| e.id as u8);
                self.negotiated = Some(Negotiated {
                    video_pt,
                    audio_pt,
                    mid_ext: ext("urn:ietf:params:rtp-hdrext:sdes:mid"),
                    rid_ext: ext("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"),
                });
            }
            "error" => lock(&self.log).problems.push(format!("server error: {v}")),
            _ => {}
        }
    }

    fn drain(&mut self, now: Instant) {
        while let Some(ev) = self.ep.pc.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                let mut log = lock(&self.log);
                match s {
                    RTCPeerConnectionState::Connected => {
                        log.connected_at.get_or_insert(now);
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        log.problems.push(format!("publisher connection {s}"));
                    }
                    _ => {}
                }
            }
        }
        while let Some(m) = self.ep.pc.poll_read() {
            if let RTCMessage::RtcpPacket(_, pkts) = m.message {
                for p in &pkts {
                    if let Some(pli) = p.as_any().downcast_ref::<PictureLossIndication>() {
                        lock(&self.log).plis.push((now, pli.media_ssrc));
                        if let Some(l) = self.ssrcs.iter().position(|s| *s == pli.media_ssrc) {
                            self.key_pending[l] = true;
                        }
                    }
                }
            }
        }
    }

    /// Sends every frame and audio packet whose time has come (media starts once connected).
    fn send_due_media(&mut self, now: Instant) {
        if self.negotiated.is_none() || lock(&self.log).connected_at.is_none() {
            return;
        }
        let start = *self.media_start.get_or_insert(now);
        while start + FRAME_INTERVAL * self.next_frame <= now {
            let frame = self.next_frame;
            self.next_frame += 1;
            for layer in 0..self.layers.len() {
                self.send_frame(now, layer, frame);
            }
        }
        while self.audio.is_some() && start + AUDIO_INTERVAL * self.next_audio <= now {
            let n = self.next_audio;
            self.next_audio += 1;
            self.send_audio(now, n);
        }
    }

    fn send_frame(&mut self, now: Instant, layer: usize, frame: u32) {
        let neg = self.negotiated.as_ref().unwrap();
        let key = frame.is_multiple_of(KEYFRAME_EVERY) || self.key_pending[layer];
        self.key_pending[layer] = false;
        let spec = &self.layers[layer];
        let bytes = if key {
            spec.key_bytes
        } else {
            spec.frame_bytes
        };
        let payloads = vp8_frame(layer as u8, frame, key, bytes);
        let count = payloads.len();
        let simulcast = !self.layers[layer].rid.is_empty();
        let mut errors = 0;
        for (i, payload) in payloads.into_iter().enumerate() {
            let seq = self.seqs[layer];
            self.seqs[layer] = seq.wrapping_add(1);
            let mut header = rtc::rtp::header::Header {
                version: 2,
                marker: i + 1 == count,
                payload_type: neg.video_pt,
                sequence_number: seq,
                // A different random-looking origin per layer, as encoders have.
                timestamp: 0x1234_5678u32
                    .wrapping_mul(layer as u32 + 1)
                    .wrapping_add(frame * 3000),
                ssrc: self.ssrcs[layer],
                ..Default::default()
            };
            if simulcast {
                if let Some(id) = neg.mid_ext {
                    header
                        .set_extension(id, Bytes::from(self.video_mid.clone()))
                        .unwrap();
                }
                if let Some(id) = neg.rid_ext {
                    header
                        .set_extension(id, Bytes::from_static(self.layers[layer].rid.as_bytes()))
                        .unwrap();
                }
            }
            let ok = self
                .ep
                .pc
                .rtp_sender(self.video)
                .unwrap()
                .write_rtp(now, rtc::rtp::Packet { header, payload })
                .is_ok();
            if !ok {
                errors += 1;
            }
        }
        let mut log = lock(&self.log);
        log.write_errors += errors;
        log.frames.push(SentFrame {
            at: now,
            layer: layer as u8,
            frame,
            packets: count as u8,
            key,
        });
    }

    fn send_audio(&mut self, now: Instant, n: u32) {
        let (sender, ssrc) = self.audio.unwrap();
        let pt = self.negotiated.as_ref().unwrap().audio_pt;
        let seq = self.audio_seq;
        self.audio_seq = seq.wrapping_add(1);
        let pkt = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                payload_type: pt,
                sequence_number: seq,
                timestamp: 777u32.wrapping_add(n * 960),
                ssrc,
                ..Default::default()
            },
            payload: opus_packet(n),
        };
        let ok = self
            .ep
            .pc
            .rtp_sender(sender)
            .unwrap()
            .write_rtp(now, pkt)
            .is_ok();
        let mut log = lock(&self.log);
        if !ok {
            log.write_errors += 1;
        }
        log.audio.push((now, n));
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriber
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct VideoRx {
    at: Instant,
    ssrc: u32,
    seq: u16,
    ts: u32,
    marker: bool,
    tag: Tag,
}

#[derive(Default)]
struct SubLog {
    connected_at: Option<Instant>,
    /// How many tracks each offer it answered carried.
    answered: Vec<usize>,
    video: Vec<VideoRx>,
    audio: Vec<(Instant, u32)>,
    /// RTP datagrams it threw away on purpose: (when, payload type, seq, SSRC).
    dropped: Vec<(Instant, u8, u16, u32)>,
    datagrams: u64,
    /// Retransmissions (RTX payload type) that reached it.
    rtx_datagrams: u64,
    rtx_pts: HashSet<u8>,
    rembs: u64,
    /// Every RTP datagram that reached the socket, dropped or not: (when, bytes).
    rtp_in: Vec<(Instant, usize)>,
    problems: Vec<String>,
}

#[derive(Default)]
struct SubCtl {
    /// Datagrams dropped per thousand, once connected.
    drop_per_mille: u64,
    /// Sends REMB with this estimate every 200 ms while set.
    remb_bps: Option<f32>,
    /// While set, a narrow link: RTP datagrams beyond this many bits per second are dropped (a
    /// token bucket holding [`BUCKET_DEPTH`] worth, so a burst cannot hide the loss).
    rate_limit_bps: Option<u64>,
    quit: bool,
}

struct SubHandle {
    name: String,
    log: Arc<Mutex<SubLog>>,
    ctl: Arc<Mutex<SubCtl>>,
    task: JoinHandle<Endpoint>,
}

struct Subscriber {
    ws: Ws,
    ep: Endpoint,
    log: Arc<Mutex<SubLog>>,
    ctl: Arc<Mutex<SubCtl>>,
    rng: XorShift,
    connected: bool,
    /// The video track's receiver and SSRC, once its first packet arrived.
    video_receiver: Option<(RTCRtpReceiverId, u32)>,
    receivers: HashMap<String, (RTCRtpReceiverId, u32)>,
    next_remb: Instant,
    /// The narrow link's token bucket: (bytes, last refill).
    bucket: Option<(f64, Instant)>,
}

async fn spawn_subscriber(
    app: &TestApp,
    room: &str,
    identity: &str,
    drop_per_mille: u64,
) -> SubHandle {
    spawn_subscriber_on(app, room, identity, drop_per_mille, Endpoint::new().await).await
}

async fn spawn_subscriber_on(
    app: &TestApp,
    room: &str,
    identity: &str,
    drop_per_mille: u64,
    ep: Endpoint,
) -> SubHandle {
    let ws = join(app, room, identity, "subscribe").await;
    let log = Arc::new(Mutex::new(SubLog::default()));
    let ctl = Arc::new(Mutex::new(SubCtl {
        drop_per_mille,
        ..Default::default()
    }));
    let s = Subscriber {
        ws,
        ep,
        log: log.clone(),
        ctl: ctl.clone(),
        rng: XorShift(0x9E37_79B9_7F4A_7C15),
        connected: false,
        video_receiver: None,
        receivers: HashMap::new(),
        next_remb: Instant::now(),
        bucket: None,
    };
    SubHandle {
        name: identity.into(),
        log,
        ctl,
        task: tokio::spawn(s.run()),
    }
}

impl Subscriber {
    async fn run(mut self) -> Endpoint {
        let mut buf = vec![0u8; 2048];
        loop {
            let (quit, remb) = {
                let c = lock(&self.ctl);
                (c.quit, c.remb_bps)
            };
            if quit {
                break;
            }
            let now = Instant::now();
            if let (Some(bps), Some((receiver, ssrc))) = (remb, self.video_receiver)
                && now >= self.next_remb
            {
                self.next_remb = now + Duration::from_millis(200);
                let remb = ReceiverEstimatedMaximumBitrate {
                    sender_ssrc: 0,
                    bitrate: bps,
                    ssrcs: vec![ssrc],
                };
                let sent = self
                    .ep
                    .pc
                    .rtp_receiver(receiver)
                    .map(|mut r| r.write_rtcp(now, vec![Box::new(remb)]));
                let mut log = lock(&self.log);
                match sent {
                    Some(Ok(())) => log.rembs += 1,
                    other => log.problems.push(format!("cannot send REMB: {other:?}")),
                }
            }
            self.ep.fire_timers(now);
            self.drain(now);
            self.ep.flush().await;
            let wake = self.ep.deadline(now + IDLE);
            tokio::select! {
                r = self.ep.sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        self.intake(from, &buf[..n]);
                        while let Ok((n, from)) = self.ep.sock.try_recv_from(&mut buf) {
                            self.intake(from, &buf[..n]);
                        }
                    }
                }
                m = self.ws.next() => match m {
                    Some(Ok(Message::Text(t))) => self.on_signal(&t).await,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => {
                        lock(&self.log).problems.push(format!("subscriber WebSocket ended: {other:?}"));
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        self.ep
    }

    /// One datagram from the network: counted, perhaps dropped (the lossy or the narrow link),
    /// else handed on.
    fn intake(&mut self, from: SocketAddr, data: &[u8]) {
        let rtp = rtp_fields(data);
        let now = Instant::now();
        {
            let mut log = lock(&self.log);
            log.datagrams += 1;
            let (per_mille, limit) = {
                let c = lock(&self.ctl);
                (c.drop_per_mille, c.rate_limit_bps)
            };
            if rtp.is_some() {
                log.rtp_in.push((now, data.len()));
            }
            let lossy = self.connected && per_mille > 0 && self.rng.next() % 1000 < per_mille;
            let narrow = match limit.filter(|_| rtp.is_some()) {
                Some(bps) => {
                    let rate = bps as f64 / 8.0;
                    let depth = rate * BUCKET_DEPTH.as_secs_f64();
                    let (bytes, last) = self.bucket.get_or_insert((depth, now));
                    *bytes = (*bytes + now.duration_since(*last).as_secs_f64() * rate).min(depth);
                    *last = now;
                    let over = *bytes < data.len() as f64;
                    if !over {
                        *bytes -= data.len() as f64;
                    }
                    over
                }
                None => {
                    self.bucket = None;
                    false
                }
            };
            if self.connected && (lossy || narrow) {
                if let Some((pt, seq, ssrc)) = rtp {
                    log.dropped.push((now, pt, seq, ssrc));
                }
                return;
            }
            if let Some((pt, _, _)) = rtp
                && log.rtx_pts.contains(&pt)
            {
                log.rtx_datagrams += 1;
            }
        }
        self.ep.feed(from, data);
    }

    async fn on_signal(&mut self, text: &str) {
        let v: Value = serde_json::from_str(text).unwrap();
        match v["type"].as_str().unwrap_or_default() {
            "offer" => {
                let sdp = v["sdp"].as_str().unwrap().to_string();
                let tracks = v["tracks"].as_array().map_or(0, Vec::len);
                let now = Instant::now();
                {
                    let mut log = lock(&self.log);
                    log.rtx_pts.extend(rtx_payload_types(&sdp));
                    let odd = sdp_candidates(&sdp)
                        .into_iter()
                        .filter(|c| !c.starts_with("127.0.0.1:"))
                        .map(|c| format!("offer candidate {c}"));
                    log.problems.extend(odd);
                }
                let answer = self
                    .ep
                    .pc
                    .set_remote_description(now, RTCSessionDescription::offer(sdp).unwrap())
                    .and_then(|()| self.ep.pc.create_answer(None))
                    .and_then(|a| {
                        self.ep.pc.set_local_description(now, a.clone())?;
                        Ok(a)
                    });
                match answer {
                    Ok(a) => {
                        ws_send(&mut self.ws, json!({"type": "answer", "sdp": a.sdp})).await;
                        lock(&self.log).answered.push(tracks);
                    }
                    Err(e) => lock(&self.log).problems.push(format!("cannot answer: {e}")),
                }
            }
            "error" => lock(&self.log).problems.push(format!("server error: {v}")),
            _ => {}
        }
    }

    fn drain(&mut self, now: Instant) {
        while let Some(ev) = self.ep.pc.poll_event() {
            match ev {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) => match s {
                    RTCPeerConnectionState::Connected => {
                        self.connected = true;
                        lock(&self.log).connected_at.get_or_insert(now);
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        lock(&self.log)
                            .problems
                            .push(format!("subscriber connection {s}"));
                    }
                    _ => {}
                },
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    self.receivers
                        .insert(init.track_id, (init.receiver_id, init.ssrc));
                }
                _ => {}
            }
        }
        while let Some(m) = self.ep.pc.poll_read() {
            let RTCMessage::RtpPacket(track, pkt) = m.message else {
                continue;
            };
            let mut log = lock(&self.log);
            if let Some(tag) = video_tag(&pkt.payload) {
                if self.video_receiver.is_none() {
                    self.video_receiver = self.receivers.get(&track).copied();
                }
                log.video.push(VideoRx {
                    at: m.now,
                    ssrc: pkt.header.ssrc,
                    seq: pkt.header.sequence_number,
                    ts: pkt.header.timestamp,
                    marker: pkt.header.marker,
                    tag,
                });
            } else if let Some(n) = audio_number(&pkt.payload) {
                log.audio.push((m.now, n));
            } else {
                log.problems
                    .push(format!("unrecognised packet on {track}: {:?}", pkt.header));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test plumbing
// ---------------------------------------------------------------------------------------------

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Instant {
    let start = Instant::now();
    loop {
        if cond() {
            return Instant::now();
        }
        assert!(
            start.elapsed() < limit,
            "waited {limit:?} in vain for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connected, and answered an offer carrying `tracks` tracks.
fn subscriber_ready(s: &SubHandle, tracks: usize) -> bool {
    let log = lock(&s.log);
    log.connected_at.is_some() && log.answered.last() == Some(&tracks)
}

/// Stops every client loop (a panic in one fails the test), checks that every client sent only
/// to the server's media socket, and stops the server.
async fn shut_down(app: TestApp, publisher: PubHandle, subs: Vec<SubHandle>) {
    lock(&publisher.ctl).quit = true;
    for s in &subs {
        lock(&s.ctl).quit = true;
    }
    let media = app.media_addr;
    let mut endpoints = vec![("publisher".to_string(), publisher.task.await.unwrap())];
    for s in subs {
        endpoints.push((s.name, s.task.await.unwrap()));
    }
    for (name, ep) in &endpoints {
        assert!(
            ep.sent_to.iter().all(|a| *a == media),
            "{name} sent to {:?}, not only to the media socket {media}",
            ep.sent_to
        );
    }
    app.stop().await;
}

fn assert_no_problems(publisher: &PubHandle, subs: &[SubHandle]) {
    let p = lock(&publisher.log);
    assert!(p.problems.is_empty(), "publisher: {:?}", p.problems);
    assert_eq!(p.write_errors, 0, "publisher write_rtp errors");
    for s in subs {
        let l = lock(&s.log);
        assert!(l.problems.is_empty(), "{}: {:?}", s.name, l.problems);
    }
}

/// Frames of `layer` sent in `[from, to)`.
fn sent_frames(p: &PubHandle, layer: u8, from: Instant, to: Instant) -> Vec<SentFrame> {
    lock(&p.log)
        .frames
        .iter()
        .filter(|f| f.layer == layer && f.at >= from && f.at < to)
        .copied()
        .collect()
}

/// Checks that `sub` got every packet of every frame in `sent` with the marker on the last, the
/// frame's packets sharing one timestamp and frames 3000 ticks apart, and sequence numbers
/// without a hole. Returns (frames, packets) received of `sent`.
fn assert_every_frame(sub: &SubHandle, sent: &[SentFrame]) -> (usize, usize) {
    let log = lock(&sub.log);
    let mut by_frame: HashMap<u32, Vec<&VideoRx>> = HashMap::new();
    for rx in &log.video {
        by_frame.entry(rx.tag.frame).or_default().push(rx);
    }
    let mut missing = Vec::new();
    // Sequence numbers in the order the publisher sent the packets.
    let mut seqs: Vec<u16> = Vec::new();
    let mut frame_ts: Vec<(u32, u32)> = Vec::new();
    let mut packets = 0;
    for f in sent {
        let got = by_frame
            .get(&f.frame)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let idx: BTreeSet<u8> = got.iter().map(|r| r.tag.idx).collect();
        let absent: Vec<u8> = (0..f.packets).filter(|i| !idx.contains(i)).collect();
        if !absent.is_empty() {
            missing.push((f.frame, absent));
            continue;
        }
        packets += f.packets as usize;
        for r in got {
            assert_eq!(
                r.tag.layer, f.layer,
                "{}: frame {} from another layer",
                sub.name, f.frame
            );
            assert_eq!(
                r.marker,
                r.tag.idx + 1 == f.packets,
                "{}: marker bit of frame {} packet {}",
                sub.name,
                f.frame,
                r.tag.idx
            );
            assert_eq!(
                r.ts, got[0].ts,
                "{}: frame {} has two timestamps",
                sub.name, f.frame
            );
        }
        seqs.extend(
            (0..f.packets).filter_map(|i| got.iter().find(|r| r.tag.idx == i).map(|r| r.seq)),
        );
        frame_ts.push((f.frame, got[0].ts));
    }
    assert!(
        missing.is_empty(),
        "{} missed packets of {} of {} frames (frame, packet indexes): {:?}",
        sub.name,
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(10)]
    );
    for w in frame_ts.windows(2) {
        let ((fa, ta), (fb, tb)) = (w[0], w[1]);
        assert_eq!(
            tb.wrapping_sub(ta),
            (fb - fa) * 3000,
            "{}: timestamps of frames {fa} and {fb}",
            sub.name
        );
    }
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0].wrapping_add(1),
            "{}: sequence numbers jump from {} to {}",
            sub.name,
            w[0],
            w[1]
        );
    }
    (frame_ts.len(), packets)
}

/// Checks `sub` got every audio packet in `sent`.
fn assert_every_audio_packet(sub: &SubHandle, sent: &[u32]) {
    let log = lock(&sub.log);
    let got: HashSet<u32> = log.audio.iter().map(|a| a.1).collect();
    let missing: Vec<u32> = sent.iter().copied().filter(|n| !got.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{} missed {} of {} audio packets: {:?}",
        sub.name,
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(10)]
    );
}

fn sent_audio(p: &PubHandle, from: Instant, to: Instant) -> Vec<u32> {
    lock(&p.log)
        .audio
        .iter()
        .filter(|a| a.0 >= from && a.0 < to)
        .map(|a| a.1)
        .collect()
}

/// The plain camera of tests 1 and 2: 30 fps, keyframes 6 packets, others 3 (~650 kbps).
fn camera() -> Vec<LayerSpec> {
    vec![LayerSpec {
        rid: "",
        frame_bytes: 2500,
        key_bytes: 6000,
    }]
}

/// Subscribers first, then a publisher of camera and microphone; waits until every subscriber is
/// connected with both tracks, then lets 300 ms pass. Returns the start of the counted window.
async fn room_with_three_viewers(
    app: &TestApp,
    lossy: Option<usize>,
) -> (PubHandle, Vec<SubHandle>, Instant) {
    let mut subs = Vec::new();
    for (i, name) in ["bob", "carol", "dave"].into_iter().enumerate() {
        let loss = if lossy == Some(i) { 50 } else { 0 };
        subs.push(spawn_subscriber(app, "media", name, loss).await);
    }
    let publisher = spawn_publisher(app, "media", "alice", camera(), true).await;
    let ready = wait_until(
        "three subscribers connected with video and audio",
        CONNECT,
        || subs.iter().all(|s| subscriber_ready(s, 2)),
    )
    .await;
    let connected = lock(&publisher.log).connected_at.unwrap();
    println!(
        "publisher connected after setup; all subscribers ready {:?} later",
        ready - connected
    );
    (publisher, subs, ready + Duration::from_millis(300))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_every_frame() {
    // Real-time media on two cores: one of these at a time, or timing, not the server, decides.
    let _one_at_a_time = SERIAL.lock().await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (publisher, subs, from) = room_with_three_viewers(&app, None).await;
    let to = from + Duration::from_secs(3);
    tokio::time::sleep_until((to + Duration::from_millis(200)).into()).await;
    lock(&publisher.ctl).stop_media = true;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let frames = sent_frames(&publisher, 0, from, to);
    let audio = sent_audio(&publisher, from, to);
    assert!(
        frames.len() >= 80,
        "only {} frames were sent in 3 s",
        frames.len()
    );
    assert!(frames.iter().any(|f| f.key) && frames.iter().any(|f| !f.key));
    for s in &subs {
        let (f, p) = assert_every_frame(s, &frames);
        assert_every_audio_packet(s, &audio);
        let log = lock(&s.log);
        let ssrcs: HashSet<u32> = log.video.iter().map(|r| r.ssrc).collect();
        assert_eq!(ssrcs.len(), 1, "{}: video SSRC changed: {ssrcs:?}", s.name);
        assert!(!ssrcs.contains(&0x5EED_0010), "the publisher's SSRC leaked");
        // From the publisher writing a frame to its last packet reaching this viewer.
        let mut last_arrival: HashMap<u32, Instant> = HashMap::new();
        for r in &log.video {
            let e = last_arrival.entry(r.tag.frame).or_insert(r.at);
            *e = (*e).max(r.at);
        }
        let mut delays: Vec<Duration> = frames
            .iter()
            .map(|f| last_arrival[&f.frame].saturating_duration_since(f.at))
            .collect();
        delays.sort();
        let audio_got = log.audio.iter().filter(|a| audio.contains(&a.1)).count();
        println!(
            "{}: {f}/{} frames ({p} packets), {audio_got}/{} audio packets, {} datagrams in all; \
             frame delay median {:?}, max {:?}",
            s.name,
            frames.len(),
            audio.len(),
            log.datagrams,
            delays[delays.len() / 2],
            delays[delays.len() - 1]
        );
        assert!(
            delays[delays.len() - 1] < Duration::from_secs(1),
            "{}: a frame took {:?} to arrive",
            s.name,
            delays[delays.len() - 1]
        );
    }
    assert_no_problems(&publisher, &subs);
    shut_down(app, publisher, subs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_recovers_lost_packets() {
    // Real-time media on two cores: one of these at a time, or timing, not the server, decides.
    let _one_at_a_time = SERIAL.lock().await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (publisher, subs, from) = room_with_three_viewers(&app, Some(2)).await;
    let to = from + Duration::from_secs(3);
    // Keep sending a while after the window: a lost packet is noticed when a later one arrives.
    tokio::time::sleep_until((to + Duration::from_millis(500)).into()).await;
    lock(&publisher.ctl).stop_media = true;
    tokio::time::sleep(Duration::from_millis(700)).await;

    let frames = sent_frames(&publisher, 0, from, to);
    let audio = sent_audio(&publisher, from, to);
    for s in &subs[..2] {
        assert_every_frame(s, &frames);
        assert_every_audio_packet(s, &audio);
    }
    let lossy = &subs[2];
    let (f, p) = assert_every_frame(lossy, &frames);
    check_repairs(lossy, &audio, (f, frames.len(), p));
    // Operators see it too: the NACKs the server answered are counted on /metrics.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let nacks: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dangjian_sfu_nacks_received_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("NACK counter on /metrics");
    assert!(nacks > 0, "no NACKs counted: {metrics}");
    assert_no_problems(&publisher, &subs);
    shut_down(app, publisher, subs).await;
}

/// Figures of the lossy subscriber's repairs; asserts that losses happened and were repaired
/// by retransmission. `frames` is (complete, sent, packets).
fn check_repairs(lossy: &SubHandle, audio: &[u32], (f, frames_sent, p): (usize, usize, usize)) {
    let log = lock(&lossy.log);
    let video_ssrc = log.video[0].ssrc;
    let rx_at: HashMap<u16, Instant> = log
        .video
        .iter()
        .rev()
        .map(|r| (r.seq, r.at))
        .collect::<HashMap<_, _>>();
    let video_drops: Vec<(Instant, u16)> = log
        .dropped
        .iter()
        .filter(|d| d.3 == video_ssrc)
        .map(|d| (d.0, d.2))
        .collect();
    let rtx_drops = log
        .dropped
        .iter()
        .filter(|d| log.rtx_pts.contains(&d.1))
        .count();
    let mut repair_ms: Vec<u128> = video_drops
        .iter()
        .filter_map(|(at, seq)| {
            rx_at
                .get(seq)
                .map(|r| r.saturating_duration_since(*at).as_millis())
        })
        .collect();
    repair_ms.sort();
    let recovered = repair_ms.len();
    let audio_got: HashSet<u32> = log.audio.iter().map(|a| a.1).collect();
    let audio_lost = audio.iter().filter(|n| !audio_got.contains(n)).count();
    println!(
        "{}: {} datagrams, {} dropped ({} video RTP, {} RTX); {recovered} of the video packets \
         recovered, {} RTX datagrams received; repair time median {} ms, max {} ms; \
         {f}/{} frames, {p} packets complete; audio (no NACK) lost {audio_lost}/{}",
        lossy.name,
        log.datagrams,
        log.dropped.len(),
        video_drops.len(),
        rtx_drops,
        log.rtx_datagrams,
        repair_ms
            .get(repair_ms.len() / 2)
            .copied()
            .unwrap_or_default(),
        repair_ms.last().copied().unwrap_or_default(),
        frames_sent,
        audio.len()
    );
    assert!(
        video_drops.len() >= 5,
        "the lossy link dropped only {} video packets",
        video_drops.len()
    );
    assert!(
        recovered > 0 && log.rtx_datagrams > 0,
        "nothing was retransmitted"
    );
}

/// Three simulcast layers: ~100 kbps, ~400 kbps and ~1.2 Mbps of payload at 30 fps.
fn simulcast() -> Vec<LayerSpec> {
    vec![
        LayerSpec {
            rid: "q",
            frame_bytes: 417,
            key_bytes: 834,
        },
        LayerSpec {
            rid: "h",
            frame_bytes: 1667,
            key_bytes: 3334,
        },
        LayerSpec {
            rid: "f",
            frame_bytes: 5000,
            key_bytes: 10000,
        },
    ]
}

/// The layer of each frame `sub` received, in the order of the arrival of its first packet
/// (a late retransmission does not list a frame again), with that arrival and whether that
/// packet starts a keyframe.
fn frame_layers(sub: &SubHandle) -> Vec<(Instant, u8, bool)> {
    let log = lock(&sub.log);
    let mut out: Vec<(Instant, u8, bool)> = Vec::new();
    let mut seen = HashSet::new();
    for r in &log.video {
        if seen.insert((r.tag.layer, r.tag.frame)) {
            out.push((r.at, r.tag.layer, r.tag.key && r.tag.idx == 0));
        }
    }
    out
}

/// Waits until `sub`'s last 15 frames are all of `layer`; returns the arrival of the first
/// frame of the run of `layer` frames that reaches to the end.
async fn wait_for_layer(sub: &SubHandle, layer: u8, limit: Duration) -> Instant {
    wait_until(
        &format!("{} to receive layer {layer}", sub.name),
        limit,
        || {
            let f = frame_layers(sub);
            f.len() >= 15 && f[f.len() - 15..].iter().all(|x| x.1 == layer)
        },
    )
    .await;
    let f = frame_layers(sub);
    let run = f.iter().rposition(|x| x.1 != layer).map_or(0, |i| i + 1);
    f[run].0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_moves_subscriber_to_low_layer_and_back() {
    // Real-time media on two cores: one of these at a time, or timing, not the server, decides.
    let _one_at_a_time = SERIAL.lock().await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let capped = spawn_subscriber(&app, "sim", "bob", 0).await;
    let free = spawn_subscriber(&app, "sim", "carol", 0).await;
    let publisher = spawn_publisher(&app, "sim", "alice", simulcast(), false).await;
    let subs = vec![capped, free];
    wait_until(
        "both subscribers connected with the video track",
        CONNECT,
        || subs.iter().all(|s| subscriber_ready(s, 1)),
    )
    .await;
    let (capped, free) = (&subs[0], &subs[1]);

    wait_for_layer(capped, 2, CONNECT).await;
    let t_down = Instant::now();
    lock(&capped.ctl).remb_bps = Some(150_000.0);
    let low_from = wait_for_layer(capped, 0, Duration::from_secs(6)).await;
    let down = low_from.saturating_duration_since(t_down);
    // It stays there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        frame_layers(capped)
            .iter()
            .filter(|f| f.0 >= low_from)
            .all(|f| f.1 == 0),
        "the capped subscriber left the low layer while capped"
    );

    let t_up = Instant::now();
    lock(&capped.ctl).remb_bps = Some(5_000_000.0);
    let high_from = wait_for_layer(capped, 2, Duration::from_secs(6)).await;
    let up = high_from.saturating_duration_since(t_up);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lock(&publisher.ctl).stop_media = true;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        frame_layers(capped)
            .iter()
            .filter(|f| f.0 >= high_from)
            .all(|f| f.1 == 2),
        "the subscriber left the high layer again"
    );

    // Every layer change starts with a keyframe, and the stream stays one stream: sequence
    // numbers without holes or repeats, time never going back, every frame complete.
    let frames = frame_layers(capped);
    let mut switches = Vec::new();
    for w in frames.windows(2) {
        if w[0].1 != w[1].1 {
            assert!(w[1].2, "switch {} → {} not at a keyframe", w[0].1, w[1].1);
            switches.push((w[0].1, w[1].1));
        }
    }
    assert_eq!(switches, vec![(2, 0), (0, 2)], "layer changes");
    {
        let log = lock(&capped.log);
        for w in log.video.windows(2) {
            assert_eq!(
                w[1].seq,
                w[0].seq.wrapping_add(1),
                "sequence numbers jump between {:?} and {:?}",
                w[0].tag,
                w[1].tag
            );
            assert!(
                w[1].ts.wrapping_sub(w[0].ts) < 0x8000_0000,
                "timestamp goes back between {:?} and {:?}",
                w[0].tag,
                w[1].tag
            );
        }
        let mut per_frame: HashMap<(u8, u32), (u8, usize)> = HashMap::new();
        for r in &log.video {
            let e = per_frame
                .entry((r.tag.layer, r.tag.frame))
                .or_insert((r.tag.count, 0));
            e.1 += 1;
        }
        let partial: Vec<_> = per_frame
            .iter()
            .filter(|(_, (n, got))| *n as usize != *got)
            .collect();
        assert!(partial.is_empty(), "incomplete frames: {partial:?}");
        assert!(log.rembs > 0);
    }
    let free_layers: BTreeSet<u8> = frame_layers(free).iter().map(|f| f.1).collect();
    assert_eq!(
        free_layers,
        BTreeSet::from([2]),
        "the uncapped subscriber's layers changed"
    );
    let plis = lock(&publisher.log).plis.len();
    let counts = |s: &SubHandle| {
        let mut c = [0usize; 3];
        for f in frame_layers(s) {
            c[f.1 as usize] += 1;
        }
        c
    };
    println!(
        "switch down after REMB 150 kbps: {down:?}; back up after REMB 5 Mbps: {up:?}; \
         {plis} PLIs reached the publisher; frames per layer (q,h,f): capped {:?}, free {:?}",
        counts(capped),
        counts(free)
    );
    assert_no_problems(&publisher, &subs);
    shut_down(app, publisher, subs).await;
}

/// What the narrow link of the next test lets through: more than the low layer, less than the
/// middle one.
const CAP_BPS: u64 = 300_000;

/// The capped subscriber's video in sequence-number order (repairs in their place, duplicates
/// once). Checks that it is one stream: every hole is a packet the narrow link dropped (never a
/// number the server skipped), time never goes back, a frame's packets share one timestamp and
/// the last carries the marker, and every change of layer lands on a keyframe (where the packets
/// around it arrived). From frame
/// `strict_from` on there must be no hole at all, and a layer change must follow the last packet
/// of the old layer directly with the first packet of the new one's keyframe. Returns (packets,
/// holes, incomplete frames, layer changes as (frame, from, to)).
fn check_one_stream(
    sub: &SubHandle,
    strict_from: u32,
) -> (usize, usize, usize, Vec<(u32, u8, u8)>) {
    let log = lock(&sub.log);
    let ssrc = log.video[0].ssrc;
    let base = log.video[0].seq;
    let mut by_seq: std::collections::BTreeMap<u16, VideoRx> = Default::default();
    for r in &log.video {
        assert_eq!(r.ssrc, ssrc, "{}: video SSRC changed", sub.name);
        by_seq.entry(r.seq.wrapping_sub(base)).or_insert(*r);
    }
    let dropped: HashSet<u16> = log
        .dropped
        .iter()
        .filter(|d| d.3 == ssrc)
        .map(|d| d.2)
        .collect();
    let v: Vec<&VideoRx> = by_seq.values().collect();
    let mut holes = 0;
    let mut changes = Vec::new();
    for w in v.windows(2) {
        let (a, b) = (w[0], w[1]);
        let gap = b.seq.wrapping_sub(a.seq) - 1;
        holes += gap as usize;
        for i in 1..=gap {
            let seq = a.seq.wrapping_add(i);
            assert!(
                dropped.contains(&seq) && b.tag.frame < strict_from,
                "{}: sequence number {seq} (between {:?} and {:?}) never arrived and was not \
                 dropped by the link",
                sub.name,
                a.tag,
                b.tag
            );
        }
        assert!(
            b.ts.wrapping_sub(a.ts) < 0x8000_0000,
            "{}: timestamp goes back between {:?} and {:?}",
            sub.name,
            a.tag,
            b.tag
        );
        if (a.tag.layer, a.tag.frame) == (b.tag.layer, b.tag.frame) {
            assert_eq!(
                a.ts, b.ts,
                "{}: frame {:?} has two timestamps",
                sub.name, b.tag
            );
        }
        if a.tag.layer != b.tag.layer {
            changes.push((b.tag.frame, a.tag.layer, b.tag.layer));
            // After a hole the new layer's keyframe may be what the link dropped.
            assert!(
                gap > 0 || (b.tag.key && b.tag.idx == 0),
                "{}: switch {} → {} not at a keyframe: {:?}",
                sub.name,
                a.tag.layer,
                b.tag.layer,
                b.tag
            );
            if b.tag.frame >= strict_from {
                assert!(
                    gap == 0 && b.tag.idx == 0 && a.tag.idx + 1 == a.tag.count,
                    "{}: switch {} → {} between {:?} and {:?}",
                    sub.name,
                    a.tag.layer,
                    b.tag.layer,
                    a.tag,
                    b.tag
                );
            }
        }
    }
    let mut per_frame: HashMap<(u8, u32), (u8, usize)> = HashMap::new();
    for r in &v {
        assert_eq!(
            r.marker,
            r.tag.idx + 1 == r.tag.count,
            "{}: marker bit of {:?}",
            sub.name,
            r.tag
        );
        per_frame
            .entry((r.tag.layer, r.tag.frame))
            .or_insert((r.tag.count, 0))
            .1 += 1;
    }
    let partial: BTreeSet<(u32, u8)> = per_frame
        .iter()
        .filter(|(_, (n, got))| *n as usize != *got)
        .map(|(k, _)| (k.1, k.0))
        .collect();
    let late: Vec<_> = partial.iter().filter(|f| f.0 >= strict_from).collect();
    assert!(
        late.is_empty(),
        "{}: incomplete frames (frame, layer) once on the low layer: {late:?}",
        sub.name
    );
    (v.len(), holes, partial.len(), changes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "flaky (about 1 run in 10): without hysteresis the GCC estimate can dip after the cap is lifted and move the subscriber off the high layer again; run with --ignored until layer allocation gets hysteresis"]
async fn twcc_bandwidth_cap_moves_subscriber_to_low_layer_and_back() {
    // Real-time media on two cores: one of these at a time, or timing, not the server, decides.
    let _one_at_a_time = SERIAL.lock().await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    // A browser asks for a lost packet a limited number of times (libwebrtc: 10). The rtc
    // client's default keeps asking every 100 ms while the packet is in its 512-packet window:
    // after a second or two of heavy loss, ~8 Mbps of retransmissions (mostly duplicates) kept
    // coming for 10-15 s after the link was free again, and held the estimate down.
    let capped = spawn_subscriber_on(
        &app,
        "twcc",
        "bob",
        0,
        Endpoint::with(|addr| bounded_nack_client(addr, 10)).await,
    )
    .await;
    let free = spawn_subscriber(&app, "twcc", "carol", 0).await;
    let publisher = spawn_publisher(&app, "twcc", "alice", simulcast(), false).await;
    let subs = vec![capped, free];
    wait_until(
        "both subscribers connected with the video track",
        CONNECT,
        || subs.iter().all(|s| subscriber_ready(s, 1)),
    )
    .await;
    let (capped, free) = (&subs[0], &subs[1]);
    wait_for_layer(capped, 2, CONNECT).await;

    // No REMB: the server knows the link only from the transport-wide feedback.
    let t_cap = Instant::now();
    lock(&capped.ctl).rate_limit_bps = Some(CAP_BPS);
    let hold = Duration::from_secs(2);
    let t_held = wait_until(
        "the capped subscriber to stay 2 s on the low layer",
        Duration::from_secs(15),
        || {
            let f = frame_layers(capped);
            let run = f.iter().rposition(|x| x.1 != 0).map_or(0, |i| i + 1);
            f.get(run)
                .is_some_and(|x| x.0 > t_cap && x.0.elapsed() >= hold)
        },
    )
    .await;
    let t_lift = Instant::now();
    lock(&capped.ctl).rate_limit_bps = None;
    let (low_from, low_frame) = {
        let f = frame_layers(capped);
        let run = f.iter().rposition(|x| x.1 != 0).map_or(0, |i| i + 1);
        let at = f[run].0;
        let log = lock(&capped.log);
        let first = log.video.iter().find(|r| r.at == at && r.tag.layer == 0);
        (at, first.unwrap().tag.frame)
    };
    let down = low_from.saturating_duration_since(t_cap);
    // Share of the RTP datagrams the link dropped: (until the low layer, while on it).
    let loss = {
        let log = lock(&capped.log);
        let pct = |from: Instant, to: Instant| {
            let within = |t: Instant| t >= from && t < to;
            let all = log.rtp_in.iter().filter(|r| within(r.0)).count();
            let lost = log.dropped.iter().filter(|d| within(d.0)).count();
            lost * 100 / all.max(1)
        };
        (pct(t_cap, low_from), pct(low_from, t_lift))
    };

    let high_from = wait_for_layer(capped, 2, Duration::from_secs(20)).await;
    let up = high_from.saturating_duration_since(t_lift);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lock(&publisher.ctl).stop_media = true;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let capped_frames = frame_layers(capped);
    assert!(
        capped_frames
            .iter()
            .filter(|f| f.0 >= low_from && f.0 < t_held)
            .all(|f| f.1 == 0),
        "the capped subscriber left the low layer while capped"
    );
    assert!(
        capped_frames
            .iter()
            .filter(|f| f.0 >= high_from)
            .all(|f| f.1 == 2),
        "the subscriber left the high layer again"
    );
    assert_eq!(
        lock(&capped.log).rembs,
        0,
        "the capped subscriber sent REMB"
    );

    let (packets, holes, partial, changes) = check_one_stream(capped, low_frame);
    let ups: Vec<(u8, u8)> = changes
        .iter()
        .filter(|c| c.0 > low_frame)
        .map(|c| (c.1, c.2))
        .collect();
    assert!(
        ups.first().is_some_and(|c| c.0 == 0) && ups.last().is_some_and(|c| c.1 == 2),
        "layer changes after the cap was lifted: {ups:?}"
    );
    let free_layers: BTreeSet<u8> = frame_layers(free).iter().map(|f| f.1).collect();
    assert_eq!(
        free_layers,
        BTreeSet::from([2]),
        "the uncapped subscriber's layers changed"
    );
    let (free_packets, free_holes, free_partial, _) = check_one_stream(free, 0);
    assert_eq!(
        (free_holes, free_partial),
        (0, 0),
        "the uncapped subscriber lost packets"
    );
    let plis = lock(&publisher.log).plis.len();
    println!(
        "cap {} kbps: the link dropped {}% of the RTP datagrams until the low layer, {}% on \
         it; low layer {down:?} after the cap (held 2 s, lifted {:?} after the cap); back on \
         the high layer {up:?} after the lift; layer changes (frame, from, to): {changes:?}; \
         capped: {packets} packets, {holes} lost for good, {partial} frames incomplete (all \
         before the low layer); free: {free_packets} packets; {plis} PLIs reached the publisher",
        CAP_BPS / 1000,
        loss.0,
        loss.1,
        t_lift - t_cap
    );
    assert_no_problems(&publisher, &subs);
    shut_down(app, publisher, subs).await;
}
