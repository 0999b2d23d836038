//! The thin driver: one task owns the shared UDP socket, the timers and the [`Sfu`]; signaling
//! talks to it through an [`SfuHandle`] and hears back through a channel of [`SfuEvent`]s.
//! Everything on the media path stays in this one task, so no lock is shared between peers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use crate::RouterId;
use crate::core::{Direction, PeerId, ProducerId, Sfu, SfuConfig, SfuError, SfuEvent, SfuStats};
use crate::forwarder::Layer;

enum Command {
    CreatePeer {
        router: RouterId,
        owner: String,
        direction: Direction,
        reply: oneshot::Sender<Result<PeerId, SfuError>>,
    },
    PublisherOffer {
        peer: PeerId,
        sdp: String,
        reply: oneshot::Sender<Result<String, SfuError>>,
    },
    SubscriberAnswer {
        peer: PeerId,
        sdp: String,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    ClosePeer {
        peer: PeerId,
    },
    RemoveProducer {
        producer: ProducerId,
    },
    SetPreference {
        peer: PeerId,
        producer: ProducerId,
        layer: Layer,
    },
    Stats {
        reply: oneshot::Sender<Snapshot>,
    },
}

/// Counters plus sizes, for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    pub stats: SfuStats,
    pub peers: usize,
    pub producers: usize,
    pub send_drops: u64,
}

/// Cheap to clone; every method is a message to the driver task.
#[derive(Clone)]
pub struct SfuHandle {
    tx: mpsc::UnboundedSender<Command>,
    advertised: SocketAddr,
}

fn gone() -> SfuError {
    SfuError::Engine("media server stopped".into())
}

impl SfuHandle {
    pub fn advertised(&self) -> SocketAddr {
        self.advertised
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).ok()?;
        rx.await.ok()
    }

    pub async fn create_peer(
        &self,
        router: RouterId,
        owner: String,
        direction: Direction,
    ) -> Result<PeerId, SfuError> {
        self.ask(|reply| Command::CreatePeer {
            router,
            owner,
            direction,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(gone()))
    }

    pub async fn publisher_offer(&self, peer: PeerId, sdp: String) -> Result<String, SfuError> {
        self.ask(|reply| Command::PublisherOffer { peer, sdp, reply })
            .await
            .unwrap_or_else(|| Err(gone()))
    }

    pub async fn subscriber_answer(&self, peer: PeerId, sdp: String) -> Result<(), SfuError> {
        self.ask(|reply| Command::SubscriberAnswer { peer, sdp, reply })
            .await
            .unwrap_or_else(|| Err(gone()))
    }

    pub fn close_peer(&self, peer: PeerId) {
        let _ = self.tx.send(Command::ClosePeer { peer });
    }

    pub fn remove_producer(&self, producer: ProducerId) {
        let _ = self.tx.send(Command::RemoveProducer { producer });
    }

    /// The highest simulcast layer `peer` wants of `producer` (0 = smallest picture).
    pub fn set_preference(&self, peer: PeerId, producer: ProducerId, layer: Layer) {
        let _ = self.tx.send(Command::SetPreference {
            peer,
            producer,
            layer,
        });
    }

    pub async fn snapshot(&self) -> Snapshot {
        self.ask(|reply| Command::Stats { reply })
            .await
            .unwrap_or_default()
    }
}

