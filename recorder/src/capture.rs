//! The capture client: a hidden, subscribe-only participant that receives every track of a room
//! over WebRTC (the async `webrtc` crate), reassembles frames and spools a segment per track
//! every [`SEGMENT_SECONDS`](crate::SEGMENT_SECONDS).
//!
//! Timing: each frame's presentation time is its RTP timestamp, anchored to the wall-clock
//! arrival of the track's first frame relative to the start of the recording. The publisher's
//! RTP clock keeps the spacing exact; the anchor puts tracks from different people on one
//! timeline (to within the network delay difference, a few milliseconds on a LAN).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::network_type::NetworkType;
use rtc::rtp;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};

use crate::segment::{self, Codec, Frame, Kind, TrackMeta};
use crate::spool::Spool;

/// A frame still missing packets this long after its first one arrived is given up.
const FRAME_PATIENCE: Duration = Duration::from_millis(500);
const CONNECT: Duration = Duration::from_secs(10);

/// What one capture needs.
pub struct Capture {
    pub id: String,
    /// `ws://…/rtc?access_token=…&codecs=h264,vp8`.
    pub url: String,
    pub spool: Spool,
    /// Time zero of the recording.
    pub started: Instant,
    pub segment: Duration,
}

/// What a finished capture saw.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub tracks: Vec<TrackMeta>,
    pub frames: u64,
}

#[derive(Default)]
struct Shared {
    /// producer id → source, from the signaling messages.
    sources: HashMap<String, String>,
    tasks: Vec<JoinHandle<(TrackMeta, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Pc = Arc<dyn PeerConnection>;

/// Runs until `stop` turns true or the room closes. Every frame received is in the spool when
/// it returns.
pub async fn run(c: Capture, mut stop: watch::Receiver<bool>) -> Result<Summary, String> {
    let (mut ws, _) = tokio::time::timeout(CONNECT, tokio_tungstenite::connect_async(&c.url))
        .await
        .map_err(|_| "timed out connecting to the room".to_string())?
        .map_err(|e| format!("cannot join the room: {e}"))?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let pc = peer_connection(&c, shared.clone()).await?;
    let mut ended = None;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Err(e) = on_signal(&mut ws, &pc, &shared, &t).await {
                        ended = Some(e);
                        break;
                    }
                }
                Some(Ok(_)) => {}
                _ => break, // the room closed
            },
        }
    }
    let _ = ws
        .send(Message::text(json!({"type": "leave"}).to_string()))
        .await;
    let _ = pc.close().await;
    let _ = ws.close(None).await;
    let tasks = std::mem::take(&mut lock(&shared).tasks);
    let mut summary = Summary::default();
    for t in tasks {
        if let Ok((meta, frames)) = t.await {
            summary.tracks.push(meta);
            summary.frames += frames;
        }
    }
    match ended {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Applies one signaling message; an error ends the capture.
async fn on_signal(ws: &mut Ws, pc: &Pc, shared: &Mutex<Shared>, text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("bad message: {e}"))?;
    match v["type"].as_str().unwrap_or_default() {
        "joined" => {
            for p in v["participants"].as_array().into_iter().flatten() {
                note_sources(shared, &p["tracks"]);
            }
        }
        "participant_joined" | "participant_updated" => {
            note_sources(shared, &v["participant"]["tracks"]);
        }
        "track_published" => note_sources(shared, &json!([v["track"]])),
        "offer" => {
            let sdp = loopback_candidates(v["sdp"].as_str().unwrap_or_default());
            let answer = async {
                pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
                    .await?;
                let a = pc.create_answer(None).await?;
                pc.set_local_description(a.clone()).await?;
                webrtc::error::Result::Ok(a)
            }
            .await
            .map_err(|e| format!("cannot answer the room's offer: {e}"))?;
            ws.send(Message::text(
                json!({"type": "answer", "sdp": answer.sdp}).to_string(),
            ))
            .await
            .map_err(|e| format!("signaling: {e}"))?;
        }
        "closed" => return Err(format!("the room ended: {}", v["reason"])),
        _ => {}
    }
    Ok(())
}

fn note_sources(shared: &Mutex<Shared>, tracks: &Value) {
    let mut s = lock(shared);
    for t in tracks.as_array().into_iter().flatten() {
        if let (Some(id), Some(source)) = (t["id"].as_str(), t["source"].as_str()) {
            s.sources.insert(id.into(), source.into());
        }
    }
}

