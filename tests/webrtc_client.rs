//! Media end to end through the real server with the async `webrtc` crate as the clients: each
//! peer connection binds one UDP socket on 127.0.0.1 and gathers only that host candidate, and
//! signaling goes over the `/rtc` WebSocket as `docs/protocol.md` describes. A publisher sends
//! synthetic VP8 (several packets per frame, the marker on the last, a keyframe every second)
//! and Opus; two subscribers must get every frame and every audio packet.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::rtc::{Ws, join, sdp_candidates, sdp_mids, ws_send};
use common::{Backend, TestApp};
use futures_util::StreamExt;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::network_type::NetworkType;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder, register_default_interceptors,
};
use webrtc::rtp_transceiver::RtpSender;

type Pc = Arc<dyn PeerConnection>;
type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// How long connecting (signaling, ICE, DTLS, first packets) may take.
const CONNECT: Duration = Duration::from_secs(10);
/// The longest a client loop sleeps, so that it notices the test's instructions quickly.
const IDLE: Duration = Duration::from_millis(5);
const FRAME_INTERVAL: Duration = Duration::from_micros(33_333);
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Every `KEYFRAME_EVERY`th frame is a keyframe (once a second at 30 fps).
const KEYFRAME_EVERY: u32 = 30;
/// Payload bytes of a keyframe (6 packets) and of any other frame (3 packets).
const KEY_BYTES: usize = 6000;
const FRAME_BYTES: usize = 2500;
const VIDEO_SSRC: u32 = 0x5EED_0010;
const AUDIO_SSRC: u32 = 0x5EED_0A0D;
const VIDEO_MAGIC: u8 = 0xD3;
const AUDIO_MAGIC: u8 = 0xA5;
/// Video trailer: magic, layer, frame (4), packet index, packets in the frame, keyframe, magic.
const VIDEO_TRAILER: usize = 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Synthetic media (as in media_e2e.rs)
// ---------------------------------------------------------------------------------------------

/// What the publisher wrote at the end of every video packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    frame: u32,
    idx: u8,
    count: u8,
    key: bool,
}

/// The RTP payloads of one VP8 frame of `bytes` payload bytes in all: an RFC 7741 payload
/// descriptor on each (S=1 on the first), the VP8 frame header on the first (with the keyframe
/// start code and a 640x480 size on keyframes), filler, and a [`Tag`] at the end.
fn vp8_frame(frame: u32, key: bool, bytes: usize) -> Vec<Bytes> {
    loadtest::media::vp8_payloads(frame, key, bytes, (640, 480), |idx, count| {
        let mut t = vec![VIDEO_MAGIC, 0];
        t.extend_from_slice(&frame.to_be_bytes());
        t.extend_from_slice(&[idx as u8, count as u8, u8::from(key), VIDEO_MAGIC]);
        t
    })
}

