//! The thin driver: one task owns the shared UDP socket, the timers and the [`Sfu`]; signaling
//! talks to it through an [`SfuHandle`] and hears back through a channel of [`SfuEvent`]s.
//! Everything on the media path stays in this one task, so no lock is shared between peers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
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
) -> io::Result<(SfuHandle, mpsc::UnboundedReceiver<SfuEvent>)> {
    let socket = UdpSocket::bind(bind).await?;
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
    let sfu = Sfu::new(SfuConfig { advertised }).map_err(|e| io::Error::other(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    tokio::spawn(run(socket, sfu, rx, ev_tx));
    tracing::info!(%local, %advertised, "media socket ready");
    Ok((SfuHandle { tx, advertised }, ev_rx))
}

async fn run(
    socket: UdpSocket,
    mut sfu: Sfu,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<SfuEvent>,
) {
    let mut buf = vec![0u8; 2048];
    let mut send_drops = 0u64;
    loop {
        let deadline = sfu
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    sfu.handle_datagram(Instant::now(), from, &buf[..n]);
                }
            }
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
        while let Some(t) = sfu.poll_transmit() {
            // Never wait on the socket: a full buffer costs this datagram, not everyone's.
            if socket.try_send_to(&t.data, t.to).is_err() {
                send_drops += 1;
            }
        }
        while let Some(ev) = sfu.poll_event() {
            let _ = events.send(ev);
        }
    }
}