/// Binds the shared socket and starts the driver. `public_ip` is what clients are told to send to
/// (NAT 1:1); without it the bound address is advertised, which then must not be unspecified.
pub async fn start(
    bind: SocketAddr,
    public_ip: Option<IpAddr>,
    tcp_bind: Option<SocketAddr>,
) -> io::Result<(SfuHandle, mpsc::UnboundedReceiver<SfuEvent>)> {
    let socket = bind_udp(bind)?;
    let local = socket.local_addr()?;
    let ip = match public_ip {
        Some(ip) => ip,
        None if local.ip().is_unspecified() => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the media socket is bound to all interfaces: set the public address clients reach it on",
            ));
        }
        None => local.ip(),
    };
    let advertised = SocketAddr::new(ip, local.port());
    let listener = match tcp_bind {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let advertised_tcp = match &listener {
        Some(l) => Some(SocketAddr::new(ip, l.local_addr()?.port())),
        None => None,
    };
    let sfu = Sfu::new(SfuConfig {
        advertised,
        advertised_tcp,
    })
    .map_err(|e| io::Error::other(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    tokio::spawn(run(socket, listener, sfu, rx, ev_tx));
    tracing::info!(%local, %advertised, ?advertised_tcp, "media sockets ready");
    Ok((SfuHandle { tx, advertised }, ev_rx))
}

/// Kernel buffers for the media socket: bursts (keyframes, retransmissions, many subscribers)
/// must not overflow the default ~200 KiB between two turns of the driver loop.
const UDP_BUFFER: usize = 4 << 20;

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // The kernel may cap these (net.core.rmem_max); a smaller buffer is not an error.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Frames queued for one ICE-TCP connection before further ones are dropped.
const TCP_QUEUE: usize = 512;
/// Open ICE-TCP connections beyond which new ones are refused.
const MAX_TCP_CONNECTIONS: usize = 4096;
/// Largest RFC 4571 frame (the length prefix is 16 bits).
const MAX_FRAME: usize = u16::MAX as usize;

enum TcpInput {
    Frame(SocketAddr, Bytes),
    Closed(SocketAddr),
}

/// Reads RFC 4571 frames (a 16-bit length, then the packet) from one ICE-TCP connection.
async fn read_frames(mut reader: OwnedReadHalf, from: SocketAddr, input: mpsc::Sender<TcpInput>) {
    let mut len = [0u8; 2];
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        if reader.read_exact(&mut len).await.is_err() {
            break;
        }
        let n = u16::from_be_bytes(len) as usize;
        if reader.read_exact(&mut buf[..n]).await.is_err() {
            break;
        }
        if input
            .send(TcpInput::Frame(from, Bytes::copy_from_slice(&buf[..n])))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = input.send(TcpInput::Closed(from)).await;
}

async fn write_frames(mut writer: OwnedWriteHalf, mut frames: mpsc::Receiver<Bytes>) {
    while let Some(frame) = frames.recv().await {
        let len = (frame.len() as u16).to_be_bytes();
        if writer.write_all(&len).await.is_err() || writer.write_all(&frame).await.is_err() {
            break;
        }
    }
}

async fn run(
    socket: UdpSocket,
    listener: Option<TcpListener>,
    mut sfu: Sfu,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<SfuEvent>,
) {
    let mut buf = vec![0u8; 2048];
    let mut send_drops = 0u64;
    let mut out = Batch::default();
    let (tcp_tx, mut tcp_rx) = mpsc::channel::<TcpInput>(1024);
    let mut tcp_writers: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    loop {
        let deadline = sfu
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    sfu.handle_datagram(Instant::now(), from, &buf[..n]);
                }
                // Whatever else has arrived is handled in this turn: one trip through the select
                // (and its timer) per burst rather than per datagram.
                for _ in 0..RECV_BATCH {
                    let Ok((n, from)) = socket.try_recv_from(&mut buf) else {
                        break;
                    };
                    send_all(&mut sfu, &socket, &tcp_writers, &mut out, &mut send_drops);
                    sfu.handle_datagram(Instant::now(), from, &buf[..n]);
                }
            }
            accepted = async { listener.as_ref().expect("guarded by the if below").accept().await }, if listener.is_some() => {
                // Connections are unauthenticated until their first STUN check: cap them.
                if let Ok((stream, from)) = accepted.map_err(drop).and_then(|a| if tcp_writers.len() < MAX_TCP_CONNECTIONS { Ok(a) } else { Err(()) }) {
                    let _ = stream.set_nodelay(true);
                    let (reader, writer) = stream.into_split();
                    let (frames_tx, frames_rx) = mpsc::channel(TCP_QUEUE);
                    tcp_writers.insert(from, frames_tx);
                    tokio::spawn(read_frames(reader, from, tcp_tx.clone()));
                    tokio::spawn(write_frames(writer, frames_rx));
                }
            }
            input = tcp_rx.recv() => match input {
                Some(TcpInput::Frame(from, data)) => sfu.handle_tcp_frame(Instant::now(), from, &data),
                Some(TcpInput::Closed(from)) => {
                    tcp_writers.remove(&from);
                }
                None => {}
            },
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                let now = Instant::now();
                match cmd {
                    Command::CreatePeer { router, owner, direction, reply } => {
                        let _ = reply.send(sfu.create_peer(now, &router, &owner, direction));
                    }
                    Command::PublisherOffer { peer, sdp, reply } => {
                        let _ = reply.send(sfu.publisher_offer(now, peer, sdp));
                    }
                    Command::SubscriberAnswer { peer, sdp, reply } => {
                        let _ = reply.send(sfu.subscriber_answer(now, peer, sdp));
                    }
                    Command::ClosePeer { peer } => sfu.close_peer(now, peer),
                    Command::RemoveProducer { producer } => sfu.remove_producer(now, producer),
                    Command::SetPreference { peer, producer, layer } => sfu.set_preference(now, peer, producer, layer),
                    Command::Stats { reply } => {
                        let _ = reply.send(Snapshot {
                            stats: sfu.stats(),
                            peers: sfu.peer_count(),
                            producers: sfu.producer_count(),
                            send_drops,
                        });
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => sfu.handle_timeout(Instant::now()),
        }
        send_all(&mut sfu, &socket, &tcp_writers, &mut out, &mut send_drops);
        while let Some(ev) = sfu.poll_event() {
            let _ = events.send(ev);
        }
    }
}

/// Datagrams read without going back to the select loop, after the one that woke it.
const RECV_BATCH: usize = 64;

/// Puts everything the SFU has to send on the wire. Never waits on a socket: a full buffer
/// costs the datagrams that did not fit (counted), never a stalled loop.
fn send_all(
    sfu: &mut Sfu,
    socket: &UdpSocket,
    tcp_writers: &HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    out: &mut Batch,
    send_drops: &mut u64,
) {
    while let Some(t) = sfu.poll_transmit() {
        if t.tcp {
            let sent = tcp_writers
                .get(&t.to)
                .is_some_and(|w| w.try_send(t.data).is_ok());
            *send_drops += u64::from(!sent);
            continue;
        }
        out.queue.push(t);
        if out.queue.len() == SEND_BATCH {
            *send_drops += out.flush(socket);
        }
    }
    *send_drops += out.flush(socket);
}

/// Datagrams handed to the kernel in one system call.
const SEND_BATCH: usize = 64;

/// UDP datagrams waiting for one `sendmmsg` (one `sendto` each where there is none).
#[derive(Default)]
struct Batch {
    queue: Vec<crate::core::Transmit>,
}

impl Batch {
    /// Sends what is queued; returns how many datagrams were dropped.
    #[cfg(target_os = "linux")]
    fn flush(&mut self, socket: &UdpSocket) -> u64 {
        use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;
        let mut dropped = 0;
        let mut from = 0;
        while from < self.queue.len() {
            let rest = &self.queue[from..];
            let slices: Vec<[IoSlice<'_>; 1]> =
                rest.iter().map(|t| [IoSlice::new(&t.data)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = rest
                .iter()
                .map(|t| Some(SockaddrStorage::from(t.to)))
                .collect();
            // Built per call: it holds raw pointers, so it cannot live in the (Send) driver task.
            let mut headers = MultiHeaders::preallocate(rest.len(), None);
            let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
                sendmmsg(
                    socket.as_raw_fd(),
                    &mut headers,
                    &slices,
                    &addrs,
                    [],
                    MsgFlags::MSG_DONTWAIT,
                )
                .map(|r| r.count())
                .map_err(io::Error::from)
            });
            match sent {
                Ok(n) if n > 0 => from += n,
                // The buffer is full: the rest is dropped, as a lone sendto would drop it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dropped += (self.queue.len() - from) as u64;
                    break;
                }
                // The first datagram could not go (its destination unreachable, say): skip it.
                _ => {
                    dropped += 1;
                    from += 1;
                }
            }
        }
        self.queue.clear();
        dropped
    }

    #[cfg(not(target_os = "linux"))]
    fn flush(&mut self, socket: &UdpSocket) -> u64 {
        let dropped = self
            .queue
            .iter()
            .filter(|t| socket.try_send_to(&t.data, t.to).is_err())
            .count();
        self.queue.clear();
        dropped as u64
    }
}