fn video_tag(p: &[u8]) -> Option<Tag> {
    let t = p.get(p.len().checked_sub(VIDEO_TRAILER)?..)?;
    (t[0] == VIDEO_MAGIC && t[9] == VIDEO_MAGIC).then(|| Tag {
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
// Signaling (as in media_e2e.rs)
// ---------------------------------------------------------------------------------------------

/// Records the problem unless every candidate in `sdp` is on 127.0.0.1.
fn check_loopback(what: &str, sdp: &str, problems: &mut Vec<String>) {
    problems.extend(
        sdp_candidates(sdp)
            .into_iter()
            .filter(|c| !c.starts_with("127.0.0.1:"))
            .map(|c| format!("{what} candidate {c}")),
    );
}

// ---------------------------------------------------------------------------------------------
// `webrtc` peer connections
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

/// What a client's peer connection reported.
#[derive(Default)]
struct ClientLog {
    connected_at: Option<Instant>,
    gathered: bool,
    /// How many tracks each offer it answered carried (subscribers).
    answered: Vec<usize>,
    video: Vec<VideoRx>,
    audio: Vec<(Instant, u32)>,
    problems: Vec<String>,
}

/// The event handler: connection and gathering state, and for a subscriber every RTP packet of
/// every remote track (read by a task of its own, so the driver never waits for the test).
struct Handler {
    name: String,
    log: Arc<Mutex<ClientLog>>,
}

// `async_trait`'s expansion, written out: the crate is not a dependency of the tests.
impl PeerConnectionEventHandler for Handler {
    fn on_ice_gathering_state_change<'a, 'b>(&'a self, state: RTCIceGatheringState) -> BoxFuture<'b>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            if state == RTCIceGatheringState::Complete {
                lock(&self.log).gathered = true;
            }
        })
    }

    fn on_connection_state_change<'a, 'b>(&'a self, state: RTCPeerConnectionState) -> BoxFuture<'b>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let mut log = lock(&self.log);
            match state {
                RTCPeerConnectionState::Connected => {
                    log.connected_at.get_or_insert_with(Instant::now);
                }
                // Closing at the end of the test is fine; failing, or closing early, is not.
                RTCPeerConnectionState::Failed => {
                    log.problems
                        .push(format!("{} connection failed", self.name));
                }
                RTCPeerConnectionState::Closed if log.connected_at.is_none() => {
                    log.problems
                        .push(format!("{} closed before connecting", self.name));
                }
                _ => {}
            }
        })
    }

    fn on_track<'a, 'b>(&'a self, track: Arc<dyn TrackRemote>) -> BoxFuture<'b>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let log = self.log.clone();
            tokio::spawn(async move {
                while let Some(ev) = track.poll().await {
                    let TrackRemoteEvent::OnRtpPacket(pkt) = ev else {
                        continue;
                    };
                    let now = Instant::now();
                    let mut log = lock(&log);
                    if let Some(tag) = video_tag(&pkt.payload) {
                        log.video.push(VideoRx {
                            at: now,
                            ssrc: pkt.header.ssrc,
                            seq: pkt.header.sequence_number,
                            ts: pkt.header.timestamp,
                            marker: pkt.header.marker,
                            tag,
                        });
                    } else if let Some(n) = audio_number(&pkt.payload) {
                        log.audio.push((now, n));
                    } else {
                        log.problems
                            .push(format!("unrecognised packet: {:?}", pkt.header));
                    }
                }
            });
        })
    }
}

/// A peer connection with the default codecs and interceptors (NACK, RTX, reports, TWCC) and a
/// single host candidate: one UDP socket on 127.0.0.1, no mDNS, no other interface.
async fn peer_connection(name: &str, log: Arc<Mutex<ClientLog>>) -> Pc {
    let mut me = MediaEngine::default();
    me.register_default_codecs().unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut me).unwrap();
    let settings = SettingEngineBuilder::new()
        .with_network_types(vec![NetworkType::Udp4])
        .with_include_loopback_candidate(true)
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(Handler {
            name: name.into(),
            log,
        }))
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await
        .unwrap();
    Arc::new(pc)
}

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

// ---------------------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct SentFrame {
    at: Instant,
    frame: u32,
    packets: u8,
    key: bool,
}

#[derive(Default)]
struct Sent {
    frames: Vec<SentFrame>,
    audio: Vec<(Instant, u32)>,
    write_errors: u64,
}

struct Client {
    name: String,
    log: Arc<Mutex<ClientLog>>,
    quit: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

struct PubClient {
    client: Client,
    sent: Arc<Mutex<Sent>>,
    stop_media: Arc<AtomicBool>,
}

fn payload_type(params: &rtc::rtp_transceiver::rtp_sender::RTCRtpSendParameters, mime: &str) -> u8 {
    params
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
        .unwrap_or_else(|| panic!("{mime} was not negotiated"))
}

fn local_track(
    kind: RtpCodecKind,
    id: &str,
    ssrc: u32,
    codec: RTCRtpCodec,
) -> Arc<TrackLocalStaticRTP> {
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
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
    )))
}

