//! The spool: segments go to local disk first, then to the object store.
//!
//! A segment is written to `{dir}/{key}` (through a temporary name, so a crash never leaves half
//! a file under a real name) and a single uploader task sends every spooled file to the store
//! under the same key, deleting it once stored. When the store fails, the uploader backs off
//! (1 s doubling to 30 s) and tries again, so an outage only makes the spool grow; after a
//! restart the uploader finds what the previous process left and sends it too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{Notify, watch};

const TMP_SUFFIX: &str = ".partial";
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Rescans the directory this often even without news (files a previous process left).
const RESCAN: Duration = Duration::from_secs(5);

/// Cheap to clone; every clone feeds the same uploader.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    store: Arc<dyn ObjectStore>,
    wake: Notify,
    /// Counts completed upload passes, so that waiters learn when to look again.
    passes: watch::Sender<u64>,
}

impl Spool {
    /// Opens (creating) the spool directory and starts the uploader on the current runtime.
    pub fn start(dir: PathBuf, store: Arc<dyn ObjectStore>) -> std::io::Result<Spool> {
        std::fs::create_dir_all(&dir)?;
        let spool = Spool {
            inner: Arc::new(Inner {
                dir,
                store,
                wake: Notify::new(),
                passes: watch::channel(0).0,
            }),
        };
        tokio::spawn(spool.clone().upload_forever());
        Ok(spool)
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// Keeps `bytes` for upload under `key`. Returns once it is safely on local disk.
    pub async fn put(&self, key: &str, bytes: Bytes) -> std::io::Result<()> {
        let path = self.inner.dir.join(key);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let tmp = path.with_extension(format!("seg{TMP_SUFFIX}"));
        tokio::fs::write(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, &path).await?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Keys of the files still waiting under `prefix`.
    pub fn pending(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        collect(&self.inner.dir, &self.inner.dir.join(prefix), &mut out);
        out.sort();
        out
    }

    /// Waits until nothing under `prefix` waits for upload, or `limit` passes. True when drained.
    pub async fn drained(&self, prefix: &str, limit: Duration) -> bool {
        let mut passes = self.inner.passes.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.pending(prefix).is_empty() {
                return true;
            }
            self.inner.wake.notify_one();
            if tokio::time::timeout_at(deadline, passes.changed())
                .await
                .is_err()
            {
                return self.pending(prefix).is_empty();
            }
        }
    }

    /// Forgets whatever waits under `prefix` (the recording was deleted).
    pub async fn discard(&self, prefix: &str) {
        let _ = tokio::fs::remove_dir_all(self.inner.dir.join(prefix)).await;
    }

    async fn upload_forever(self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let ok = self.upload_pass().await;
            self.inner.passes.send_modify(|n| *n += 1);
            if ok {
                backoff = BACKOFF_MIN;
                let _ = tokio::time::timeout(RESCAN, self.inner.wake.notified()).await;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Uploads every spooled file, oldest key first; false when the store refused one.
    async fn upload_pass(&self) -> bool {
        for key in self.pending("") {
            let path = self.inner.dir.join(&key);
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue; // discarded meanwhile
            };
            match self
                .inner
                .store
                .put(&StorePath::from(key.as_str()), PutPayload::from(bytes))
                .await
            {
                Ok(_) => {
                    let _ = tokio::fs::remove_file(&path).await;
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "segment upload failed; will retry");
                    return false;
                }
            }
        }
        true
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            collect(root, &path, out);
        } else if !path.to_string_lossy().ends_with(TMP_SUFFIX)
            && let Ok(rel) = path.strip_prefix(root)
        {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;

    #[tokio::test]
    async fn segments_reach_the_store_and_leave_the_spool() {
        let spool_dir = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalFileSystem::new_with_prefix(store_dir.path()).unwrap());
        let spool = Spool::start(spool_dir.path().into(), store.clone()).unwrap();
        spool
            .put(
                "recordings/r1/tracks/TR_1/000000.seg",
                Bytes::from_static(b"one"),
            )
            .await
            .unwrap();
        spool
            .put(
                "recordings/r1/tracks/TR_1/000001.seg",
                Bytes::from_static(b"two"),
            )
            .await
            .unwrap();
        assert!(
            spool
                .drained("recordings/r1/", Duration::from_secs(10))
                .await
        );
        let got = store
            .get(&StorePath::from("recordings/r1/tracks/TR_1/000001.seg"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], b"two");
        assert!(spool.pending("").is_empty());
    }

    #[tokio::test]
    async fn what_a_previous_process_left_is_uploaded() {
        let spool_dir = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let left = spool_dir
            .path()
            .join("recordings/r2/tracks/TR_1/000003.seg");
        std::fs::create_dir_all(left.parent().unwrap()).unwrap();
        std::fs::write(&left, b"left over").unwrap();
        std::fs::write(left.with_extension("seg.partial"), b"half").unwrap();
        let store = Arc::new(LocalFileSystem::new_with_prefix(store_dir.path()).unwrap());
        let spool = Spool::start(spool_dir.path().into(), store.clone()).unwrap();
        assert!(
            spool
                .drained("recordings/r2/", Duration::from_secs(10))
                .await
        );
        assert!(
            store_dir
                .path()
                .join("recordings/r2/tracks/TR_1/000003.seg")
                .exists()
        );
        assert!(
            !store_dir
                .path()
                .join("recordings/r2/tracks/TR_1/000003.seg.partial")
                .exists()
        );
    }
}
