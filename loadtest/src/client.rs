//! The light clients: a publisher (synthetic simulcast camera and microphone) and a subscriber
//! (receives whatever the server offers and measures it). Each is one task driving one `rtc`
//! peer connection on its own socket; they talk to the server only through a [`Link`].

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use tokio::sync::watch;

use crate::endpoint::Endpoint;
use crate::media::{
    AUDIO_INTERVAL, FRAME_INTERVAL, KEYFRAME_EVERY, LayerSpec, clock_us, opus_packet, rtp_fields,
    rtpmaps, sdp_mids, sent_us, vp8_frame,
};
use crate::target::{Down, Link, Up};

/// The longest a client sleeps without looking at its stop signal and timers.
const IDLE: Duration = Duration::from_millis(50);

/// What a publisher did, read by the reporter while it runs.
#[derive(Default)]
pub struct PubCounters {
    pub connected: AtomicBool,
    pub packets: AtomicU64,
    pub write_errors: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub problem: Mutex<Option<String>>,
}

/// What a subscriber received, read by the reporter while it runs.
#[derive(Default)]
pub struct SubCounters {
    pub connected: AtomicBool,
    /// RTP datagrams and their bytes, retransmissions included.
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub retransmissions: AtomicU64,
    /// Over the original (non-RTX) streams: packets the sequence numbers say were sent, and
    /// those that arrived the first time.
    pub expected: AtomicU64,
    pub received: AtomicU64,
    pub video_frames: AtomicU64,
    /// Lost packets this client asked for again (counted in its outgoing NACKs).
    pub nacks: Arc<AtomicU64>,
    /// The video streams' RFC 3550 interarrival jitter, µs (the largest of them).
    pub jitter_us: AtomicU64,
    /// From asking to join until the first whole frame (video) or first packet (audio only),
    /// µs; 0 until then.
    pub join_us: AtomicU64,
    /// Where the join time went (µs after asking, 0 until then): the server's offer, the
    /// connection up, the first media packet.
    pub offer_us: AtomicU64,
    pub connected_us: AtomicU64,
    pub first_packet_us: AtomicU64,
    /// One-way delay samples (µs), taken by the reporter every second.
    pub latency_us: Mutex<Vec<u32>>,
    pub problem: Mutex<Option<String>>,
}

fn note(slot: &Mutex<Option<String>>, what: String) {
    let mut p = slot.lock().unwrap_or_else(|e| e.into_inner());
    p.get_or_insert(what);
}

/// Notes why the client stops (the server failed it, or signaling ended) and returns it as the
/// error it stops with.
fn ended(slot: &Mutex<Option<String>>, why: String) -> anyhow::Error {
    note(slot, why.clone());
    anyhow::anyhow!(why)
}

// ---------------------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------------------

pub struct PublisherSpec {
    /// Empty: audio only.
    pub layers: Vec<LayerSpec>,
    pub audio: bool,
}

struct Negotiated {
    video_pt: u8,
    audio_pt: u8,
    mid_ext: Option<u8>,
    rid_ext: Option<u8>,
}

struct Publisher {
    ep: Endpoint,
    link: Link,
    stats: Arc<PubCounters>,
    layers: Vec<LayerSpec>,
    ssrcs: Vec<u32>,
    seqs: Vec<u16>,
    key_pending: Vec<bool>,
    video: Option<RTCRtpSenderId>,
    audio: Option<(RTCRtpSenderId, u32)>,
    audio_seq: u16,
    video_mid: Bytes,
    negotiated: Option<Negotiated>,
    media_start: Option<Instant>,
    next_frame: u32,
    next_audio: u32,
}

