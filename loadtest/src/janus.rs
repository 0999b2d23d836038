//! Janus's VideoRoom plugin (multistream, Janus 1.x) over Janus's HTTP API, as a [`Target`].
//!
//! One Janus session per participant, with a long-poll loop (`GET /janus/SESSION?maxev=10`,
//! which is also the session's keepalive) that hands each event to whoever waits for it: the
//! request with the same `transaction` (plugin requests with a JSEP, and `join`/`start`, are
//! answered `ack` at once and with an `event` later), else the handle named by its `sender`.
//!
//! - A publisher handle joins the room (`join`, `ptype: publisher`) in [`Target::join`]; when the
//!   client's offer comes up its link it sends `publish` with the offer and passes Janus's answer
//!   down.
//! - A subscriber handle waits until `expect_publishers` other participants publish (polling
//!   `listparticipants`), subscribes to all their streams in one `join` (`ptype: subscriber`),
//!   passes Janus's offer down and sends the client's answer back in `start`. Later offers (the
//!   `updated` events when a publisher leaves) go down as well.
//!
//! The clients put their host candidate in their SDP and send `"trickle": false` with it, so no
//! trickle messages are needed; Janus (half-trickle) puts its candidate in its SDP.
//!
//! Wire shapes (Janus 1.1.2):
//! - `{"janus":"create","transaction":T}` → `{"janus":"success","transaction":T,"data":{"id":S}}`
//! - `POST /janus/S {"janus":"attach","plugin":"janus.plugin.videoroom",…}` →
//!   `{"janus":"success","data":{"id":H}}`
//! - `POST /janus/S/H {"janus":"message","body":{…},"jsep":{…}}` → synchronous requests
//!   (`create`, `edit`, `listparticipants`): `{"janus":"success","plugindata":{"plugin":…,
//!   "data":{…}}}`; asynchronous ones: `{"janus":"ack"}`, then on the long poll
//!   `{"janus":"event","sender":H,"transaction":T,"plugindata":{…},"jsep":{…}}`.
//! - Plugin errors: `data` is `{"videoroom":"event","error_code":N,"error":"…"}`; core errors:
//!   `{"janus":"error","error":{"code":N,"reason":"…"}}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::target::{AdapterEnd, Down, JoinSpec, Link, Participant, Target, Up};

const PLUGIN: &str = "janus.plugin.videoroom";
/// Every request but the long poll.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Janus holds a long poll for 30 s before it answers with a keepalive.
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(40);
/// How long an acknowledged request's event may take (SDP processing, under load).
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a subscriber waits for the publishers it expects.
const PUBLISHER_WAIT: Duration = Duration::from_secs(60);
const PUBLISHER_POLL: Duration = Duration::from_millis(200);
/// VideoRoom's "room already exists".
const ERROR_ROOM_EXISTS: i64 = 427;

/// Janus's VideoRoom at one HTTP API base URL.
pub struct Janus {
    base: String,
    http: reqwest::Client,
    transactions: Arc<AtomicU64>,
}

