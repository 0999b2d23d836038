//! One client peer connection on its own UDP socket: the server tells peers apart by their
//! address, so sockets are not shared, but hundreds of them share the runtime's threads.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use rtc::interceptor::{Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::{
    Registry, register_default_interceptors,
};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::collections::VecDeque;
use tokio::net::UdpSocket;

pub struct Endpoint {
    pub pc: RTCPeerConnection,
    pub sock: UdpSocket,
    pub addr: SocketAddr,
}

const ICE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Kernel receive buffer per client socket: a keyframe to a busy client must not overflow it.
const RECV_BUFFER: usize = 1 << 20;

impl Endpoint {
    /// A browser-like peer connection (full ICE, default codecs and interceptors: NACK, RTX,
    /// reports, TWCC) with one host candidate on `ip`; `nacks` counts the packets it asks again.
    pub async fn bind(ip: IpAddr, nacks: Arc<AtomicU64>) -> anyhow::Result<Endpoint> {
        let sock = bind_udp(SocketAddr::new(ip, 0))?;
        let addr = sock.local_addr()?;
        let pc = client_peer_connection(Instant::now(), addr, nacks)
            .map_err(|e| anyhow::anyhow!("peer connection: {e}"))?;
        Ok(Endpoint { pc, sock, addr })
    }

    /// Sends everything the peer connection has queued.
    pub fn flush(&mut self) {
        while let Some(m) = self.pc.poll_write() {
            // A full socket buffer loses this datagram, as it would a browser's.
            let _ = self.sock.try_send_to(&m.message, m.transport.peer_addr);
        }
    }

    pub fn feed(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let _ = self.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: self.addr,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(data),
        });
    }

    pub fn fire_timers(&mut self, now: Instant) {
        if self.pc.poll_timeout().is_some_and(|t| t <= now) {
            let _ = self.pc.handle_timeout(now);
        }
    }

    pub fn deadline(&mut self, latest: Instant) -> Instant {
        self.pc.poll_timeout().map_or(latest, |t| t.min(latest))
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let std = std::net::UdpSocket::bind(addr)?;
    let sock = socket2::SockRef::from(&std);
    let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

fn client_peer_connection(
    now: Instant,
    addr: SocketAddr,
    nacks: Arc<AtomicU64>,
) -> Result<RTCPeerConnection, sfu::engine::EngineError> {
    let mut me = MediaEngine::default();
    me.register_default_codecs()?;
    let registry = Registry::new()
        .with(
            Slot::from(14_000),
            sfu::engine::DeliverRtcpFeedback::default(),
        )
        // Wire-most but one: every NACK the generator above writes passes here.
        .with(Slot::from(1_500), NackTap::new(nacks));
    let registry = register_default_interceptors(registry, &mut me)?;
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        // Checks every 50 ms, as Chrome paces them (rtc's default of 200 ms would add up to
        // 200 ms to every join, on any server).
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), Some(28))
                .build(),
        )
        .with_interceptor_registry(registry)
        .build(now)?;
    pc.add_local_candidate(sfu::engine::host_candidate(addr, false)?)?;
    Ok(pc)
}

/// Counts the lost packets named in outgoing NACKs; passes everything through.
struct NackTap {
    count: Arc<AtomicU64>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl NackTap {
    fn new(count: Arc<AtomicU64>) -> NackTap {
        NackTap {
            count,
            read: VecDeque::new(),
            write: VecDeque::new(),
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for NackTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = sfu::engine::EngineError;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.read.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(pkts) = &msg.message.packet {
            let asked: u64 = pkts
                .iter()
                .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
                .flat_map(|n| n.nacks.iter())
                .map(|n| 1 + u64::from(n.lost_packets.count_ones()))
                .sum();
            if asked > 0 {
                self.count.fetch_add(asked, Ordering::Relaxed);
            }
        }
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

impl Interceptor for NackTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
