//! Building server-side peer connections on webrtc-rs's sans-IO `rtc`: codecs, interceptors,
//! ICE-lite credentials and the one shared host candidate.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use rtc::ice::tcp_type::TcpType;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rtc::interceptor::{
    Attribute, BandwidthEstimator, EstimatorStats, Gcc, Interceptor, Packet, PacketReport, Slot,
    StreamInfo, TaggedPacket,
};
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::{
    Registry, configure_simulcast_extension_headers, configure_twcc_sender_only,
    register_default_interceptors,
};
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;

use crate::fastpath::{KeyCapture, Outbound};
use crate::inbound::{Inbound, OpenedByRtc};

pub type EngineError = rtc::shared::error::Error;

fn video_feedback() -> Vec<RTCPFeedback> {
    vec![
        RTCPFeedback {
            typ: "goog-remb".into(),
            parameter: String::new(),
        },
        RTCPFeedback {
            typ: "ccm".into(),
            parameter: "fir".into(),
        },
    ]
}

pub fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.into(),
        clock_rate: 48000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

pub fn vp8() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.into(),
        clock_rate: 90000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: video_feedback(),
    }
}

pub fn h264() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.into(),
        clock_rate: 90000,
        channels: 0,
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
            .into(),
        rtcp_feedback: video_feedback(),
    }
}

fn rtx(apt: u8) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_RTX.into(),
        clock_rate: 90000,
        channels: 0,
        sdp_fmtp_line: format!("apt={apt}"),
        rtcp_feedback: vec![],
    }
}

/// The video codecs every server connection offers (each also with RTX), with their payload types.
pub fn video_codecs() -> Vec<RTCRtpCodecParameters> {
    [(vp8(), 96), (h264(), 102)]
        .into_iter()
        .map(|(rtp_codec, payload_type)| RTCRtpCodecParameters {
            rtp_codec,
            payload_type,
        })
        .collect()
}