/// Starts a publisher on `ip`; it offers at once and sends media from the moment it connects
/// until `stop` turns true.
pub async fn spawn_publisher(
    ip: IpAddr,
    link: Link,
    spec: PublisherSpec,
    seed: u32,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Arc<PubCounters>> {
    let mut ep = Endpoint::bind(ip, Arc::default()).await?;
    let ssrcs: Vec<u32> = (0..spec.layers.len() as u32)
        .map(|i| seed.wrapping_mul(0x9E37_79B1).wrapping_add(i + 1))
        .collect();
    let video = if spec.layers.is_empty() {
        None
    } else {
        let encodings = spec
            .layers
            .iter()
            .zip(&ssrcs)
            .map(|(l, ssrc)| RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    rid: l.rid.into(),
                    ssrc: Some(*ssrc),
                    ..Default::default()
                },
                codec: sfu::engine::vp8(),
                ..Default::default()
            })
            .collect();
        Some(
            ep.pc
                .add_track(MediaStreamTrack::new(
                    format!("stream-{seed}"),
                    format!("camera-{seed}"),
                    "camera".into(),
                    RtpCodecKind::Video,
                    encodings,
                ))
                .map_err(|e| anyhow::anyhow!("video track: {e}"))?,
        )
    };
    let audio = if spec.audio {
        let ssrc = seed.wrapping_mul(0x85EB_CA6B) | 1;
        let sender = ep
            .pc
            .add_track(MediaStreamTrack::new(
                format!("stream-{seed}"),
                format!("microphone-{seed}"),
                "microphone".into(),
                RtpCodecKind::Audio,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: sfu::engine::opus(),
                    ..Default::default()
                }],
            ))
            .map_err(|e| anyhow::anyhow!("audio track: {e}"))?;
        Some((sender, ssrc))
    } else {
        None
    };
    let stats = Arc::new(PubCounters::default());
    let n = spec.layers.len();
    let p = Publisher {
        ep,
        link,
        stats: stats.clone(),
        layers: spec.layers,
        ssrcs,
        seqs: (0..n).map(|i| 1000 + 20_000 * i as u16).collect(),
        key_pending: vec![true; n],
        video,
        audio,
        audio_seq: 500,
        video_mid: Bytes::new(),
        negotiated: None,
        media_start: None,
        next_frame: 0,
        next_audio: 0,
    };
    tokio::spawn(async move {
        if let Err(e) = p.run(stop).await {
            // Also seen by the reporter through `problem`.
            tracing::debug!("publisher ended: {e}");
        }
    });
    Ok(stats)
}