/// Joins, publishes camera and microphone, and once connected sends a frame every 33 ms and an
/// audio packet every 20 ms until told to stop.
async fn spawn_publisher(app: &TestApp, room: &str, identity: &str) -> PubClient {
    let mut ws = join(app, room, identity, "publish").await;
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let pc = peer_connection(identity, log.clone()).await;
    let video = local_track(RtpCodecKind::Video, "camera-track", VIDEO_SSRC, vp8());
    let audio = local_track(RtpCodecKind::Audio, "microphone-track", AUDIO_SSRC, opus());
    let video_sender = pc.add_track(video.clone()).await.unwrap();
    let audio_sender = pc.add_track(audio.clone()).await.unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer).await.unwrap();
    wait_until("the publisher's ICE gathering", CONNECT, || {
        lock(&log).gathered
    })
    .await;
    let offer = pc.local_description().await.unwrap();
    assert_eq!(
        sdp_candidates(&offer.sdp)
            .into_iter()
            .collect::<BTreeSet<_>>()
            .len(),
        1,
        "the offer should carry exactly one candidate: {}",
        offer.sdp
    );
    check_loopback("offer", &offer.sdp, &mut lock(&log).problems);
    let tracks: Vec<Value> = sdp_mids(&offer.sdp)
        .into_iter()
        .map(|(kind, mid)| {
            let source = if kind == "video" {
                "camera"
            } else {
                "microphone"
            };
            json!({"mid": mid, "source": source})
        })
        .collect();
    ws_send(
        &mut ws,
        json!({"type": "offer", "sdp": offer.sdp, "tracks": tracks}),
    )
    .await;
    let sent = Arc::new(Mutex::new(Sent::default()));
    let quit = Arc::new(AtomicBool::new(false));
    let stop_media = Arc::new(AtomicBool::new(false));
    let p = Publisher {
        ws,
        pc,
        log: log.clone(),
        sent: sent.clone(),
        quit: quit.clone(),
        stop_media: stop_media.clone(),
        video,
        audio,
        video_sender,
        audio_sender,
        pts: None,
    };
    PubClient {
        client: Client {
            name: identity.into(),
            log,
            quit,
            task: tokio::spawn(p.run()),
        },
        sent,
        stop_media,
    }
}

struct Publisher {
    ws: Ws,
    pc: Pc,
    log: Arc<Mutex<ClientLog>>,
    sent: Arc<Mutex<Sent>>,
    quit: Arc<AtomicBool>,
    stop_media: Arc<AtomicBool>,
    video: Arc<TrackLocalStaticRTP>,
    audio: Arc<TrackLocalStaticRTP>,
    video_sender: Arc<dyn RtpSender>,
    audio_sender: Arc<dyn RtpSender>,
    /// (VP8, Opus) payload types, once the answer is applied.
    pts: Option<(u8, u8)>,
}