impl Janus {
    /// `base` is the API's base URL, e.g. `http://10.77.0.2:8088/janus`.
    pub fn new(base: impl Into<String>) -> anyhow::Result<Janus> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(50))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Janus {
            base: base.into().trim_end_matches('/').to_string(),
            http,
            transactions: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The API at `addr` under `/janus` (as [`crate::netns::launch_janus`] starts it).
    pub fn at(addr: SocketAddr) -> anyhow::Result<Janus> {
        Janus::new(format!("http://{addr}{}", crate::netns::JANUS_BASE_PATH))
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /info`: the server's version, plugins and settings.
    pub async fn info(&self) -> anyhow::Result<Value> {
        let url = format!("{}/info", self.base);
        let resp = self
            .http
            .get(&url)
            .timeout(HTTP_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        resp.json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))
    }

    /// The room's participants as `listparticipants` lists them (`id`, `display`, `publisher`).
    pub async fn participants(&self, room: &str) -> anyhow::Result<Vec<Value>> {
        let s = self.session().await?;
        let r = async {
            let (handle, _events) = s.attach().await?;
            s.request(
                handle,
                json!({"request": "listparticipants", "room": room_id(room)}),
                None,
            )
            .await
        }
        .await;
        s.destroy().await;
        Ok(r?.data["participants"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn session(&self) -> anyhow::Result<Arc<Session>> {
        let tx = next_transaction(&self.transactions);
        let reply = post(
            &self.http,
            &self.base,
            json!({"janus": "create", "transaction": tx}),
        )
        .await
        .context("creating a Janus session")?;
        let id = reply["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus create: no session id in {reply}"))?;
        Ok(Arc::new(Session {
            http: self.http.clone(),
            url: format!("{}/{id}", self.base),
            transactions: self.transactions.clone(),
            pending: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
        }))
    }
}

/// The VideoRoom room number for a room name: the number itself for a decimal name, else a
/// stable 53-bit hash (JSON-safe), never 0.
pub fn room_id(name: &str) -> u64 {
    if let Ok(n) = name.parse::<u64>()
        && n > 0
    {
        return n;
    }
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) & ((1 << 53) - 1);
    h.max(1)
}

#[async_trait::async_trait]
impl Target for Janus {
    fn name(&self) -> &'static str {
        "janus"
    }

    /// Creates the room (or raises its publisher limit if it exists): VP8 and Opus only, no
    /// bitrate cap (no REMB from Janus), no periodic keyframe requests, no recording, no
    /// joining or audio-level notifications.
    async fn prepare(&self, room: &str, publishers: usize) -> anyhow::Result<()> {
        let id = room_id(room);
        let publishers = publishers.max(1);
        let s = self.session().await?;
        let result = async {
            let (handle, _events) = s.attach().await?;
            let created = s
                .request(
                    handle,
                    json!({
                        "request": "create",
                        "room": id,
                        "description": room,
                        "permanent": false,
                        "is_private": false,
                        "publishers": publishers,
                        "bitrate": 0,
                        "fir_freq": 0,
                        "videocodec": "vp8",
                        "audiocodec": "opus",
                        "record": false,
                        "notify_joining": false,
                        "audiolevel_event": false,
                    }),
                    None,
                )
                .await;
            match created {
                Ok(_) => Ok(()),
                Err(e)
                    if e.downcast_ref::<PluginError>().map(|p| p.code)
                        == Some(ERROR_ROOM_EXISTS) =>
                {
                    s.request(
                        handle,
                        json!({"request": "edit", "room": id, "new_publishers": publishers}),
                        None,
                    )
                    .await
                    .map(|_| ())
                    .with_context(|| format!("raising room {id}'s publisher limit"))
                }
                Err(e) => Err(e.context(format!("creating VideoRoom room {id} ({room})"))),
            }
        }
        .await;
        s.destroy().await;
        result
    }

    async fn join(&self, spec: &JoinSpec) -> anyhow::Result<Participant> {
        let room = room_id(&spec.room);
        let s = self.session().await?;
        let mut guard = SessionGuard {
            session: s.clone(),
            tasks: vec![tokio::spawn(s.clone().poll_loop())],
        };
        let mut own_feed = None;
        let publish = if spec.publish {
            let (handle, events) = s.attach().await?;
            let joined = s
                .request(
                    handle,
                    json!({
                        "request": "join",
                        "ptype": "publisher",
                        "room": room,
                        "display": spec.identity,
                    }),
                    None,
                )
                .await
                .with_context(|| format!("{} joining room {room} as a publisher", spec.identity))?;
            own_feed = joined.data.get("id").cloned();
            let (link, end) = Link::pair();
            guard
                .tasks
                .push(tokio::spawn(run_publisher(s.clone(), handle, end, events)));
            Some(link)
        } else {
            None
        };
        let subscribe = if spec.subscribe {
            let (handle, events) = s.attach().await?;
            let (link, end) = Link::pair();
            let sub = Subscriber {
                s: s.clone(),
                handle,
                room,
                own_feed,
                identity: spec.identity.clone(),
                expect: spec.expect_publishers.max(1),
            };
            guard.tasks.push(tokio::spawn(sub.run(end, events)));
            Some(link)
        } else {
            None
        };
        Ok(Participant {
            publish,
            subscribe,
            keep: Box::new(guard),
        })
    }
}

/// A VideoRoom error (`error_code`, `error`) in a plugin reply.
#[derive(Debug)]
pub struct PluginError {
    pub code: i64,
    pub message: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Janus VideoRoom error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for PluginError {}

/// A plugin's reply: its `plugindata.data`, and the JSEP that came with it.
#[derive(Debug)]
struct Reply {
    data: Value,
    jsep: Option<Value>,
}

impl Reply {
    /// The SDP of a JSEP of type `kind`.
    fn sdp(&self, kind: &str) -> anyhow::Result<String> {
        let jsep = self
            .jsep
            .as_ref()
            .ok_or_else(|| anyhow!("Janus sent no SDP {kind} (reply {})", self.data))?;
        if jsep["type"].as_str() != Some(kind) {
            bail!("Janus sent an SDP {} where an {kind} was due", jsep["type"]);
        }
        jsep["sdp"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("Janus's {kind} has no sdp"))
    }
}

fn plugin_reply(v: &Value) -> anyhow::Result<Reply> {
    let data = &v["plugindata"]["data"];
    if let Some(code) = data.get("error_code") {
        return Err(PluginError {
            code: code.as_i64().unwrap_or(-1),
            message: data["error"].as_str().unwrap_or("(no message)").to_string(),
        }
        .into());
    }
    if data.is_null() {
        bail!("Janus reply without plugin data: {v}");
    }
    Ok(Reply {
        data: data.clone(),
        jsep: v.get("jsep").filter(|j| j.is_object()).cloned(),
    })
}

fn next_transaction(counter: &AtomicU64) -> String {
    format!("t{}", counter.fetch_add(1, Ordering::Relaxed))
}

/// POSTs one Janus API request; a core error (`"janus": "error"`) is an error.
async fn post(http: &reqwest::Client, url: &str, body: Value) -> anyhow::Result<Value> {
    let resp = http
        .post(url)
        .json(&body)
        .timeout(HTTP_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .with_context(|| format!("POST {url}: HTTP {status}, not JSON"))?;
    if v["janus"] == "error" {
        bail!(
            "Janus error {}: {}",
            v["error"]["code"],
            v["error"]["reason"].as_str().unwrap_or("(no reason)")
        );
    }
    if !status.is_success() {
        bail!("POST {url}: HTTP {status}: {v}");
    }
    Ok(v)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One Janus session: its requests, and the routing of its long poll's events.
struct Session {
    http: reqwest::Client,
    /// `BASE/SESSION`.
    url: String,
    transactions: Arc<AtomicU64>,
    /// Acknowledged requests waiting for their event, by transaction.
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// Every other event, by handle.
    handles: Mutex<HashMap<u64, mpsc::UnboundedSender<Value>>>,
}

impl Session {
    async fn attach(&self) -> anyhow::Result<(u64, mpsc::UnboundedReceiver<Value>)> {
        let tx = next_transaction(&self.transactions);
        let reply = post(
            &self.http,
            &self.url,
            json!({"janus": "attach", "plugin": PLUGIN, "transaction": tx}),
        )
        .await
        .context("attaching to the VideoRoom plugin")?;
        let id = reply["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus attach: no handle id in {reply}"))?;
        let (events_tx, events) = mpsc::unbounded_channel();
        lock(&self.handles).insert(id, events_tx);
        Ok((id, events))
    }

    /// Sends a plugin message; returns the plugin's reply, synchronous or (after an `ack`) the
    /// event with the same transaction.
    async fn request(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<Reply> {
        let what = body["request"].as_str().unwrap_or("?").to_string();
        let tx = next_transaction(&self.transactions);
        let (done, event) = oneshot::channel();
        lock(&self.pending).insert(tx.clone(), done);
        let mut msg = json!({"janus": "message", "transaction": tx});
        msg["body"] = body;
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        let reply = post(&self.http, &format!("{}/{handle}", self.url), msg).await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                lock(&self.pending).remove(&tx);
                return Err(e.context(format!("VideoRoom `{what}`")));
            }
        };
        match reply["janus"].as_str() {
            Some("success") => {
                lock(&self.pending).remove(&tx);
                plugin_reply(&reply)
            }
            Some("ack") => match tokio::time::timeout(EVENT_TIMEOUT, event).await {
                Ok(Ok(ev)) => plugin_reply(&ev),
                Ok(Err(_)) => bail!("VideoRoom `{what}`: the Janus session ended"),
                Err(_) => {
                    lock(&self.pending).remove(&tx);
                    bail!(
                        "VideoRoom `{what}`: no answer from Janus within {} s",
                        EVENT_TIMEOUT.as_secs()
                    )
                }
            },
            _ => {
                lock(&self.pending).remove(&tx);
                bail!("VideoRoom `{what}`: unexpected reply {reply}")
            }
        }
    }

    /// The session's long poll, until the session ends; then every handle hears of it.
    async fn poll_loop(self: Arc<Self>) {
        let url = format!("{}?maxev=10", self.url);
        let mut failures = 0;
        let reason = loop {
            let got = async {
                let resp = self
                    .http
                    .get(&url)
                    .timeout(LONG_POLL_TIMEOUT)
                    .send()
                    .await?;
                resp.json::<Value>().await
            }
            .await;
            match got {
                Ok(v) => {
                    failures = 0;
                    let events = match v {
                        Value::Array(a) => a,
                        other => vec![other],
                    };
                    if let Some(reason) = events.into_iter().find_map(|e| self.dispatch(e)) {
                        break reason;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures >= 3 {
                        break format!("Janus long poll failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        tracing::debug!(session = %self.url, %reason, "Janus session over");
        lock(&self.pending).clear();
        for (_, h) in lock(&self.handles).drain() {
            let _ = h.send(json!({"janus": "failed", "reason": reason}));
        }
    }

    /// Routes one event; `Some(reason)` when the session is over.
    fn dispatch(&self, ev: Value) -> Option<String> {
        match ev["janus"].as_str() {
            Some("keepalive") => return None,
            Some("timeout") => return Some("the Janus session timed out".into()),
            Some("error") if ev.get("sender").is_none() => {
                return Some(format!(
                    "Janus error {}: {}",
                    ev["error"]["code"],
                    ev["error"]["reason"].as_str().unwrap_or("(no reason)")
                ));
            }
            _ => {}
        }
        if ev["janus"] == "event"
            && let Some(tx) = ev["transaction"].as_str()
            && let Some(waiter) = lock(&self.pending).remove(tx)
        {
            let _ = waiter.send(ev);
            return None;
        }
        if let Some(sender) = ev["sender"].as_u64()
            && let Some(h) = lock(&self.handles).get(&sender)
        {
            let _ = h.send(ev);
        }
        None
    }

    /// Destroys the session (Janus hangs up its peer connections and leaves the room).
    async fn destroy(&self) {
        let tx = next_transaction(&self.transactions);
        let _ = post(
            &self.http,
            &self.url,
            json!({"janus": "destroy", "transaction": tx}),
        )
        .await;
    }
}

/// [`Participant::keep`]: dropping it stops the session's tasks and destroys the session.
struct SessionGuard {
    session: Arc<Session>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let s = self.session.clone();
            rt.spawn(async move { s.destroy().await });
        }
    }
}

/// Why the next event ends the connection, if it does (`None`: the session's events ended).
fn ended(ev: Option<&Value>) -> Option<String> {
    ev.map_or(Some("Janus session over".into()), fatal)
}

/// Why a handle event ends the connection, if it does.
fn fatal(ev: &Value) -> Option<String> {
    match ev["janus"].as_str() {
        Some("failed") => Some(ev["reason"].as_str().unwrap_or("Janus session over").into()),
        Some("hangup") => Some(format!(
            "Janus hung up: {}",
            ev["reason"].as_str().unwrap_or("(no reason)")
        )),
        Some("detached") => Some("Janus detached the handle".into()),
        Some("event") => {
            let data = &ev["plugindata"]["data"];
            if let Some(code) = data.get("error_code") {
                return Some(format!(
                    "Janus VideoRoom error {code}: {}",
                    data["error"].as_str().unwrap_or("(no message)")
                ));
            }
            // (Others' departures, `"leaving": ID` or `"kicked": ID`, are not ours.)
            match data["videoroom"].as_str() {
                Some("destroyed") => Some("the room was destroyed".into()),
                _ if data["leaving"] == "ok" => Some(format!(
                    "Janus removed the participant from the room ({})",
                    data["reason"].as_str().unwrap_or("no reason given")
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The publisher connection: the client's offers go up in `publish` (then `configure`),
/// Janus's answers come down.
async fn run_publisher(
    s: Arc<Session>,
    handle: u64,
    mut end: AdapterEnd,
    mut events: mpsc::UnboundedReceiver<Value>,
) {
    let mut published = false;
    loop {
        tokio::select! {
            up = end.up.recv() => match up {
                None => return,
                Some(Up::Offer { sdp, tracks }) => {
                    let descriptions: Vec<Value> = tracks
                        .iter()
                        .map(|(mid, source)| json!({"mid": mid, "description": source}))
                        .collect();
                    let request = if published { "configure" } else { "publish" };
                    let mut jsep = json!({"type": "offer", "sdp": sdp, "trickle": false});
                    if let Some(order) = rid_order(&sdp) {
                        jsep["rid_order"] = order.into();
                    }
                    let reply = s
                        .request(
                            handle,
                            json!({"request": request, "descriptions": descriptions}),
                            Some(jsep),
                        )
                        .await
                        .and_then(|r| r.sdp("answer"));
                    match reply {
                        Ok(sdp) => {
                            published = true;
                            let _ = end.down.send(Down::Answer { sdp });
                        }
                        Err(e) => {
                            let _ = end.down.send(Down::Failed(format!("{e:#}")));
                            return;
                        }
                    }
                }
                Some(Up::Answer { .. }) => {
                    tracing::warn!("publisher connection sent an answer; Janus made it no offer");
                }
            },
            ev = events.recv() => {
                if let Some(why) = ended(ev.as_ref()) {
                    let _ = end.down.send(Down::Failed(why));
                    return;
                }
            }
        }
    }
}

/// The order of an offer's simulcast layers for Janus's `rid_order`: `lmh` when the rids of
/// `a=simulcast:send` go from the lowest quality up (`q;h;f`, `l;m;h`, `low;mid;high`, as the
/// load clients send them), `hml` when they go down; `None` without simulcast or with names
/// that say nothing. Janus assumes `hml` (the first rid is the best), and would otherwise
/// serve a subscriber asking for substream 2 the smallest picture.
fn rid_order(sdp: &str) -> Option<&'static str> {
    let rids: Vec<&str> = sdp
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("a=simulcast:send "))?
        .split(' ')
        .next()?
        .split(';')
        .map(|alt| alt.split(',').next().unwrap_or(alt).trim_start_matches('~'))
        .collect();
    const SCHEMES: [&[&str]; 3] = [&["q", "h", "f"], &["l", "m", "h"], &["low", "mid", "high"]];
    SCHEMES.iter().find_map(|scheme| {
        let ranks: Option<Vec<usize>> = rids
            .iter()
            .map(|r| scheme.iter().position(|s| s.eq_ignore_ascii_case(r)))
            .collect();
        let ranks = ranks.filter(|r| r.len() > 1)?;
        if ranks.windows(2).all(|w| w[0] < w[1]) {
            Some("lmh")
        } else if ranks.windows(2).all(|w| w[0] > w[1]) {
            Some("hml")
        } else {
            None
        }
    })
}

struct Subscriber {
    s: Arc<Session>,
    handle: u64,
    room: u64,
    /// This participant's own publisher feed, not to be subscribed to.
    own_feed: Option<Value>,
    identity: String,
    /// How many other publishers to wait for (at least one).
    expect: usize,
}

impl Subscriber {
    async fn run(self, mut end: AdapterEnd, mut events: mpsc::UnboundedReceiver<Value>) {
        let feeds = tokio::select! {
            f = self.wait_for_feeds() => f,
            // The client gave up (dropped its link) while we waited.
            _ = wait_closed(&mut end) => return,
        };
        let offer = match feeds {
            Ok(feeds) => self.subscribe(&feeds).await,
            Err(e) => Err(e),
        };
        match offer {
            Ok(sdp) => {
                let _ = end.down.send(Down::Offer { sdp });
            }
            Err(e) => {
                let _ = end.down.send(Down::Failed(format!("{e:#}")));
                return;
            }
        }
        loop {
            tokio::select! {
                up = end.up.recv() => match up {
                    None => return,
                    Some(Up::Answer { sdp }) => {
                        let r = self
                            .s
                            .request(
                                self.handle,
                                json!({"request": "start"}),
                                Some(json!({"type": "answer", "sdp": sdp, "trickle": false})),
                            )
                            .await;
                        if let Err(e) = r {
                            let _ = end.down.send(Down::Failed(format!("{e:#}")));
                            return;
                        }
                    }
                    Some(Up::Offer { .. }) => {
                        tracing::warn!("subscriber connection sent an offer; Janus offers here");
                    }
                },
                ev = events.recv() => {
                    if let Some(why) = ended(ev.as_ref()) {
                        let _ = end.down.send(Down::Failed(why));
                        return;
                    }
                    // A renegotiation ("updated", e.g. when a publisher left).
                    if let Some(ev) = ev
                        && ev["jsep"]["type"] == "offer"
                        && let Some(sdp) = ev["jsep"]["sdp"].as_str()
                    {
                        let _ = end.down.send(Down::Offer { sdp: sdp.to_string() });
                    }
                }
            }
        }
    }

    /// Polls `listparticipants` until `expect` other participants publish; returns their feeds.
    async fn wait_for_feeds(&self) -> anyhow::Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + PUBLISHER_WAIT;
        let mut last;
        loop {
            let r = self
                .s
                .request(
                    self.handle,
                    json!({"request": "listparticipants", "room": self.room}),
                    None,
                )
                .await
                .context("listing the room's participants")?;
            let feeds: Vec<Value> = r.data["participants"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["publisher"] == true)
                        .filter(|p| self.own_feed.as_ref() != p.get("id"))
                        .filter(|p| p["display"].as_str() != Some(self.identity.as_str()))
                        .filter_map(|p| p.get("id").cloned())
                        .collect()
                })
                .unwrap_or_default();
            last = feeds.len();
            if feeds.len() >= self.expect {
                return Ok(feeds);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(PUBLISHER_POLL).await;
        }
        bail!(
            "only {last} of the {} publishers expected in room {} after {} s",
            self.expect,
            self.room,
            PUBLISHER_WAIT.as_secs()
        )
    }

    /// Subscribes to every stream of `feeds` (the highest simulcast layer, all temporal
    /// layers); returns Janus's offer.
    async fn subscribe(&self, feeds: &[Value]) -> anyhow::Result<String> {
        let streams: Vec<Value> = feeds
            .iter()
            .map(|f| json!({"feed": f, "substream": 2, "temporal": 2}))
            .collect();
        self.s
            .request(
                self.handle,
                json!({
                    "request": "join",
                    "ptype": "subscriber",
                    "room": self.room,
                    "streams": streams,
                }),
                None,
            )
            .await
            .and_then(|r| r.sdp("offer"))
            .with_context(|| format!("subscribing to {} feeds", feeds.len()))
    }
}

/// Resolves when the client has dropped its end of the link (nothing else comes up meanwhile:
/// the subscriber's client only answers offers).
async fn wait_closed(end: &mut AdapterEnd) {
    while end.up.recv().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_are_stable_and_json_safe() {
        assert_eq!(room_id("1234"), 1234);
        assert_eq!(room_id("load"), room_id("load"));
        assert_ne!(room_id("load"), room_id("load2"));
        assert!(room_id("load") < 1 << 53);
        assert!(room_id("0") > 0);
    }

    #[test]
    fn rid_order_follows_the_offer() {
        let sdp = |line: &str| format!("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n{line}\r\n");
        assert_eq!(rid_order(&sdp("a=simulcast:send q;h;f")), Some("lmh"));
        assert_eq!(rid_order(&sdp("a=simulcast:send h;m;l")), Some("hml"));
        assert_eq!(rid_order(&sdp("a=simulcast:send f;~h;q")), Some("hml"));
        assert_eq!(rid_order(&sdp("a=simulcast:send low;high")), Some("lmh"));
        assert_eq!(rid_order(&sdp("a=simulcast:send a;b;c")), None);
        assert_eq!(rid_order(&sdp("a=sendonly")), None);
    }

    #[test]
    fn replies_and_errors() {
        let ok = json!({"janus": "event", "plugindata": {"plugin": PLUGIN, "data": {"videoroom": "attached"}},
            "jsep": {"type": "offer", "sdp": "v=0"}});
        let r = plugin_reply(&ok).unwrap();
        assert_eq!(r.sdp("offer").unwrap(), "v=0");
        assert!(r.sdp("answer").is_err());
        let err = json!({"janus": "success", "plugindata": {"plugin": PLUGIN,
            "data": {"videoroom": "event", "error_code": 427, "error": "Room 1 already exists"}}});
        let e = plugin_reply(&err).unwrap_err();
        assert_eq!(e.downcast_ref::<PluginError>().unwrap().code, 427);
        assert!(fatal(&json!({"janus": "hangup", "reason": "DTLS alert"})).is_some());
        assert!(fatal(&json!({"janus": "webrtcup"})).is_none());
        let others =
            json!({"janus": "event", "plugindata": {"data": {"videoroom": "event", "kicked": 5}}});
        assert!(fatal(&others).is_none());
        let me = json!({"janus": "event", "plugindata": {"data": {"videoroom": "event", "leaving": "ok", "reason": "kicked"}}});
        assert!(fatal(&me).unwrap().contains("kicked"));
        assert!(fatal(&json!({"janus": "event", "plugindata": {"data": {"videoroom": "event", "publishers": []}}})).is_none());
    }
}
