//! What the load clients talk to: a server behind a signaling adapter. The clients only see
//! SDP going up and down a [`Link`]; each adapter ([`crate::dangjian`], [`crate::janus`]) turns
//! that into its server's own protocol.

use std::any::Any;

use tokio::sync::mpsc;

/// What one client peer connection says to the server.
#[derive(Debug, Clone)]
pub enum Up {
    /// The publisher connection's offer; `tracks` labels its m-sections: (mid, source), source
    /// being `camera` or `microphone`.
    Offer {
        sdp: String,
        tracks: Vec<(String, String)>,
    },
    /// The subscriber connection's answer to the server's last offer.
    Answer { sdp: String },
}

/// What the server says to one client peer connection.
#[derive(Debug, Clone)]
pub enum Down {
    /// The answer to the publisher's offer.
    Answer { sdp: String },
    /// A (re)offer of the subscriber connection.
    Offer { sdp: String },
    /// The server refused something or the signaling channel broke; the client gives up.
    Failed(String),
}

/// One peer connection's signaling channel.
pub struct Link {
    pub up: mpsc::UnboundedSender<Up>,
    pub down: mpsc::UnboundedReceiver<Down>,
}

impl Link {
    /// Both ends: the client's [`Link`] and the adapter's (receives `Up`, sends `Down`).
    pub fn pair() -> (Link, AdapterEnd) {
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        (
            Link {
                up: up_tx,
                down: down_rx,
            },
            AdapterEnd {
                up: up_rx,
                down: down_tx,
            },
        )
    }
}

/// The adapter's side of a [`Link`].
pub struct AdapterEnd {
    pub up: mpsc::UnboundedReceiver<Up>,
    pub down: mpsc::UnboundedSender<Down>,
}

/// Who joins, and what for.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub room: String,
    pub identity: String,
    pub publish: bool,
    pub subscribe: bool,
    /// How many *other* publishers this participant should receive. Servers that subscribe
    /// explicitly (Janus) wait until that many are present; servers that push every track
    /// (dangjian) ignore it.
    pub expect_publishers: usize,
}

/// A joined participant: a link for each connection it asked for. Dropping it leaves.
pub struct Participant {
    pub publish: Option<Link>,
    pub subscribe: Option<Link>,
    /// Whatever keeps the adapter's session alive (a task's abort guard, a WebSocket...).
    pub keep: Box<dyn Any + Send>,
}

/// A media server under load.
#[async_trait::async_trait]
pub trait Target: Send + Sync {
    /// `dangjian` or `janus`.
    fn name(&self) -> &'static str;
    /// Makes the room ready for `publishers` publishers (Janus: creates it).
    async fn prepare(&self, room: &str, publishers: usize) -> anyhow::Result<()>;
    /// Joins `spec.room`; returns once the server accepted the participant.
    async fn join(&self, spec: &JoinSpec) -> anyhow::Result<Participant>;
}

/// Aborts a task when dropped: the usual [`Participant::keep`].
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
