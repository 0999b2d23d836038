//! A synthetic publisher for the recording tests: a `webrtc` client that sends prepared,
//! really encoded frames (from `recorder::testmedia`) in real time, camera and microphone.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use recorder::segment::Frame;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::network_type::NetworkType;
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use signaling::token::{Grants, TokenKey, TokenRequest};
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};
use webrtc::rtp_transceiver::RtpSender;

use super::rtc::{Ws, sdp_mids, ws_send};

const CONNECT: Duration = Duration::from_secs(10);

/// Joins the server at `addr` (whose data directory holds the token key) as a publisher.
pub async fn join_at(addr: SocketAddr, data: &Path, room: &str, identity: &str) -> Ws {
    let hex = std::fs::read_to_string(data.join("token.key")).unwrap();
    let token = TokenKey::from_hex(&hex)
        .unwrap()
        .mint(&TokenRequest {
            room: room.into(),
            identity: identity.into(),
            name: identity.into(),
            grants: Grants::PARTICIPANT,
            ttl: Duration::from_secs(3600),
        })
        .unwrap();
    let url = format!("ws://{addr}/rtc?access_token={token}");
    let (ws, _) = tokio::time::timeout(CONNECT, connect_async(url))
        .await
        .expect("WebSocket handshake timed out")
        .expect("WebSocket connects");
    ws
}

struct Gathering(Arc<AtomicBool>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Gathering {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

fn codec(mime: &str) -> RTCRtpCodec {
    let (clock_rate, channels, fmtp) = match mime {
        MIME_TYPE_OPUS => (48000, 2, "minptime=10;useinbandfec=1"),
        MIME_TYPE_H264 => (
            90000,
            0,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        ),
        _ => (90000, 0, ""),
    };
    RTCRtpCodec {
        mime_type: mime.into(),
        clock_rate,
        channels,
        sdp_fmtp_line: fmtp.into(),
        rtcp_feedback: vec![],
    }
}

fn track(kind: RtpCodecKind, id: &str, ssrc: u32, mime: &str) -> Arc<TrackLocalStaticSample> {
    let t = MediaStreamTrack::new(
        "publisher".into(),
        id.into(),
        id.into(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: codec(mime),
            ..Default::default()
        }],
    );
    Arc::new(TrackLocalStaticSample::new(Instant::now(), t).unwrap())
}

async fn payload_type(sender: &Arc<dyn RtpSender>, mime: &str) -> u8 {
    let params = sender.get_parameters().await.unwrap();
    params
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
        .unwrap_or_else(|| panic!("{mime} was not negotiated"))
}

/// A running publisher; [`Publisher::finish`] waits for it to have sent everything.
pub struct Publisher {
    pub stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Publisher {
    pub async fn finish(self) {
        self.task.await.unwrap();
    }
}

/// Publishes `video` (VP8 or H.264 per `h264`) and `audio` (Opus) frames over `ws` (already
/// open, before `joined`), each at its `pts_us` after the media starts flowing.
pub async fn publish(mut ws: Ws, h264: bool, video: Vec<Frame>, audio: Vec<Frame>) -> Publisher {
    let vmime = if h264 { MIME_TYPE_H264 } else { MIME_TYPE_VP8 };
    let mut me = MediaEngine::default();
    me.register_default_codecs().unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut me).unwrap();
    let gathered = Arc::new(AtomicBool::new(false));
    let pc: Arc<dyn PeerConnection> = Arc::new(
        PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_setting_engine(
                SettingEngineBuilder::new()
                    .with_network_types(vec![NetworkType::Udp4])
                    .with_include_loopback_candidate(true)
                    .with_multicast_dns_mode(MulticastDnsMode::Disabled)
                    .build(),
            )
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Gathering(gathered.clone())))
            .with_udp_addrs(vec!["127.0.0.1:0"])
            .build()
            .await
            .unwrap(),
    );
    let vtrack = track(RtpCodecKind::Video, "camera", 0x5EED_1001, vmime);
    let atrack = track(
        RtpCodecKind::Audio,
        "microphone",
        0x5EED_1002,
        MIME_TYPE_OPUS,
    );
    let vsender = pc.add_track(vtrack.clone()).await.unwrap();
    let asender = pc.add_track(atrack.clone()).await.unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer).await.unwrap();
    let start = Instant::now();
    while !gathered.load(Ordering::Relaxed) {
        assert!(start.elapsed() < CONNECT, "ICE gathering never completed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let offer = pc.local_description().await.unwrap();
    let intents: Vec<Value> = sdp_mids(&offer.sdp)
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
        json!({"type": "offer", "sdp": offer.sdp, "tracks": intents}),
    )
    .await;
    loop {
        let m = tokio::time::timeout(CONNECT, ws.next())
            .await
            .expect("no answer from the server");
        let Some(Ok(Message::Text(t))) = m else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str().unwrap_or_default() {
            "answer" => {
                let sdp = v["sdp"].as_str().unwrap().to_string();
                pc.set_remote_description(RTCSessionDescription::answer(sdp).unwrap())
                    .await
                    .unwrap();
                break;
            }
            "error" => panic!("server error: {v}"),
            _ => {}
        }
    }
    let vpt = payload_type(&vsender, vmime).await;
    let apt = payload_type(&asender, MIME_TYPE_OPUS).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        // Let ICE and DTLS finish before the clock starts, as a camera warms up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut timeline: Vec<(bool, Frame)> = video
            .into_iter()
            .map(|f| (true, f))
            .chain(audio.into_iter().map(|f| (false, f)))
            .collect();
        timeline.sort_by_key(|(_, f)| f.pts_us);
        let t0 = tokio::time::Instant::now();
        for (is_video, f) in timeline {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep_until(t0 + Duration::from_micros(f.pts_us.max(0) as u64)).await;
            let (t, ssrc, pt, dur) = if is_video {
                (&vtrack, 0x5EED_1001, vpt, Duration::from_micros(33_333))
            } else {
                (&atrack, 0x5EED_1002, apt, Duration::from_millis(20))
            };
            let sample = Sample {
                data: Bytes::clone(&f.data),
                timestamp: Instant::now(),
                duration: dur,
                packet_timestamp: 0,
                prev_dropped_packets: 0,
                prev_padding_packets: 0,
            };
            let _ = t.write_sample(ssrc, pt, &sample, &[]).await;
            // Drain what the server says, so its queue to us never grows.
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, ws.next()).await {}
        }
        let _ = pc.close().await;
        let _ = ws.close(None).await;
    });
    Publisher { stop, task }
}