impl Publisher {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let offer = self.ep.pc.create_offer(None)?;
        self.ep
            .pc
            .set_local_description(Instant::now(), offer.clone())?;
        let mut tracks = Vec::new();
        for (kind, mid) in sdp_mids(&offer.sdp) {
            let source = if kind == "video" {
                self.video_mid = Bytes::from(mid.clone());
                "camera"
            } else {
                "microphone"
            };
            tracks.push((mid, source.to_string()));
        }
        self.link.up.send(Up::Offer {
            sdp: offer.sdp,
            tracks,
        })?;
        let mut buf = vec![0u8; 2048];
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let now = Instant::now();
            self.send_due_media(now);
            self.ep.fire_timers(now);
            self.drain(now);
            self.ep.flush();
            let mut wake = now + IDLE;
            if let Some(start) = self.media_start {
                if self.video.is_some() {
                    wake = wake.min(start + FRAME_INTERVAL * self.next_frame);
                }
                if self.audio.is_some() {
                    wake = wake.min(start + AUDIO_INTERVAL * self.next_audio);
                }
            }
            let wake = self.ep.deadline(wake);
            tokio::select! {
                r = self.ep.sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        let now = Instant::now();
                        self.ep.feed(now, from, &buf[..n]);
                        while let Ok((n, from)) = self.ep.sock.try_recv_from(&mut buf) {
                            self.ep.feed(now, from, &buf[..n]);
                        }
                    }
                }
                m = self.link.down.recv() => match m {
                    Some(Down::Answer { sdp }) => self.on_answer(sdp)?,
                    Some(Down::Offer { .. }) => {}
                    Some(Down::Failed(e)) => {
                        return Err(ended(&self.stats.problem, format!("server: {e}")));
                    }
                    None => return Err(ended(&self.stats.problem, "signaling ended".into())),
                },
                _ = stop.changed() => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn on_answer(&mut self, sdp: String) -> anyhow::Result<()> {
        let answer = RTCSessionDescription::answer(sdp)?;
        if let Err(e) = self.ep.pc.set_remote_description(Instant::now(), answer) {
            note(&self.stats.problem, format!("cannot apply the answer: {e}"));
            anyhow::bail!("cannot apply the answer: {e}");
        }
        let pc = &mut self.ep.pc;
        let video_pt = self
            .video
            .map_or(Some(0), |s| payload_type(pc, s, MIME_TYPE_VP8));
        let audio_pt = self
            .audio
            .map_or(Some(0), |(s, _)| payload_type(pc, s, MIME_TYPE_OPUS));
        let (Some(video_pt), Some(audio_pt)) = (video_pt, audio_pt) else {
            note(&self.stats.problem, "VP8 or Opus not negotiated".into());
            anyhow::bail!("VP8 or Opus not negotiated");
        };
        let exts = self
            .video
            .and_then(|s| pc.rtp_sender(s))
            .map(|mut s| s.get_parameters().rtp_parameters.header_extensions.clone())
            .unwrap_or_default();
        let ext = |uri: &str| exts.iter().find(|e| e.uri == uri).map(|e| e.id as u8);
        self.negotiated = Some(Negotiated {
            video_pt,
            audio_pt,
            mid_ext: ext("urn:ietf:params:rtp-hdrext:sdes:mid"),
            rid_ext: ext("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"),
        });
        Ok(())
    }

    fn drain(&mut self, now: Instant) {
        while let Some(ev) = self.ep.pc.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                match s {
                    RTCPeerConnectionState::Connected => {
                        self.stats.connected.store(true, Ordering::Relaxed);
                        self.media_start.get_or_insert(now);
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        self.stats.connected.store(false, Ordering::Relaxed);
                        note(&self.stats.problem, format!("publisher connection {s}"));
                    }
                    _ => {}
                }
            }
        }
        while let Some(m) = self.ep.pc.poll_read() {
            if let RTCMessage::RtcpPacket(_, pkts) = m.message {
                for p in &pkts {
                    let ssrc = if let Some(pli) = p.as_any().downcast_ref::<PictureLossIndication>()
                    {
                        Some(pli.media_ssrc)
                    } else {
                        p.as_any()
                            .downcast_ref::<FullIntraRequest>()
                            .map(|f| f.media_ssrc)
                    };
                    if let Some(ssrc) = ssrc {
                        self.stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                        if let Some(l) = self.ssrcs.iter().position(|s| *s == ssrc) {
                            self.key_pending[l] = true;
                        }
                    }
                }
            }
        }
    }

    /// Sends every frame and audio packet whose time has come.
    fn send_due_media(&mut self, now: Instant) {
        let (Some(start), true) = (self.media_start, self.negotiated.is_some()) else {
            return;
        };
        while self.video.is_some() && start + FRAME_INTERVAL * self.next_frame <= now {
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
        let (Some(neg), Some(video)) = (self.negotiated.as_ref(), self.video) else {
            return;
        };
        let key = frame.is_multiple_of(KEYFRAME_EVERY) || self.key_pending[layer];
        self.key_pending[layer] = false;
        let spec = &self.layers[layer];
        let bytes = if key {
            spec.key_bytes
        } else {
            spec.frame_bytes
        };
        let payloads = vp8_frame(layer as u8, frame, key, bytes, clock_us(now));
        let count = payloads.len();
        let simulcast = !spec.rid.is_empty();
        let rid = Bytes::from_static(spec.rid.as_bytes());
        let mut sent = 0;
        for (i, payload) in payloads.into_iter().enumerate() {
            let seq = self.seqs[layer];
            self.seqs[layer] = seq.wrapping_add(1);
            let mut header = rtc::rtp::header::Header {
                version: 2,
                marker: i + 1 == count,
                payload_type: neg.video_pt,
                sequence_number: seq,
                timestamp: 0x1234_5678u32
                    .wrapping_mul(layer as u32 + 1)
                    .wrapping_add(frame * 3000),
                ssrc: self.ssrcs[layer],
                ..Default::default()
            };
            if simulcast {
                if let Some(id) = neg.mid_ext {
                    let _ = header.set_extension(id, self.video_mid.clone());
                }
                if let Some(id) = neg.rid_ext {
                    let _ = header.set_extension(id, rid.clone());
                }
            }
            let ok = self.ep.pc.rtp_sender(video).is_some_and(|mut s| {
                s.write_rtp(now, rtc::rtp::Packet { header, payload })
                    .is_ok()
            });
            if ok {
                sent += 1;
            } else {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.packets.fetch_add(sent, Ordering::Relaxed);
    }

    fn send_audio(&mut self, now: Instant, n: u32) {
        let (Some((sender, ssrc)), Some(neg)) = (self.audio, self.negotiated.as_ref()) else {
            return;
        };
        let seq = self.audio_seq;
        self.audio_seq = seq.wrapping_add(1);
        let pkt = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                payload_type: neg.audio_pt,
                sequence_number: seq,
                timestamp: 777u32.wrapping_add(n * 960),
                ssrc,
                ..Default::default()
            },
            payload: opus_packet(n, clock_us(now)),
        };
        let ok = self
            .ep
            .pc
            .rtp_sender(sender)
            .is_some_and(|mut s| s.write_rtp(now, pkt).is_ok());
        let counter = if ok {
            &self.stats.packets
        } else {
            &self.stats.write_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn payload_type(pc: &mut RTCPeerConnection, sender: RTCRtpSenderId, mime: &str) -> Option<u8> {
    pc.rtp_sender(sender)?
        .get_parameters()
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
}

// ---------------------------------------------------------------------------------------------
// Subscriber
// ---------------------------------------------------------------------------------------------

/// One received original stream (an SSRC): loss from its sequence numbers, jitter from its
/// timestamps.
struct StreamRx {
    ssrc: u32,
    clock_hz: u32,
    video: bool,
    first: i64,
    highest: i64,
    /// (arrival µs, RTP timestamp) of the previous packet, for the jitter estimate.
    prev: (u64, u32),
    /// RFC 3550 jitter, in clock units.
    jitter: f64,
}

impl StreamRx {
    /// Takes one packet; returns how many more packets are now expected.
    fn on_packet(&mut self, seq: u16, ts: u32, arrival_us: u64) -> u64 {
        let ext = self.highest + i64::from(seq.wrapping_sub(self.highest as u16) as i16);
        // Packets of one frame share a timestamp and leave together: only frame starts count.
        if ts != self.prev.1 {
            let transit_delta = (arrival_us as i64 - self.prev.0 as i64) as f64
                - f64::from(ts.wrapping_sub(self.prev.1) as i32) * 1e6 / f64::from(self.clock_hz);
            self.jitter +=
                (transit_delta.abs() * f64::from(self.clock_hz) / 1e6 - self.jitter) / 16.0;
            self.prev = (arrival_us, ts);
        }
        if ext > self.highest {
            let more = (ext - self.highest) as u64;
            self.highest = ext;
            more
        } else if ext < self.first {
            let more = (self.first - ext) as u64;
            self.first = ext;
            more
        } else {
            0
        }
    }

    fn jitter_us(&self) -> u64 {
        (self.jitter * 1e6 / f64::from(self.clock_hz)) as u64
    }
}

struct Subscriber {
    ep: Endpoint,
    link: Link,
    stats: Arc<SubCounters>,
    asked_at: Instant,
    /// From the last offer: retransmission payload types, clock rate per payload type, video
    /// payload types.
    rtx_pts: HashSet<u8>,
    clock: Vec<(u8, u32)>,
    video_pts: HashSet<u8>,
    has_video: bool,
    streams: Vec<StreamRx>,
    keyframe_seen: HashSet<u32>,
    audio_packets: u64,
}

/// Starts a subscriber on `ip` that answers the server's offers and measures what arrives.
/// `asked_at` is when its participant asked to join (the start of its join time).
pub async fn spawn_subscriber(
    ip: IpAddr,
    link: Link,
    asked_at: Instant,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Arc<SubCounters>> {
    let stats = Arc::new(SubCounters::default());
    let ep = Endpoint::bind(ip, stats.nacks.clone()).await?;
    let s = Subscriber {
        ep,
        link,
        stats: stats.clone(),
        asked_at,
        rtx_pts: HashSet::new(),
        clock: Vec::new(),
        video_pts: HashSet::new(),
        has_video: false,
        streams: Vec::new(),
        keyframe_seen: HashSet::new(),
        audio_packets: 0,
    };
    tokio::spawn(async move {
        if let Err(e) = s.run(stop).await {
            tracing::debug!("subscriber ended: {e}");
        }
    });
    Ok(stats)
}

impl Subscriber {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 2048];
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let now = Instant::now();
            self.ep.fire_timers(now);
            self.drain(now);
            self.ep.flush();
            let wake = self.ep.deadline(now + IDLE);
            tokio::select! {
                r = self.ep.sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        let now = Instant::now();
                        self.intake(now, from, &buf[..n]);
                        while let Ok((n, from)) = self.ep.sock.try_recv_from(&mut buf) {
                            self.intake(now, from, &buf[..n]);
                        }
                    }
                }
                m = self.link.down.recv() => match m {
                    Some(Down::Offer { sdp }) => self.on_offer(sdp)?,
                    Some(Down::Answer { .. }) => {}
                    Some(Down::Failed(e)) => {
                        return Err(ended(&self.stats.problem, format!("server: {e}")));
                    }
                    None => return Err(ended(&self.stats.problem, "signaling ended".into())),
                },
                _ = stop.changed() => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Notes when a stage of joining was reached, the first time.
    fn stage(&self, slot: &AtomicU64, now: Instant) {
        if slot.load(Ordering::Relaxed) == 0 {
            let us = now.saturating_duration_since(self.asked_at).as_micros() as u64;
            slot.store(us.max(1), Ordering::Relaxed);
        }
    }

    fn on_offer(&mut self, sdp: String) -> anyhow::Result<()> {
        self.stage(&self.stats.offer_us, Instant::now());
        for (pt, rate, name) in rtpmaps(&sdp) {
            match name.as_str() {
                "rtx" => {
                    self.rtx_pts.insert(pt);
                }
                "vp8" | "h264" | "vp9" | "av1" => {
                    self.video_pts.insert(pt);
                    self.has_video = true;
                }
                _ => {}
            }
            if !self.clock.iter().any(|(p, _)| *p == pt) {
                self.clock.push((pt, rate));
            }
        }
        let now = Instant::now();
        let answer = self
            .ep
            .pc
            .set_remote_description(now, RTCSessionDescription::offer(sdp)?)
            .and_then(|()| self.ep.pc.create_answer(None))
            .and_then(|a| {
                self.ep.pc.set_local_description(now, a.clone())?;
                Ok(a)
            });
        match answer {
            Ok(a) => {
                self.link.up.send(Up::Answer { sdp: a.sdp })?;
                Ok(())
            }
            Err(e) => {
                note(&self.stats.problem, format!("cannot answer the offer: {e}"));
                anyhow::bail!("cannot answer the offer: {e}")
            }
        }
    }

    /// One datagram: counted from its clear header, then handed to the peer connection.
    fn intake(&mut self, now: Instant, from: std::net::SocketAddr, data: &[u8]) {
        if let Some((pt, seq, ts, ssrc)) = rtp_fields(data) {
            self.stage(&self.stats.first_packet_us, now);
            let s = &self.stats;
            s.packets.fetch_add(1, Ordering::Relaxed);
            s.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            if self.rtx_pts.contains(&pt) {
                s.retransmissions.fetch_add(1, Ordering::Relaxed);
            } else {
                self.count_original(now, pt, seq, ts, ssrc);
            }
        }
        self.ep.feed(now, from, data);
    }

    fn count_original(&mut self, now: Instant, pt: u8, seq: u16, ts: u32, ssrc: u32) {
        let arrival = clock_us(now);
        let i = match self.streams.iter().position(|s| s.ssrc == ssrc) {
            Some(i) => i,
            None => {
                let clock_hz = self
                    .clock
                    .iter()
                    .find(|(p, _)| *p == pt)
                    .map_or(90_000, |(_, r)| *r);
                self.streams.push(StreamRx {
                    ssrc,
                    clock_hz,
                    video: self.video_pts.contains(&pt),
                    first: i64::from(seq),
                    highest: i64::from(seq),
                    prev: (arrival, ts),
                    jitter: 0.0,
                });
                self.stats.expected.fetch_add(1, Ordering::Relaxed);
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let st = &mut self.streams[i];
        let more = st.on_packet(seq, ts, arrival);
        let stats = &self.stats;
        stats.expected.fetch_add(more, Ordering::Relaxed);
        stats.received.fetch_add(1, Ordering::Relaxed);
        if st.video {
            let worst = self
                .streams
                .iter()
                .filter(|s| s.video)
                .map(StreamRx::jitter_us)
                .max()
                .unwrap_or(0);
            stats.jitter_us.store(worst, Ordering::Relaxed);
        }
    }

    fn drain(&mut self, now: Instant) {
        while let Some(ev) = self.ep.pc.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                match s {
                    RTCPeerConnectionState::Connected => {
                        self.stats.connected.store(true, Ordering::Relaxed);
                        self.stage(&self.stats.connected_us, now);
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        self.stats.connected.store(false, Ordering::Relaxed);
                        note(&self.stats.problem, format!("subscriber connection {s}"));
                    }
                    _ => {}
                }
            }
        }
        while let Some(m) = self.ep.pc.poll_read() {
            if let RTCMessage::RtpPacket(_, pkt) = m.message {
                self.on_media(now, &pkt);
            }
        }
    }

    /// A decrypted packet: frames, join time, one-way delay.
    fn on_media(&mut self, now: Instant, pkt: &rtc::rtp::Packet) {
        let video = self.video_pts.contains(&pkt.header.payload_type);
        let stats = &self.stats;
        let first_frame = if video {
            if sfu::forwarder::vp8_keyframe_start(&pkt.payload) {
                self.keyframe_seen.insert(pkt.header.ssrc);
            }
            let whole = pkt.header.marker && self.keyframe_seen.contains(&pkt.header.ssrc);
            if whole {
                stats.video_frames.fetch_add(1, Ordering::Relaxed);
                self.sample_delay(now, &pkt.payload);
            }
            whole
        } else {
            self.audio_packets += 1;
            if self.audio_packets.is_multiple_of(10) {
                self.sample_delay(now, &pkt.payload);
            }
            !self.has_video
        };
        if first_frame && stats.join_us.load(Ordering::Relaxed) == 0 {
            let took = now.saturating_duration_since(self.asked_at).as_micros() as u64;
            stats.join_us.store(took.max(1), Ordering::Relaxed);
        }
    }

    fn sample_delay(&self, now: Instant, payload: &[u8]) {
        if let Some(sent) = sent_us(payload) {
            let d = clock_us(now).saturating_sub(sent).min(u64::from(u32::MAX)) as u32;
            let mut l = self
                .stats
                .latency_us
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if l.len() < 10_000 {
                l.push(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> StreamRx {
        StreamRx {
            ssrc: 1,
            clock_hz: 90_000,
            video: true,
            first: 65_530,
            highest: 65_530,
            prev: (0, 0),
            jitter: 0.0,
        }
    }

    #[test]
    fn loss_across_the_wrap() {
        let mut s = stream();
        let mut expected = 1;
        for (i, seq) in [65_531u16, 65_533, 2, 3].into_iter().enumerate() {
            expected += s.on_packet(seq, 3000 * (i as u32 + 1), 33_333 * (i as u64 + 1));
        }
        // 65530..=3 is 10 packets; 5 arrived.
        assert_eq!(expected, 10);
        // A late packet from before the highest adds nothing.
        assert_eq!(s.on_packet(65_535, 1, 200_000), 0);
    }

    #[test]
    fn steady_stream_has_no_jitter_and_a_late_frame_some() {
        let mut s = stream();
        for i in 1..100u32 {
            s.on_packet(
                65_530u16.wrapping_add(i as u16),
                i * 3000,
                u64::from(i) * 33_333,
            );
        }
        assert!(s.jitter_us() < 100, "{}", s.jitter_us());
        s.on_packet(100, 100 * 3000, 100 * 33_333 + 20_000);
        assert!(s.jitter_us() > 1000, "{}", s.jitter_us());
    }
}
