//! The recorder service: which recordings are capturing, and finalising them into replays.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use signaling::token::{Grants, TokenKey, TokenRequest};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::capture::{self, Capture, Summary};
use crate::compose::{self, TrackInput};
use crate::originals::{self, OriginalObject};
use crate::segment::TrackMeta;
use crate::spool::Spool;

/// How long finalising waits for spooled segments to reach a store that is down.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);
/// Replay parts uploaded at once (S3's minimum part is 5 MiB).
const PART: usize = 8 << 20;
const UPLOAD_TRIES: u32 = 8;

/// What the binary hands the recorder.
#[derive(Clone)]
pub struct RecorderConfig {
    /// The server's own signaling endpoint, e.g. `ws://127.0.0.1:8080/rtc`.
    pub rtc_url: String,
    /// Signs the recorder's own (hidden, subscribe-only) access tokens.
    pub tokens: TokenKey,
    pub store: Arc<dyn ObjectStore>,
    /// Segments wait here until the object store has them.
    pub spool_dir: PathBuf,
}

/// Said when a capture ends without being asked to stop (the room closed, or it failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecorderEvent {
    Ended { id: String, error: Option<String> },
}

/// A finished replay in the object store.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    pub key: String,
    pub size: u64,
    pub duration_ms: i64,
    pub tracks: Vec<TrackMeta>,
    /// When the replay starts showing a screen share (ms), and whose: chapter marks.
    pub screen_shares: Vec<(i64, String)>,
    /// Each track remuxed on its own (a track that cannot be exported is left out).
    pub originals: Vec<OriginalObject>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("recording {0} is already capturing")]
    AlreadyRecording(String),
    #[error("recording {0} is not capturing")]
    NotRecording(String),
    #[error("nothing was recorded")]
    Empty,
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("composing the replay: {0}")]
    Compose(#[from] crate::compose::ComposeError),
    #[error("{0}")]
    Other(String),
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<Summary, String>>,
}

struct Inner {
    config: RecorderConfig,
    spool: Spool,
    running: Mutex<HashMap<String, Running>>,
    events: mpsc::UnboundedSender<RecorderEvent>,
    segment: Duration,
}

/// The switches of the shown video to a screen share, with the sharer.
fn screen_shares(switches: &[(i64, String)], tracks: &[TrackMeta]) -> Vec<(i64, String)> {
    switches
        .iter()
        .filter_map(|(at, track)| {
            let t = tracks.iter().find(|t| &t.track == track)?;
            (t.source == "screen").then(|| (*at, t.participant.clone()))
        })
        .collect()
}

/// Cheap to clone; all clones drive the same captures.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

impl Recorder {
    /// Starts the spool's uploader (which also sends what a previous process left).
    pub fn new(config: RecorderConfig) -> (Recorder, mpsc::UnboundedReceiver<RecorderEvent>) {
        Self::with_segment(config, Duration::from_secs(crate::SEGMENT_SECONDS))
    }