impl Publisher {
    async fn run(mut self) {
        let mut start: Option<Instant> = None;
        let (mut next_frame, mut next_audio) = (0u32, 0u32);
        let (mut video_seq, mut audio_seq) = (1000u16, 500u16);
        while !self.quit.load(Ordering::Relaxed) {
            let now = Instant::now();
            let live = self.pts.is_some()
                && lock(&self.log).connected_at.is_some()
                && !self.stop_media.load(Ordering::Relaxed);
            let mut wake = now + IDLE;
            if live && let Some((video_pt, audio_pt)) = self.pts {
                let start = *start.get_or_insert(now);
                while start + FRAME_INTERVAL * next_frame <= now {
                    let frame = next_frame;
                    next_frame += 1;
                    let key = frame.is_multiple_of(KEYFRAME_EVERY);
                    let payloads = vp8_frame(frame, key, if key { KEY_BYTES } else { FRAME_BYTES });
                    let count = payloads.len();
                    let mut errors = 0;
                    for (i, payload) in payloads.into_iter().enumerate() {
                        let header = rtc::rtp::header::Header {
                            version: 2,
                            marker: i + 1 == count,
                            payload_type: video_pt,
                            sequence_number: video_seq,
                            timestamp: 0x1234_5678u32.wrapping_add(frame * 3000),
                            ssrc: VIDEO_SSRC,
                            ..Default::default()
                        };
                        video_seq = video_seq.wrapping_add(1);
                        let pkt = rtc::rtp::Packet { header, payload };
                        if self.video.write_rtp(pkt).await.is_err() {
                            errors += 1;
                        }
                    }
                    let mut sent = lock(&self.sent);
                    sent.write_errors += errors;
                    sent.frames.push(SentFrame {
                        at: now,
                        frame,
                        packets: count as u8,
                        key,
                    });
                }
                while start + AUDIO_INTERVAL * next_audio <= now {
                    let n = next_audio;
                    next_audio += 1;
                    let pkt = rtc::rtp::Packet {
                        header: rtc::rtp::header::Header {
                            version: 2,
                            payload_type: audio_pt,
                            sequence_number: audio_seq,
                            timestamp: 777u32.wrapping_add(n * 960),
                            ssrc: AUDIO_SSRC,
                            ..Default::default()
                        },
                        payload: opus_packet(n),
                    };
                    audio_seq = audio_seq.wrapping_add(1);
                    let ok = self.audio.write_rtp(pkt).await.is_ok();
                    let mut sent = lock(&self.sent);
                    sent.write_errors += u64::from(!ok);
                    sent.audio.push((now, n));
                }
                wake = wake
                    .min(start + FRAME_INTERVAL * next_frame)
                    .min(start + AUDIO_INTERVAL * next_audio);
            }
            tokio::select! {
                m = self.ws.next() => match m {
                    Some(Ok(Message::Text(t))) => self.on_signal(&t).await,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => {
                        lock(&self.log).problems.push(format!("publisher WebSocket ended: {other:?}"));
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        let _ = self.pc.close().await;
        let _ = self.ws.close(None).await;
    }

    async fn on_signal(&mut self, text: &str) {
        let v: Value = serde_json::from_str(text).unwrap();
        match v["type"].as_str().unwrap_or_default() {
            "answer" => {
                let sdp = v["sdp"].as_str().unwrap().to_string();
                check_loopback("answer", &sdp, &mut lock(&self.log).problems);
                let desc = RTCSessionDescription::answer(sdp).unwrap();
                if let Err(e) = self.pc.set_remote_description(desc).await {
                    lock(&self.log)
                        .problems
                        .push(format!("cannot apply the answer: {e}"));
                    return;
                }
                let video = self.video_sender.get_parameters().await.unwrap();
                let audio = self.audio_sender.get_parameters().await.unwrap();
                self.pts = Some((
                    payload_type(&video, MIME_TYPE_VP8),
                    payload_type(&audio, MIME_TYPE_OPUS),
                ));
            }
            "error" => lock(&self.log).problems.push(format!("server error: {v}")),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriber
// ---------------------------------------------------------------------------------------------

/// Joins and answers every offer of the subscriber connection.
async fn spawn_subscriber(app: &TestApp, room: &str, identity: &str) -> Client {
    let mut ws = join(app, room, identity, "subscribe").await;
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let pc = peer_connection(identity, log.clone()).await;
    let quit = Arc::new(AtomicBool::new(false));
    let (task_log, task_quit) = (log.clone(), quit.clone());
    let task = tokio::spawn(async move {
        while !task_quit.load(Ordering::Relaxed) {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => answer(&mut ws, &pc, &task_log, &t).await,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => {
                        lock(&task_log).problems.push(format!("subscriber WebSocket ended: {other:?}"));
                        break;
                    }
                },
                _ = tokio::time::sleep(IDLE) => {}
            }
        }
        let local = pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .unwrap_or_default();
        let candidates: BTreeSet<String> = sdp_candidates(&local).into_iter().collect();
        if candidates.len() != 1 {
            lock(&task_log)
                .problems
                .push(format!("answer candidates {candidates:?}, not one"));
        }
        check_loopback("answer", &local, &mut lock(&task_log).problems);
        let _ = pc.close().await;
        let _ = ws.close(None).await;
    });
    Client {
        name: identity.into(),
        log,
        quit,
        task,
    }
}

async fn answer(ws: &mut Ws, pc: &Pc, log: &Mutex<ClientLog>, text: &str) {
    let v: Value = serde_json::from_str(text).unwrap();
    match v["type"].as_str().unwrap_or_default() {
        "offer" => {
            let sdp = v["sdp"].as_str().unwrap().to_string();
            let tracks = v["tracks"].as_array().map_or(0, Vec::len);
            check_loopback("offer", &sdp, &mut lock(log).problems);
            let result = async {
                pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
                    .await?;
                let a = pc.create_answer(None).await?;
                pc.set_local_description(a.clone()).await?;
                webrtc::error::Result::Ok(a)
            }
            .await;
            match result {
                Ok(a) => {
                    ws_send(ws, json!({"type": "answer", "sdp": a.sdp})).await;
                    lock(log).answered.push(tracks);
                }
                Err(e) => lock(log).problems.push(format!("cannot answer: {e}")),
            }
        }
        "error" => lock(log).problems.push(format!("server error: {v}")),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Checks that `sub` got every packet of every frame in `sent` with the marker on the last, the
/// frame's packets sharing one timestamp and frames 3000 ticks apart, and sequence numbers
/// without a hole. Returns the worst delay from sending a frame to its last packet arriving.
fn assert_every_frame(sub: &Client, sent: &[SentFrame]) -> Duration {
    let log = lock(&sub.log);
    let mut by_frame: HashMap<u32, Vec<&VideoRx>> = HashMap::new();
    for rx in &log.video {
        by_frame.entry(rx.tag.frame).or_default().push(rx);
    }
    let ssrcs: HashSet<u32> = log.video.iter().map(|r| r.ssrc).collect();
    assert_eq!(ssrcs.len(), 1, "{}: video SSRCs {ssrcs:?}", sub.name);
    let mut missing = Vec::new();
    let mut seqs: Vec<u16> = Vec::new();
    let mut frame_ts: Vec<(u32, u32)> = Vec::new();
    let mut worst = Duration::ZERO;
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
        for r in got {
            assert_eq!(
                (r.tag.count, r.tag.key),
                (f.packets, f.key),
                "{}: frame {} packet {}",
                sub.name,
                f.frame,
                r.tag.idx
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
            worst = worst.max(r.at.saturating_duration_since(f.at));
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
    worst
}

fn assert_every_audio_packet(sub: &Client, sent: &[u32]) {
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

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_crate_clients_exchange_every_frame() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut subs = Vec::new();
    for name in ["bob", "carol"] {
        subs.push(spawn_subscriber(&app, "webrtc", name).await);
    }
    let publisher = spawn_publisher(&app, "webrtc", "alice").await;
    let ready = wait_until(
        "both subscribers connected with video and audio",
        CONNECT,
        || {
            subs.iter().all(|s| {
                let log = lock(&s.log);
                log.connected_at.is_some() && log.answered.last() == Some(&2)
            })
        },
    )
    .await;
    assert!(lock(&publisher.client.log).connected_at.is_some());
    let from = ready + Duration::from_millis(300);
    let to = from + Duration::from_secs(3);
    tokio::time::sleep_until((to + Duration::from_millis(200)).into()).await;
    publisher.stop_media.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (frames, audio, write_errors) = {
        let sent = lock(&publisher.sent);
        let frames: Vec<SentFrame> = sent
            .frames
            .iter()
            .filter(|f| f.at >= from && f.at < to)
            .copied()
            .collect();
        let audio: Vec<u32> = sent
            .audio
            .iter()
            .filter(|a| a.0 >= from && a.0 < to)
            .map(|a| a.1)
            .collect();
        (frames, audio, sent.write_errors)
    };
    assert_eq!(write_errors, 0, "the publisher's write_rtp failed");
    assert!(
        frames.len() >= 80,
        "only {} frames sent in 3 s",
        frames.len()
    );
    assert!(
        audio.len() >= 130,
        "only {} audio packets sent in 3 s",
        audio.len()
    );
    assert!(frames.iter().any(|f| f.key) && frames.iter().any(|f| !f.key));
    for s in &subs {
        let worst = assert_every_frame(s, &frames);
        assert_every_audio_packet(s, &audio);
        println!(
            "{}: {} frames and {} audio packets, all there; slowest frame {worst:?}",
            s.name,
            frames.len(),
            audio.len()
        );
        assert!(
            worst < Duration::from_secs(1),
            "{}: a frame took {worst:?}",
            s.name
        );
    }

    let clients: Vec<Client> = std::iter::once(publisher.client).chain(subs).collect();
    for c in &clients {
        c.quit.store(true, Ordering::Relaxed);
    }
    let mut logs = Vec::new();
    for c in clients {
        tokio::time::timeout(CONNECT, c.task)
            .await
            .unwrap_or_else(|_| panic!("{} did not stop", c.name))
            .unwrap();
        logs.push((c.name, c.log));
    }
    for (name, log) in &logs {
        let log = lock(log);
        assert!(log.problems.is_empty(), "{name}: {:?}", log.problems);
    }
    app.stop().await;
}