/// The recorder runs on the server itself: whatever address the SFU advertises to browsers, it
/// also listens on loopback (it binds the wildcard address), so the recorder's one UDP socket on
/// 127.0.0.1 talks to it there. TCP candidates are dropped: the recorder speaks UDP.
fn loopback_candidates(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("a=candidate:") {
            let mut f: Vec<&str> = rest.trim_end().split(' ').collect();
            if f.len() < 6 || !f[2].eq_ignore_ascii_case("udp") {
                continue;
            }
            f[4] = "127.0.0.1";
            out.push_str("a=candidate:");
            out.push_str(&f.join(" "));
            out.push_str("\r\n");
        } else {
            out.push_str(line);
        }
    }
    out
}

struct Handler {
    shared: Arc<Mutex<Shared>>,
    spool: Spool,
    id: String,
    started: Instant,
    segment: Duration,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let producer = track.track_id().await.to_string();
        let participant = track.stream_id().await.to_string();
        let source = lock(&self.shared).sources.get(&producer).cloned();
        let writer = TrackWriter {
            id: self.id.clone(),
            spool: self.spool.clone(),
            producer,
            participant,
            source,
            started: self.started,
            segment: self.segment,
        };
        let task = tokio::spawn(writer.run(track));
        lock(&self.shared).tasks.push(task);
    }
}

async fn peer_connection(c: &Capture, shared: Arc<Mutex<Shared>>) -> Result<Pc, String> {
    let err = |e: webrtc::error::Error| format!("cannot set up WebRTC: {e}");
    let mut me = MediaEngine::default();
    me.register_default_codecs().map_err(err)?;
    let registry = register_default_interceptors(Registry::new(), &mut me).map_err(err)?;
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
            shared,
            spool: c.spool.clone(),
            id: c.id.clone(),
            started: c.started,
            segment: c.segment,
        }))
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await
        .map_err(err)?;
    Ok(Arc::new(pc))
}

/// Receives one track and spools its segments.
struct TrackWriter {
    id: String,
    spool: Spool,
    producer: String,
    participant: String,
    source: Option<String>,
    started: Instant,
    segment: Duration,
}

impl TrackWriter {
    async fn run(self, track: Arc<dyn TrackRemote>) -> (TrackMeta, u64) {
        let mut meta: Option<TrackMeta> = None;
        let mut asm: Option<Assembler> = None;
        let mut pending: Vec<Frame> = Vec::new();
        let (mut seq, mut frames) = (0u32, 0u64);
        let mut tick = tokio::time::interval(self.segment);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = track.poll() => {
                    let Some(ev) = ev else { break };
                    let TrackRemoteEvent::OnRtpPacket(pkt) = ev else { continue };
                    if asm.is_none() {
                        let Some(codec) = self.codec(&track, pkt.header.ssrc).await else { continue };
                        meta = Some(self.meta(codec));
                        asm = Some(Assembler::new(codec, self.started));
                    }
                    if let Some(a) = asm.as_mut() {
                        a.push(pkt, Instant::now(), &mut pending);
                    }
                }
                _ = tick.tick() => {
                    frames += self.flush(meta.as_ref(), &mut seq, &mut pending).await;
                }
            }
        }
        if let Some(a) = asm.as_mut() {
            a.finish(&mut pending);
        }
        frames += self.flush(meta.as_ref(), &mut seq, &mut pending).await;
        (meta.unwrap_or_else(|| self.meta(Codec::Opus)), frames)
    }

    async fn codec(&self, track: &Arc<dyn TrackRemote>, ssrc: u32) -> Option<Codec> {
        let mime = track.codec(ssrc).await?.mime_type.to_ascii_lowercase();
        match mime.as_str() {
            "audio/opus" => Some(Codec::Opus),
            "video/vp8" => Some(Codec::Vp8),
            "video/h264" => Some(Codec::H264),
            _ => None,
        }
    }

    fn meta(&self, codec: Codec) -> TrackMeta {
        let kind = if codec == Codec::Opus {
            Kind::Audio
        } else {
            Kind::Video
        };
        let default = if kind == Kind::Audio {
            "microphone"
        } else {
            "camera"
        };
        TrackMeta {
            track: self.producer.clone(),
            participant: self.participant.clone(),
            kind,
            source: self.source.clone().unwrap_or_else(|| default.into()),
            codec,
        }
    }

    async fn flush(
        &self,
        meta: Option<&TrackMeta>,
        seq: &mut u32,
        pending: &mut Vec<Frame>,
    ) -> u64 {
        let Some(meta) = meta.filter(|_| !pending.is_empty()) else {
            return 0;
        };
        let bytes = segment::encode(meta, *seq, pending);
        let key = crate::segment_key(&self.id, &meta.track, *seq);
        if let Err(e) = self.spool.put(&key, bytes).await {
            tracing::error!(key, error = %e, "cannot spool a segment; its frames are lost");
        }
        *seq += 1;
        let n = pending.len() as u64;
        pending.clear();
        n
    }
}

