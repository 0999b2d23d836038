//! Janus through the load tool's adapter, end to end: makes a network namespace, starts Janus in
//! it, creates a VideoRoom room, joins two publishers (one plain VP8 camera, one with three
//! simulcast layers; both with Opus) whose offers come from real `rtc` peer connections on the
//! host end of the veth, sends a few seconds of synthetic media, and joins a subscriber that
//! answers Janus's offer and counts what arrives, per layer. Then tears everything down.
//!
//! Run as root (network namespaces), with Janus installed (`scripts/install-janus`):
//! `cargo run -p loadtest --example janus_probe`. Exits non-zero, saying why, on any failure.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use loadtest::janus::Janus;
use loadtest::netns::{Netns, launch_janus};
use loadtest::target::{Down, JoinSpec, Link, Target, Up};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::net::UdpSocket;

const TOTAL_LIMIT: Duration = Duration::from_secs(55);
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
/// How long the publishers send media once connected.
const MEDIA_FOR: Duration = Duration::from_secs(8);
const IDLE: Duration = Duration::from_millis(5);
const FRAME_INTERVAL: Duration = Duration::from_micros(33_333);
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
const MAX_PAYLOAD: usize = 1100;
const KEYFRAME_EVERY: u32 = 30;
const VIDEO_MAGIC: u8 = 0xD3;
const AUDIO_MAGIC: u8 = 0xA5;
const VIDEO_TRAILER: usize = 10;
const ROOM: &str = "janus-probe";

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("janus_probe: FAILED: run as root (it creates a network namespace)");
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, bin] = args.as_slice()
        && flag == "--dangjian"
    {
        return dangjian_check(&rt, std::path::Path::new(bin));
    }
    let log = std::env::temp_dir().join("janus-probe.log");
    let started = Instant::now();
    let result = (|| -> anyhow::Result<bool> {
        let ns = Netns::create("djprobe")?;
        println!(
            "namespace {}: host {} ({}), namespace {} ({})",
            ns.name, ns.host_ip, ns.host_if, ns.ns_ip, ns.ns_if
        );
        let server = launch_janus(&ns, &log)?;
        println!(
            "janus running: pid {} (same pid as the `ip netns exec` child: {}), API http://{}/janus, log {}",
            server.pid,
            std::fs::read_to_string(format!("/proc/{}/comm", server.pid))
                .unwrap_or_default()
                .trim(),
            server.http,
            log.display()
        );
        let ok = rt.block_on(async {
            tokio::time::timeout(TOTAL_LIMIT, probe(server.http, ns.host_ip))
                .await
                .map_err(|_| anyhow!("the probe took over {} s", TOTAL_LIMIT.as_secs()))?
        });
        // Give the session destroys spawned by the participants' drops a moment.
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
        drop(server);
        drop(ns);
        ok
    })();
    println!("(took {:.1} s)", started.elapsed().as_secs_f64());
    match result {
        Ok(true) => {
            println!("janus_probe: OK");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!(
                "janus_probe: FAILED (see above; Janus's log: {})",
                log.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("janus_probe: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--dangjian BIN`: only checks that [`loadtest::netns::launch_dangjian`] starts our server in
/// a namespace (health, token key, stop).
fn dangjian_check(rt: &tokio::runtime::Runtime, bin: &std::path::Path) -> ExitCode {
    let log = std::env::temp_dir().join("dangjian-probe.log");
    let r = (|| -> anyhow::Result<()> {
        let ns = Netns::create("djprobe")?;
        let server = loadtest::netns::launch_dangjian(&ns, bin, &log)?;
        let key = server.token_key_hex.clone().unwrap_or_default();
        println!(
            "dangjian running: pid {} ({}), http://{}, media on {}, token key {} hex digits, data in {}",
            server.pid,
            std::fs::read_to_string(format!("/proc/{}/comm", server.pid))
                .unwrap_or_default()
                .trim(),
            server.http,
            server.media_ip,
            key.len(),
            server.dir.display()
        );
        let url = format!("http://{}/readyz", server.http);
        let status = rt.block_on(async {
            reqwest::Client::builder()
                .no_proxy()
                .build()?
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map(|r| r.status())
        })?;
        println!("GET {url}: {status}");
        let dir = server.dir.clone();
        let t = Instant::now();
        drop(server);
        println!(
            "stopped in {:.2} s; temp dir removed: {}",
            t.elapsed().as_secs_f64(),
            !dir.exists()
        );
        drop(ns);
        Ok(())
    })();
    match r {
        Ok(()) => {
            println!("dangjian check: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("dangjian check: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn probe(http: SocketAddr, ip: IpAddr) -> anyhow::Result<bool> {
    let janus = Janus::at(http)?;
    let info = janus.info().await?;
    println!(
        "janus info: {} {}, videoroom plugin: {}",
        info["name"].as_str().unwrap_or("?"),
        info["version_string"].as_str().unwrap_or("?"),
        info["plugins"]["janus.plugin.videoroom"]["version_string"]
            .as_str()
            .unwrap_or("MISSING")
    );
    janus.prepare(ROOM, 4).await?;
    janus.prepare(ROOM, 4).await.context("preparing twice")?;
    println!("room {ROOM} = VideoRoom {}", loadtest::janus::room_id(ROOM));

    let spec = |identity: &str, publish: bool, expect: usize| JoinSpec {
        room: ROOM.into(),
        identity: identity.into(),
        publish,
        subscribe: !publish,
        expect_publishers: expect,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut cam = janus.join(&spec("cam", true, 0)).await?;
    let mut sim = janus.join(&spec("sim", true, 0)).await?;
    let cam_task = tokio::spawn(publisher(
        "cam",
        cam.publish.take().context("no publish link")?,
        ip,
        false,
    ));
    let sim_task = tokio::spawn(publisher(
        "sim",
        sim.publish.take().context("no publish link")?,
        ip,
        true,
    ));
    let joined = Instant::now();
    let viewer_joined = Instant::now();
    let mut viewer = janus.join(&spec("viewer", false, 2)).await?;
    let viewer_task = tokio::spawn(subscriber(
        viewer.subscribe.take().context("no subscribe link")?,
        ip,
        stop.clone(),
    ));
    let cam_r = cam_task.await?;
    let sim_r = sim_task.await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let view_r = viewer_task.await?;
    println!(
        "participants while joined: {:?}",
        janus
            .participants(ROOM)
            .await?
            .iter()
            .map(|p| format!(
                "{}{}",
                p["display"].as_str().unwrap_or("?"),
                if p["publisher"] == true {
                    " (publishing)"
                } else {
                    ""
                }
            ))
            .collect::<Vec<_>>()
    );
    drop((cam, sim, viewer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = janus.participants(ROOM).await?;
    println!("participants after the drops: {}", left.len());

    let mut ok = left.is_empty();
    if !ok {
        println!("FAILED: dropping the participants did not end their Janus sessions: {left:?}");
    }
    for (name, r) in [("cam", &cam_r), ("sim", &sim_r)] {
        match r {
            Ok(p) => println!(
                "publisher {name}: connected after {:.2} s, sent {} video frames ({} packets) and {} audio packets, {} PLIs from Janus",
                p.connected_after.as_secs_f64(),
                p.frames,
                p.video_packets,
                p.audio_packets,
                p.plis
            ),
            Err(e) => {
                ok = false;
                println!("publisher {name}: FAILED: {e:#}");
            }
        }
    }
    match view_r {
        Ok(s) => {
            println!(
                "subscriber: offer {:.2} s after it joined ({:.2} s after the publishers did), {} m-sections; connected {:.2} s after the offer; {} further offers",
                s.offer_after.map_or(f64::NAN, |d| d.as_secs_f64()),
                s.offer_after
                    .map_or(f64::NAN, |d| (d + viewer_joined.duration_since(joined))
                        .as_secs_f64()),
                s.m_sections,
                s.connected_after.map_or(f64::NAN, |d| d.as_secs_f64()),
                s.reoffers
            );
            println!(
                "subscriber received: {} audio packets; video packets by sender layer (0 = cam; 1, 2, 3 = sim's q, h, f): {:?}; by SSRC: {:?}; other: {}",
                s.audio, s.video_by_layer, s.video_by_ssrc, s.unknown
            );
            if s.connected_after.is_none() {
                ok = false;
                println!("subscriber: FAILED: never connected");
            }
            if s.audio == 0 || s.video_by_layer.is_empty() {
                ok = false;
                println!("subscriber: FAILED: no audio or no video arrived");
            }
            if s.video_by_ssrc.len() < 2 {
                ok = false;
                println!("subscriber: FAILED: video from fewer than both publishers");
            }
            let sim_layers: Vec<u8> = s
                .video_by_layer
                .keys()
                .copied()
                .filter(|l| *l > 0)
                .collect();
            println!(
                "simulcast: the subscriber got sim's layer(s) {sim_layers:?} (asked for substream 2, i.e. f = 3)"
            );
        }
        Err(e) => {
            ok = false;
            println!("subscriber: FAILED: {e:#}");
        }
    }
    Ok(ok)
}

/// A peer connection on its own UDP socket on the host end of the veth.
struct Peer {
    pc: RTCPeerConnection,
    sock: UdpSocket,
    addr: SocketAddr,
}

impl Peer {
    async fn new(ip: IpAddr) -> anyhow::Result<Peer> {
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let addr = sock.local_addr()?;
        let pc = sfu::engine::client_peer_connection(Instant::now(), addr)
            .map_err(|e| anyhow!("peer connection: {e}"))?;
        Ok(Peer { pc, sock, addr })
    }

    async fn flush(&mut self) {
        while let Some(m) = self.pc.poll_write() {
            let _ = self.sock.send_to(&m.message, m.transport.peer_addr).await;
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

    /// Waits for a datagram (feeding it and any others queued) or until `wake`.
    async fn wait(&mut self, wake: Instant) {
        let wake = self.pc.poll_timeout().map_or(wake, |t| t.min(wake));
        let mut buf = [0u8; 2048];
        tokio::select! {
            r = self.sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    self.feed(from, &buf[..n]);
                    while let Ok((n, from)) = self.sock.try_recv_from(&mut buf) {
                        self.feed(from, &buf[..n]);
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }

    /// Connection state changes since the last call: `Err` on failure.
    fn connected(&mut self, was: bool) -> anyhow::Result<bool> {
        let mut now = was;
        while let Some(ev) = self.pc.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                match s {
                    RTCPeerConnectionState::Connected => now = true,
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        bail!("peer connection {s}")
                    }
                    _ => {}
                }
            }
        }
        Ok(now)
    }
}

fn down_message(m: Option<Down>) -> anyhow::Result<Down> {
    match m {
        Some(Down::Failed(why)) => bail!("the adapter says: {why}"),
        Some(d) => Ok(d),
        None => bail!("the adapter closed the link"),
    }
}

struct PubResult {
    connected_after: Duration,
    frames: u32,
    video_packets: u32,
    audio_packets: u32,
    plis: u32,
}

fn codec(mime: &str) -> RTCRtpCodec {
    let audio = mime == MIME_TYPE_OPUS;
    RTCRtpCodec {
        mime_type: mime.into(),
        clock_rate: if audio { 48000 } else { 90000 },
        channels: if audio { 2 } else { 0 },
        sdp_fmtp_line: if audio {
            "minptime=10;useinbandfec=1".into()
        } else {
            String::new()
        },
        rtcp_feedback: vec![],
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

/// One publisher: offers camera (plain, or simulcast q/h/f) and microphone, applies the answer,
/// connects, sends [`MEDIA_FOR`] of media.
async fn publisher(
    name: &str,
    mut link: Link,
    ip: IpAddr,
    simulcast: bool,
) -> anyhow::Result<PubResult> {
    let mut p = Peer::new(ip).await?;
    let rids: Vec<&str> = if simulcast {
        vec!["q", "h", "f"]
    } else {
        vec![""]
    };
    let base = if simulcast { 0x5100_0000 } else { 0x5200_0000 };
    let ssrcs: Vec<u32> = (0..rids.len() as u32).map(|i| base + 0x10 + i).collect();
    let layer_bytes: Vec<(usize, usize)> = if simulcast {
        vec![(417, 834), (1667, 3334), (5000, 10000)]
    } else {
        vec![(2500, 6000)]
    };
    let video =
        p.pc.add_track(MediaStreamTrack::new(
            name.into(),
            format!("{name}-camera"),
            "camera".into(),
            RtpCodecKind::Video,
            rids.iter()
                .zip(&ssrcs)
                .map(|(rid, ssrc)| RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        rid: (*rid).into(),
                        ssrc: Some(*ssrc),
                        ..Default::default()
                    },
                    codec: codec(MIME_TYPE_VP8),
                    ..Default::default()
                })
                .collect(),
        ))
        .map_err(|e| anyhow!("add video: {e}"))?;
    let audio_ssrc = base + 0xA0;
    let audio =
        p.pc.add_track(MediaStreamTrack::new(
            name.into(),
            format!("{name}-microphone"),
            "microphone".into(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(audio_ssrc),
                    ..Default::default()
                },
                codec: codec(MIME_TYPE_OPUS),
                ..Default::default()
            }],
        ))
        .map_err(|e| anyhow!("add audio: {e}"))?;
    let offer =
        p.pc.create_offer(None)
            .map_err(|e| anyhow!("create_offer: {e}"))?;
    p.pc.set_local_description(Instant::now(), offer.clone())
        .map_err(|e| anyhow!("set_local_description: {e}"))?;
    let mut video_mid = String::new();
    let tracks: Vec<(String, String)> = offer
        .sdp
        .split("\nm=")
        .skip(1)
        .map(|s| {
            let mid = s
                .lines()
                .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
                .unwrap_or_default()
                .to_string();
            let source = if s.starts_with("video") {
                video_mid = mid.clone();
                "camera"
            } else {
                "microphone"
            };
            (mid, source.to_string())
        })
        .collect();
    let started = Instant::now();
    link.up
        .send(Up::Offer {
            sdp: offer.sdp,
            tracks,
        })
        .map_err(|_| anyhow!("the adapter dropped the link"))?;
    let answer = match tokio::time::timeout(CONNECT_LIMIT, link.down.recv()).await {
        Err(_) => bail!("{name}: no answer within {} s", CONNECT_LIMIT.as_secs()),
        Ok(m) => match down_message(m)? {
            Down::Answer { sdp } => sdp,
            other => bail!("{name}: expected an answer, got {other:?}"),
        },
    };
    let candidates: Vec<&str> = answer
        .lines()
        .filter(|l| l.starts_with("a=candidate:"))
        .collect();
    println!(
        "publisher {name}: answer {:.2} s after the offer; Janus's candidates: {candidates:?}; simulcast in answer: {}",
        started.elapsed().as_secs_f64(),
        answer.contains("a=simulcast:")
    );
    p.pc.set_remote_description(
        Instant::now(),
        RTCSessionDescription::answer(answer).map_err(|e| anyhow!("answer: {e}"))?,
    )
    .map_err(|e| anyhow!("{name}: cannot apply Janus's answer: {e}"))?;
    let video_pt = payload_type(&mut p.pc, video, MIME_TYPE_VP8).context("VP8 not negotiated")?;
    let audio_pt = payload_type(&mut p.pc, audio, MIME_TYPE_OPUS).context("Opus not negotiated")?;
    let exts =
        p.pc.rtp_sender(video)
            .context("video sender")?
            .get_parameters()
            .rtp_parameters
            .header_extensions
            .clone();
    let ext = |uri: &str| exts.iter().find(|e| e.uri == uri).map(|e| e.id as u8);
    let mid_ext = ext("urn:ietf:params:rtp-hdrext:sdes:mid");
    let rid_ext = ext("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id");
    if simulcast {
        println!("publisher {name}: mid extension {mid_ext:?}, rid extension {rid_ext:?}");
    }

    let mut connected = false;
    let mut connected_after = None;
    let mut media_start: Option<Instant> = None;
    let (mut frames, mut video_packets, mut audio_packets, mut plis) = (0u32, 0u32, 0u32, 0u32);
    let mut seqs: Vec<u16> = (0..rids.len()).map(|i| 1000 + 20_000 * i as u16).collect();
    let mut key_pending = vec![true; rids.len()];
    let mut audio_seq = 500u16;
    let mut next_audio = 0u32;
    loop {
        let now = Instant::now();
        if let Some(start) = media_start {
            if now >= start + MEDIA_FOR {
                break;
            }
            while start + FRAME_INTERVAL * frames <= now {
                let frame = frames;
                frames += 1;
                for layer in 0..rids.len() {
                    let key = frame.is_multiple_of(KEYFRAME_EVERY) || key_pending[layer];
                    key_pending[layer] = false;
                    let (fb, kb) = layer_bytes[layer];
                    let tag = if simulcast { layer as u8 + 1 } else { 0 };
                    let payloads = vp8_frame(tag, frame, key, if key { kb } else { fb });
                    let count = payloads.len();
                    for (i, payload) in payloads.into_iter().enumerate() {
                        let seq = seqs[layer];
                        seqs[layer] = seq.wrapping_add(1);
                        let mut header = rtc::rtp::header::Header {
                            version: 2,
                            marker: i + 1 == count,
                            payload_type: video_pt,
                            sequence_number: seq,
                            timestamp: 0x1234_5678u32
                                .wrapping_mul(layer as u32 + 1)
                                .wrapping_add(frame * 3000),
                            ssrc: ssrcs[layer],
                            ..Default::default()
                        };
                        if simulcast {
                            if let Some(id) = mid_ext {
                                let _ = header.set_extension(id, Bytes::from(video_mid.clone()));
                            }
                            if let Some(id) = rid_ext {
                                let _ = header.set_extension(
                                    id,
                                    Bytes::from(rids[layer].as_bytes().to_vec()),
                                );
                            }
                        }
                        if let Some(mut s) = p.pc.rtp_sender(video)
                            && s.write_rtp(now, rtc::rtp::Packet { header, payload })
                                .is_ok()
                        {
                            video_packets += 1;
                        }
                    }
                }
            }
            while start + AUDIO_INTERVAL * next_audio <= now {
                let n = next_audio;
                next_audio += 1;
                let seq = audio_seq;
                audio_seq = seq.wrapping_add(1);
                let pkt = rtc::rtp::Packet {
                    header: rtc::rtp::header::Header {
                        version: 2,
                        payload_type: audio_pt,
                        sequence_number: seq,
                        timestamp: 777u32.wrapping_add(n * 960),
                        ssrc: audio_ssrc,
                        ..Default::default()
                    },
                    payload: opus_packet(n),
                };
                if let Some(mut s) = p.pc.rtp_sender(audio)
                    && s.write_rtp(now, pkt).is_ok()
                {
                    audio_packets += 1;
                }
            }
        }
        p.fire_timers(now);
        connected = p.connected(connected).with_context(|| name.to_string())?;
        if connected && media_start.is_none() {
            media_start = Some(now);
            connected_after = Some(started.elapsed());
        }
        if !connected && started.elapsed() > CONNECT_LIMIT {
            bail!(
                "{name}: not connected {} s after the offer",
                CONNECT_LIMIT.as_secs()
            );
        }
        while let Some(m) = p.pc.poll_read() {
            if let RTCMessage::RtcpPacket(_, pkts) = m.message {
                for pkt in &pkts {
                    if let Some(pli) = pkt.as_any().downcast_ref::<PictureLossIndication>() {
                        plis += 1;
                        if let Some(l) = ssrcs.iter().position(|s| *s == pli.media_ssrc) {
                            key_pending[l] = true;
                        }
                    }
                }
            }
        }
        if let Ok(Down::Failed(why)) = link.down.try_recv() {
            bail!("{name}: the adapter says: {why}");
        }
        p.flush().await;
        let mut wake = now + IDLE;
        if let Some(start) = media_start {
            wake = wake
                .min(start + FRAME_INTERVAL * frames)
                .min(start + AUDIO_INTERVAL * next_audio);
        }
        p.wait(wake).await;
    }
    Ok(PubResult {
        connected_after: connected_after.unwrap_or_default(),
        frames,
        video_packets,
        audio_packets,
        plis,
    })
}

#[derive(Default)]
struct SubResult {
    /// Since the subscriber's task started.
    offer_after: Option<Duration>,
    m_sections: usize,
    /// Since the offer.
    connected_after: Option<Duration>,
    reoffers: u32,
    audio: u32,
    video_by_layer: BTreeMap<u8, u32>,
    video_by_ssrc: BTreeMap<u32, u32>,
    unknown: u32,
}

/// The subscriber: answers Janus's offers, connects, counts media until `stop`.
async fn subscriber(
    mut link: Link,
    ip: IpAddr,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<SubResult> {
    let mut p = Peer::new(ip).await?;
    let mut r = SubResult::default();
    let started = Instant::now();
    let mut connected = false;
    let mut offered_at = None;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match link.down.try_recv() {
            Ok(Down::Offer { sdp }) => {
                if offered_at.is_none() {
                    offered_at = Some(now);
                    r.offer_after = Some(started.elapsed());
                    r.m_sections = sdp.matches("\nm=").count();
                    let candidates: Vec<&str> = sdp
                        .lines()
                        .filter(|l| l.starts_with("a=candidate:"))
                        .collect();
                    println!(
                        "subscriber: offer {:.2} s after joining; {} m-sections; Janus's candidates: {candidates:?}",
                        started.elapsed().as_secs_f64(),
                        r.m_sections
                    );
                } else {
                    r.reoffers += 1;
                }
                let answer =
                    p.pc.set_remote_description(
                        now,
                        RTCSessionDescription::offer(sdp).map_err(|e| anyhow!("offer: {e}"))?,
                    )
                    .and_then(|()| p.pc.create_answer(None))
                    .and_then(|a| {
                        p.pc.set_local_description(now, a.clone())?;
                        Ok(a)
                    })
                    .map_err(|e| anyhow!("cannot answer Janus's offer: {e}"))?;
                link.up
                    .send(Up::Answer { sdp: answer.sdp })
                    .map_err(|_| anyhow!("the adapter dropped the link"))?;
            }
            Ok(other) => {
                down_message(Some(other))?;
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                bail!("the adapter closed the link")
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
        }
        if let Some(at) = offered_at
            && !connected
            && at.elapsed() > CONNECT_LIMIT
        {
            bail!(
                "not connected {} s after the offer",
                CONNECT_LIMIT.as_secs()
            );
        }
        p.fire_timers(now);
        let was = connected;
        connected = p.connected(connected)?;
        if connected && !was {
            r.connected_after = offered_at.map(|t| t.elapsed());
        }
        while let Some(m) = p.pc.poll_read() {
            let RTCMessage::RtpPacket(_, pkt) = m.message else {
                continue;
            };
            if let Some(layer) = video_layer(&pkt.payload) {
                *r.video_by_layer.entry(layer).or_default() += 1;
                *r.video_by_ssrc.entry(pkt.header.ssrc).or_default() += 1;
            } else if is_audio(&pkt.payload) {
                r.audio += 1;
            } else {
                r.unknown += 1;
            }
        }
        p.flush().await;
        p.wait(now + IDLE).await;
    }
    Ok(r)
}

/// The RTP payloads of one synthetic VP8 frame (as in tests/media_e2e.rs): an RFC 7741 payload
/// descriptor on each, the VP8 frame header on the first (a 640x480 keyframe start code on
/// keyframes), filler, and a trailer naming the layer, frame and packet.
fn vp8_frame(layer: u8, frame: u32, key: bool, bytes: usize) -> Vec<Bytes> {
    let count = bytes.div_ceil(MAX_PAYLOAD).max(1);
    let per = bytes / count;
    (0..count)
        .map(|idx| {
            let size = if idx + 1 == count {
                bytes - per * (count - 1)
            } else {
                per
            };
            let mut p = Vec::with_capacity(size);
            if idx == 0 {
                p.push(0x10);
                let first_partition: u32 = 64;
                p.push(u8::from(!key) | 0x10 | ((first_partition as u8 & 7) << 5));
                p.push((first_partition >> 3) as u8);
                p.push((first_partition >> 11) as u8);
                if key {
                    p.extend_from_slice(&[0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]);
                }
            } else {
                p.push(0x00);
            }
            let fill = (frame as u8) ^ (idx as u8);
            while p.len() + VIDEO_TRAILER < size {
                p.push(fill);
            }
            p.push(VIDEO_MAGIC);
            p.push(layer);
            p.extend_from_slice(&frame.to_be_bytes());
            p.extend_from_slice(&[idx as u8, count as u8, u8::from(key), VIDEO_MAGIC]);
            Bytes::from(p)
        })
        .collect()
}

fn video_layer(p: &[u8]) -> Option<u8> {
    let t = p.get(p.len().checked_sub(VIDEO_TRAILER)?..)?;
    (t[0] == VIDEO_MAGIC && t[9] == VIDEO_MAGIC).then_some(t[1])
}

fn opus_packet(n: u32) -> Bytes {
    let mut p = vec![0x78];
    p.resize(60, n as u8);
    p.push(AUDIO_MAGIC);
    p.extend_from_slice(&n.to_be_bytes());
    p.push(AUDIO_MAGIC);
    Bytes::from(p)
}

fn is_audio(p: &[u8]) -> bool {
    p.len() >= 6 && p[p.len() - 6] == AUDIO_MAGIC && p[p.len() - 1] == AUDIO_MAGIC
}