    /// As [`Recorder::new`] with another segment length (tests).
    pub fn with_segment(
        config: RecorderConfig,
        segment: Duration,
    ) -> (Recorder, mpsc::UnboundedReceiver<RecorderEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let spool = Spool::start(config.spool_dir.clone(), config.store.clone())
            .unwrap_or_else(|e| panic!("cannot open the spool {:?}: {e}", config.spool_dir));
        let inner = Inner {
            config,
            spool,
            running: Mutex::new(HashMap::new()),
            events,
            segment,
        };
        (
            Recorder {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.inner.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts capturing `room` as recording `id`.
    pub fn start(&self, id: &str, room: &str) -> Result<(), RecorderError> {
        let mut running = self.running();
        if running.contains_key(id) {
            return Err(RecorderError::AlreadyRecording(id.into()));
        }
        let token = self
            .inner
            .config
            .tokens
            .mint(&TokenRequest {
                room: room.into(),
                identity: format!("recorder-{id}"),
                name: "录制".into(),
                grants: Grants {
                    subscribe: true,
                    hidden: true,
                    ..Grants::default()
                },
                ttl: Duration::from_secs(7 * 24 * 3600),
            })
            .map_err(|e| RecorderError::Other(e.to_string()))?;
        let capture = Capture {
            id: id.into(),
            url: format!(
                "{}?access_token={token}&codecs=h264,vp8",
                self.inner.config.rtc_url
            ),
            spool: self.inner.spool.clone(),
            started: Instant::now(),
            segment: self.inner.segment,
        };
        let (stop, stop_rx) = watch::channel(false);
        let this = self.clone();
        let id_owned = id.to_string();
        let task = tokio::spawn(async move {
            let result = capture::run(capture, stop_rx).await;
            // Still listed means nobody asked it to stop: it ended on its own.
            if this.running().remove(&id_owned).is_some() {
                let error = result.as_ref().err().cloned();
                let _ = this.inner.events.send(RecorderEvent::Ended {
                    id: id_owned,
                    error,
                });
            }
            result
        });
        running.insert(id.into(), Running { stop, task });
        Ok(())
    }

    /// Stops capturing; the last partial segments are spooled before it returns.
    pub async fn stop(&self, id: &str) -> Result<(), RecorderError> {
        let r = self
            .running()
            .remove(id)
            .ok_or_else(|| RecorderError::NotRecording(id.into()))?;
        let _ = r.stop.send(true);
        match r.task.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(RecorderError::Other(e)),
            Err(e) => Err(RecorderError::Other(format!("capture task failed: {e}"))),
        }
    }

    pub fn is_capturing(&self, id: &str) -> bool {
        self.running().contains_key(id)
    }

    /// Waits for recording `id`'s segments to reach the object store, composes the replay from
    /// them and uploads it. Works after a restart, from whatever was uploaded or spooled.
    pub async fn finalize(&self, id: &str) -> Result<Replay, RecorderError> {
        let prefix = crate::prefix(id);
        if !self.inner.spool.drained(&prefix, DRAIN_LIMIT).await {
            return Err(RecorderError::Other(
                "the object store stayed unreachable; segments are still spooled".into(),
            ));
        }
        let work = tempfile::tempdir().map_err(|e| RecorderError::Other(e.to_string()))?;
        let tracks = self.download_segments(id, work.path()).await?;
        if tracks.is_empty() {
            return Err(RecorderError::Empty);
        }
        let out = work.path().join("replay.mp4");
        let (inputs, out2) = (tracks.clone(), out.clone());
        let report = tokio::task::spawn_blocking(move || compose::compose(&inputs, &out2))
            .await
            .map_err(|e| RecorderError::Other(format!("compose task failed: {e}")))??;
        let key = crate::replay_key(id);
        let size = self.upload_file(&out, &key).await?;
        let originals = self.export_originals(id, &tracks, work.path()).await;
        let metas: Vec<TrackMeta> = tracks.into_iter().map(|t| t.meta).collect();
        Ok(Replay {
            key,
            size,
            duration_ms: report.duration_ms,
            screen_shares: screen_shares(&report.switches, &metas),
            tracks: metas,
            originals,
        })
    }

    /// Remuxes every track on its own and uploads it. A track that fails is logged and left
    /// out: the replay stands without it.
    async fn export_originals(
        &self,
        id: &str,
        tracks: &[TrackInput],
        work: &std::path::Path,
    ) -> Vec<OriginalObject> {
        let dir = work.join("originals");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(recording = id, error = %e, "no room for the originals");
            return Vec::new();
        }
        let mut out = Vec::new();
        for track in tracks {
            let (input, dir2) = (track.clone(), dir.clone());
            let exported = tokio::task::spawn_blocking(move || originals::export(&input, &dir2))
                .await
                .map_err(|e| format!("export task failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
            let original = match exported {
                Ok(o) => o,
                Err(error) => {
                    tracing::warn!(recording = id, track = %track.meta.track, error, "original not exported");
                    continue;
                }
            };
            let key = originals::original_key(id, &original.track, original.codec);
            match self.upload_file(&original.file, &key).await {
                Ok(size) => out.push(OriginalObject {
                    track: original.track,
                    participant: original.participant,
                    kind: original.kind,
                    source: original.source,
                    key,
                    size,
                    start_ms: original.start_ms,
                    duration_ms: original.duration_ms,
                }),
                Err(e) => {
                    tracing::warn!(recording = id, track = %original.track, error = %e, "original not uploaded");
                }
            }
            let _ = std::fs::remove_file(&original.file);
        }
        out
    }

    /// Fetches every stored segment of `id` into `dir`, grouped by track in sequence order.
    async fn download_segments(
        &self,
        id: &str,
        dir: &std::path::Path,
    ) -> Result<Vec<TrackInput>, RecorderError> {
        let store = &self.inner.config.store;
        let prefix = StorePath::from(format!("{}tracks", crate::prefix(id)));
        let mut keys: Vec<StorePath> = store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        keys.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let mut by_track: BTreeMap<String, TrackInput> = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            let bytes = store.get(key).await?.bytes().await?;
            let Ok(seg) = crate::segment::decode(&bytes) else {
                tracing::warn!(%key, "skipping a damaged segment");
                continue;
            };
            let path = dir.join(format!("{i:08}.seg"));
            tokio::fs::write(&path, &bytes)
                .await
                .map_err(|e| RecorderError::Other(e.to_string()))?;
            by_track
                .entry(seg.meta.track.clone())
                .or_insert_with(|| TrackInput {
                    meta: seg.meta.clone(),
                    segments: Vec::new(),
                })
                .segments
                .push(path);
        }
        Ok(by_track.into_values().collect())
    }

    /// Multipart upload of a local file, retried with backoff. Returns its size.
    async fn upload_file(&self, file: &std::path::Path, key: &str) -> Result<u64, RecorderError> {
        let mut backoff = Duration::from_secs(1);
        let mut tries = 0;
        loop {
            match self.upload_once(file, key).await {
                Ok(n) => return Ok(n),
                Err(e) if tries + 1 >= UPLOAD_TRIES => return Err(e),
                Err(e) => tracing::warn!(key, error = %e, "replay upload failed; retrying"),
            }
            tries += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn upload_once(&self, file: &std::path::Path, key: &str) -> Result<u64, RecorderError> {
        use tokio::io::AsyncReadExt;
        let store = &self.inner.config.store;
        let upload = store.put_multipart(&StorePath::from(key)).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| RecorderError::Other(e.to_string()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| RecorderError::Other(e.to_string()))?;
            if n == 0 {
                break;
            }
            w.wait_for_capacity(4).await?;
            w.write(&buf[..n]);
            size += n as u64;
        }
        w.finish().await?;
        Ok(size)
    }

    /// Removes every object of recording `id` (segments, replay) and its spool.
    pub async fn delete(&self, id: &str) -> Result<(), RecorderError> {
        let prefix = crate::prefix(id);
        self.inner.spool.discard(&prefix).await;
        let store = &self.inner.config.store;
        let keys: Vec<StorePath> = store
            .list(Some(&StorePath::from(prefix.as_str())))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        for k in keys {
            match store.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