/// A frame being put together from its packets.
struct Partial {
    packets: BTreeMap<i64, rtp::Packet>,
    arrival: Instant,
}

/// Puts RTP packets back into frames (reordering, waiting for retransmissions a while) and
/// stamps them on the recording's timeline.
pub struct Assembler {
    codec: Codec,
    clock_rate: f64,
    started: Instant,
    last_seq: Option<i64>,
    last_ts: Option<i64>,
    frames: BTreeMap<i64, Partial>,
    /// (extended timestamp, µs since the start) of the first frame.
    anchor: Option<(i64, i64)>,
    /// Timestamps at or before this were emitted or given up.
    done_ts: Option<i64>,
}

fn extend(last: &mut Option<i64>, value: i64, modulus: i64) -> i64 {
    let ext = match *last {
        None => value,
        Some(l) => {
            let base = l - l.rem_euclid(modulus);
            [base - modulus, base, base + modulus]
                .into_iter()
                .map(|b| b + value)
                .min_by_key(|c| (c - l).abs())
                .unwrap_or(value)
        }
    };
    if last.is_none_or(|l| ext > l) {
        *last = Some(ext);
    }
    ext
}

impl Assembler {
    /// An assembler for one track of `codec`; `started` is time zero of the recording.
    pub fn new(codec: Codec, started: Instant) -> Assembler {
        Assembler {
            codec,
            clock_rate: if codec == Codec::Opus {
                48_000.0
            } else {
                90_000.0
            },
            started,
            last_seq: None,
            last_ts: None,
            frames: BTreeMap::new(),
            anchor: None,
            done_ts: None,
        }
    }

    /// Takes one packet that arrived at `now`; frames it completes are appended to `out`.
    pub fn push(&mut self, pkt: rtp::Packet, now: Instant, out: &mut Vec<Frame>) {
        let seq = extend(
            &mut self.last_seq,
            i64::from(pkt.header.sequence_number),
            1 << 16,
        );
        let ts = extend(&mut self.last_ts, i64::from(pkt.header.timestamp), 1 << 32);
        if self.done_ts.is_some_and(|d| ts <= d) || pkt.payload.is_empty() {
            return; // late duplicate, or padding
        }
        self.frames
            .entry(ts)
            .or_insert_with(|| Partial {
                packets: BTreeMap::new(),
                arrival: now,
            })
            .packets
            .insert(seq, pkt);
        self.emit(now, out);
    }

    /// The track ended: appends every complete frame still held to `out`.
    pub fn finish(&mut self, out: &mut Vec<Frame>) {
        let far = self.started + Duration::from_secs(1 << 30);
        self.emit(far, out);
    }

    /// Emits frames in timestamp order: complete ones, and incomplete ones given up after
    /// [`FRAME_PATIENCE`] (dropped).
    fn emit(&mut self, now: Instant, out: &mut Vec<Frame>) {
        while let Some((&ts, first)) = self.frames.first_key_value() {
            let complete = self.complete(first);
            if !complete && now.saturating_duration_since(first.arrival) < FRAME_PATIENCE {
                return;
            }
            let Some((_, partial)) = self.frames.pop_first() else {
                return;
            };
            self.done_ts = Some(ts);
            if complete && let Some(f) = self.frame(ts, partial) {
                out.push(f);
            }
        }
    }

    fn complete(&self, p: &Partial) -> bool {
        if self.codec == Codec::Opus {
            return true;
        }
        let (Some((&first, head)), Some((&last, tail))) =
            (p.packets.first_key_value(), p.packets.last_key_value())
        else {
            return false;
        };
        let starts = match self.codec {
            Codec::Vp8 => head.payload.first().is_some_and(|b| b & 0x10 != 0),
            _ => true,
        };
        starts && tail.header.marker && (last - first + 1) as usize == p.packets.len()
    }