/// The codecs every server connection offers: Opus; VP8 and H.264, each with RTX.
fn media_engine() -> Result<MediaEngine, EngineError> {
    let mut m = MediaEngine::default();
    let mut reg = |codec, payload_type, kind| {
        m.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: codec,
                payload_type,
            },
            kind,
        )
    };
    reg(opus(), 111, RtpCodecKind::Audio)?;
    for codec in video_codecs() {
        let pt = codec.payload_type;
        reg(codec.rtp_codec, pt, RtpCodecKind::Video)?;
        reg(rtx(pt), pt + 1, RtpCodecKind::Video)?;
    }
    // Publishers tag each audio packet with its level (RFC 6464): active-speaker detection.
    m.register_header_extension(
        RTCRtpHeaderExtensionCapability {
            uri: AUDIO_LEVEL_URI.into(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    Ok(m)
}

pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// The engine's interceptor chain consumes inbound RTCP; this marks keyframe requests and REMB
/// estimates (and feedback and sender reports) so that the SFU sees them in `poll_read` (to relay them to the publisher, and to
/// choose simulcast layers).
/// Public so that Rust test clients (and the load tool) can see the PLIs they are sent.
/// On a publisher's connection it also notes the RTP packets rtc opened, for the SFU's
/// transport-wide feedback (see [`OpenedByRtc`]).
#[derive(Default)]
pub struct DeliverRtcpFeedback {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    opened: Option<OpenedByRtc>,
}

impl DeliverRtcpFeedback {
    fn noting(opened: OpenedByRtc) -> DeliverRtcpFeedback {
        DeliverRtcpFeedback {
            opened: Some(opened),
            ..Default::default()
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for DeliverRtcpFeedback {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = EngineError;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let (Packet::Rtp(p), Some(opened)) = (&msg.message.packet, &self.opened) {
            opened.note(&p.header, msg.now);
        }
        if let Packet::Rtcp(pkts) = &msg.message.packet
            && pkts.iter().any(|p| {
                let p = p.as_any();
                p.is::<PictureLossIndication>()
                    || p.is::<FullIntraRequest>()
                    || p.is::<ReceiverEstimatedMaximumBitrate>()
                    || p.is::<TransportLayerNack>()
                    || p.is::<TransportLayerCc>()
                    || p.is::<SenderReport>()
            })
        {
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }
    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for DeliverRtcpFeedback {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// One DTLS certificate for every connection of this server (generating one per peer is slow).
pub fn certificate() -> Result<RTCCertificate, String> {
    let provider = rtc::crypto::default_provider().map_err(|e| e.to_string())?;
    let params = CertificateParams::new(vec!["dangjian-sfu".into()]).map_err(|e| e.to_string())?;
    RTCCertificate::generate(
        provider.crypto(),
        rtc::crypto::SignatureScheme::EcdsaP256Sha256,
        params,
    )
    .map_err(|e| e.to_string())
}

/// A server-side connection as [`server_peer_connection`] builds it.
pub struct ServerConnection {
    pub pc: RTCPeerConnection,
    /// The send-side bandwidth estimate for the media this connection sends.
    pub estimate: EstimateHandle,
    /// Subscriber connections: the send side the SFU runs itself.
    pub outbound: Option<Outbound>,
    /// Publisher connections: the receive side the SFU runs itself.
    pub inbound: Option<Inbound>,
}

/// A server-side connection: ICE-lite with our own credentials (the ufrag routes STUN to it) and
/// the shared socket's address as its only candidate. `receives_media`: a publisher's
/// connection (media in) rather than a subscriber's (media out).
pub fn server_peer_connection(
    now: Instant,
    ufrag: &str,
    pwd: &str,
    advertised: SocketAddr,
    advertised_tcp: Option<SocketAddr>,
    cert: &RTCCertificate,
    receives_media: bool,
) -> Result<ServerConnection, EngineError> {
    let mut me = media_engine()?;
    let mut settings = SettingEngineBuilder::new()
        .with_lite(true)
        .with_ice_credentials(ufrag.into(), pwd.into())
        // The agent notices the client's nomination (and DTLS starts) on its next check tick:
        // at the default 200 ms that was most of a viewer's join time.
        .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), None);
    // The SFU runs both sides of the media itself (see `fastpath` and `inbound`): the chain
    // only delivers the feedback, and the connection's crypto provider lets the SFU find its
    // SRTP keys. A publisher's connection sends no media: its estimate stays unset.
    negotiate_media_features(&mut me)?;
    let keys = KeyCapture::default();
    settings = settings.with_crypto_provider(keys.provider().map_err(EngineError::Other)?);
    let (outbound, inbound, estimate) = if receives_media {
        let inbound = Inbound::new(now, keys, rand::random::<u32>() | 1);
        (None, Some(inbound), EstimateHandle::default())
    } else {
        let (estimator, estimate) = estimator();
        (Some(Outbound::new(now, keys, estimator)), None, estimate)
    };
    let deliver = match &inbound {
        Some(inb) => DeliverRtcpFeedback::noting(inb.opened_by_rtc()),
        None => DeliverRtcpFeedback::default(),
    };
    let registry = Registry::new().with(Slot::from(14_000), deliver);
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(
            RTCConfigurationBuilder::new()
                .with_certificates(vec![cert.clone()])
                .build(),
        )
        .with_media_engine(me)
        .with_setting_engine(settings.build())
        .with_interceptor_registry(registry)
        .build(now)?;
    pc.add_local_candidate(host_candidate(advertised, false)?)?;
    // ICE-TCP for networks that block UDP: clients connect to our passive candidate.
    if let Some(tcp) = advertised_tcp {
        pc.add_local_candidate(host_candidate(tcp, true)?)?;
    }
    Ok(ServerConnection {
        pc,
        estimate,
        outbound,
        inbound,
    })
}

/// A fresh congestion controller: a GCC estimate (without the engine's pacer: it would hold
/// every packet to the estimate, and simulcast layer switching is how this server adapts),
/// published through the handle.
pub fn estimator() -> (Published<Gcc>, EstimateHandle) {
    let estimate = EstimateHandle::default();
    let estimator = Published {
        inner: Gcc::new(INITIAL_ESTIMATE_BPS, 100_000.0, 20_000_000.0),
        out: estimate.clone(),
    };
    estimator.publish();
    (estimator, estimate)
}

fn register_nack_feedback(me: &mut MediaEngine) {
    for parameter in ["", "pli"] {
        me.register_feedback(
            RTCPFeedback {
                typ: "nack".into(),
                parameter: parameter.into(),
            },
            RtpCodecKind::Video,
        );
    }
}

/// What a server connection offers in SDP, either way the media goes: what
/// [`register_default_interceptors`] offers (NACK and PLI feedback, the simulcast extensions)
/// and transport-wide congestion control, without the interceptors: the SFU does their work
/// itself (`fastpath`, `inbound`). The TWCC sender and receiver configurations register the same
/// extension and feedback; only their (unused) interceptors differ.
fn negotiate_media_features(me: &mut MediaEngine) -> Result<(), EngineError> {
    register_nack_feedback(me);
    configure_simulcast_extension_headers(me)?;
    let _ = configure_twcc_sender_only(Registry::new(), me)?;
    Ok(())
}

/// How often a connecting server connection's ICE agent looks at its checks.
const ICE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Where the estimate starts. High enough for a full-size layer: the estimator lowers it only on
/// loss, and starting low would move every new viewer down a layer and back up again.
const INITIAL_ESTIMATE_BPS: f64 = 3_000_000.0;

/// One connection's send-side bandwidth estimate, written by its congestion controller and read
/// by the core when it assigns layers. Not shared between connections.
#[derive(Clone, Default)]
pub struct EstimateHandle(Arc<(AtomicU64, AtomicU64)>);

impl EstimateHandle {
    /// Bits per second, or `None` until the first TWCC feedback arrived.
    pub fn bps(&self) -> Option<u64> {
        (self.0.1.load(Ordering::Relaxed) > 0)
            .then(|| f64::from_bits(self.0.0.load(Ordering::Relaxed)) as u64)
    }
}

/// Wraps the estimator to publish each new target through an [`EstimateHandle`].
pub struct Published<E> {
    inner: E,
    out: EstimateHandle,
}

impl<E: BandwidthEstimator> Published<E> {
    fn publish(&self) {
        self.out
            .0
            .0
            .store(self.inner.target_bitrate().to_bits(), Ordering::Relaxed);
    }
}

impl<E: BandwidthEstimator> BandwidthEstimator for Published<E> {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        self.inner.on_reports(now, reports);
        self.out.0.1.fetch_add(1, Ordering::Relaxed);
        self.publish();
    }
    fn target_bitrate(&self) -> f64 {
        self.inner.target_bitrate()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
        self.publish();
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
    fn stats(&self) -> EstimatorStats {
        self.inner.stats()
    }
}

/// A host candidate at `addr`: UDP, or passive TCP.
pub fn host_candidate(addr: SocketAddr, tcp: bool) -> Result<RTCIceCandidateInit, EngineError> {
    let candidate = CandidateHostConfig {
        base_config: CandidateConfig {
            network: if tcp { "tcp" } else { "udp" }.into(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        tcp_type: if tcp {
            TcpType::Passive
        } else {
            TcpType::Unspecified
        },
    }
    .new_candidate_host()?;
    RTCIceCandidate::from(&candidate).to_json()
}

/// A browser-like peer (full ICE, the default codecs and interceptors: NACK, RTX, reports; and,
/// like a browser, transport-wide sequence numbers on what it sends) with one UDP host candidate
/// at `addr`: for Rust test clients and tools, not the server.
pub fn client_peer_connection(
    now: Instant,
    addr: SocketAddr,
) -> Result<RTCPeerConnection, EngineError> {
    let mut me = MediaEngine::default();
    me.register_default_codecs()?;
    let registry = Registry::new().with(Slot::from(14_000), DeliverRtcpFeedback::default());
    let registry = register_default_interceptors(registry, &mut me)?;
    let registry = configure_twcc_sender_only(registry, &mut me)?;
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(SettingEngineBuilder::new().build())
        .with_interceptor_registry(registry)
        .build(now)?;
    pc.add_local_candidate(host_candidate(addr, false)?)?;
    Ok(pc)
}

/// The local ufrag of a STUN binding request (`USERNAME = "ours:theirs"`), if it is one.
pub fn stun_local_ufrag(buf: &[u8]) -> Option<String> {
    if buf.len() < 20 || buf[0] > 3 || buf[4..8] != [0x21, 0x12, 0xA4, 0x42] {
        return None;
    }
    let mut m = rtc::stun::message::Message::new();
    m.unmarshal_binary(buf).ok()?;
    let u =
        rtc::stun::textattrs::TextAttribute::get_from_as(&m, rtc::stun::attributes::ATTR_USERNAME)
            .ok()?;
    u.text.split(':').next().map(str::to_owned)
}