    fn frame(&mut self, ts: i64, p: Partial) -> Option<Frame> {
        let (data, keyframe) = match self.codec {
            Codec::Opus => {
                let pkt = p.packets.into_values().next()?;
                (pkt.payload, false)
            }
            Codec::Vp8 => {
                let keyframe = p
                    .packets
                    .values()
                    .next()
                    .is_some_and(|k| sfu::forwarder::vp8_keyframe_start(&k.payload));
                let mut out = BytesMut::new();
                for k in p.packets.values() {
                    out.extend_from_slice(vp8_payload(&k.payload)?);
                }
                (out.freeze(), keyframe)
            }
            Codec::H264 => {
                let mut d = H264Packet::default();
                let keyframe = p
                    .packets
                    .values()
                    .any(|k| sfu::forwarder::h264_keyframe_start(&k.payload));
                (depacketize(&mut d, p.packets.values())?, keyframe)
            }
        };
        let arrival_us = p
            .arrival
            .saturating_duration_since(self.started)
            .as_micros() as i64;
        let (ts0, us0) = *self.anchor.get_or_insert((ts, arrival_us));
        let pts_us = us0 + ((ts - ts0) as f64 * 1e6 / self.clock_rate).round() as i64;
        Some(Frame {
            pts_us,
            keyframe,
            data,
        })
    }
}

/// The VP8 data after the RFC 7741 payload descriptor.
fn vp8_payload(p: &[u8]) -> Option<&[u8]> {
    let first = *p.first()?;
    let mut i = 1;
    if first & 0x80 != 0 {
        let x = *p.get(i)?;
        i += 1;
        if x & 0x80 != 0 {
            i += if *p.get(i)? & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    p.get(i..)
}

fn depacketize<'a>(
    d: &mut dyn Depacketizer,
    packets: impl Iterator<Item = &'a rtp::Packet>,
) -> Option<Bytes> {
    let mut out = BytesMut::new();
    for p in packets {
        out.extend_from_slice(&d.depacketize(&p.payload).ok()?);
    }
    (!out.is_empty()).then(|| out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u16, ts: u32, marker: bool, payload: &[u8]) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                sequence_number: seq,
                timestamp: ts,
                marker,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn reordered_vp8_packets_make_whole_frames_on_the_rtp_clock() {
        let t0 = Instant::now();
        let mut a = Assembler::new(Codec::Vp8, t0);
        let mut out = Vec::new();
        let at = t0 + Duration::from_millis(100);
        // Frame 1 (keyframe): S=1 descriptor then a key header; second packet arrives first.
        a.push(
            packet(65535, 4_294_960_000, true, &[0x00, 0xBB]),
            at,
            &mut out,
        );
        assert!(out.is_empty());
        a.push(
            packet(65534, 4_294_960_000, false, &[0x10, 0x00, 0xAA]),
            at,
            &mut out,
        );
        // Frame 2 wraps both counters: 3000 ticks later = 33.3 ms.
        a.push(
            packet(0, 4_294_963_000u32.wrapping_add(0), true, &[0x10, 0x01]),
            at,
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert!(out[0].keyframe && !out[1].keyframe);
        assert_eq!(&out[0].data[..], &[0x00, 0xAA, 0xBB]);
        assert_eq!(out[0].pts_us, 100_000);
        assert_eq!(out[1].pts_us - out[0].pts_us, 33_333);
    }

    #[test]
    fn a_frame_missing_a_packet_is_dropped_after_a_while_and_later_ones_flow() {
        let t0 = Instant::now();
        let mut a = Assembler::new(Codec::Vp8, t0);
        let mut out = Vec::new();
        a.push(packet(10, 0, false, &[0x10, 0x00]), t0, &mut out); // its tail never comes
        a.push(packet(12, 3000, true, &[0x10, 0x01]), t0, &mut out);
        assert!(out.is_empty(), "waits for the missing packet");
        a.push(
            packet(13, 6000, true, &[0x10, 0x01]),
            t0 + FRAME_PATIENCE,
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].pts_us - out[0].pts_us, 33_333);
    }

    #[test]
    fn candidates_are_moved_to_loopback_and_tcp_ones_dropped() {
        let sdp = "v=0\r\na=candidate:1 1 udp 2130706431 203.0.113.5 7882 typ host\r\na=candidate:2 1 tcp 1 203.0.113.5 7882 typ host tcptype passive\r\na=end\r\n";
        assert_eq!(
            loopback_candidates(sdp),
            "v=0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 7882 typ host\r\na=end\r\n"
        );
    }
}
