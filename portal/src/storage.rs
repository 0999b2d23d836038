//! The object store: local disk by default, any S3-compatible server by URL.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

/// A store plus a description that is safe to log (no keys).
#[derive(Clone, Debug)]
pub struct Storage {
    pub store: Arc<dyn ObjectStore>,
    pub describe: String,
}

/// S3 credentials, handed in from configuration; never logged.
#[derive(Clone, Default)]
pub struct S3Keys {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage URL: {0}")]
    Url(String),
    #[error("cannot open object store: {0}")]
    Open(#[from] object_store::Error),
    #[error("cannot create {0}: {1}")]
    Dir(String, std::io::Error),
}

impl Storage {
    /// Local disk under `dir` (created when missing).
    pub fn local(dir: &Path) -> Result<Storage, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Dir(dir.display().to_string(), e))?;
        Ok(Storage {
            store: Arc::new(LocalFileSystem::new_with_prefix(dir)?),
            describe: format!("local disk {}", dir.display()),
        })
    }

    /// `s3://BUCKET?endpoint=http://HOST:PORT&region=REGION`, path-style requests.
    pub fn s3(url: &str, keys: &S3Keys) -> Result<Storage, StorageError> {
        let parsed = url::Url::parse(url).map_err(|e| StorageError::Url(e.to_string()))?;
        if parsed.scheme() != "s3" {
            return Err(StorageError::Url(format!(
                "unsupported scheme `{}` (use s3://BUCKET?endpoint=…&region=…)",
                parsed.scheme()
            )));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| StorageError::Url("missing bucket name".into()))?
            .to_string();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(10),
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(60)),
            );
        let mut endpoint = None;
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "endpoint" => endpoint = Some(v.to_string()),
                "region" => builder = builder.with_region(v.to_string()),
                other => {
                    return Err(StorageError::Url(format!(
                        "unknown parameter `{other}` (expected endpoint, region)"
                    )));
                }
            }
        }
        if let Some(ep) = &endpoint {
            builder = builder
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        match (&keys.access_key_id, &keys.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
            }
            (None, None) => {}
            _ => {
                return Err(StorageError::Url(
                    "set both the S3 access key id and the secret access key".into(),
                ));
            }
        }
        Ok(Storage {
            store: Arc::new(builder.build()?),
            describe: format!(
                "s3 bucket {bucket} at {}",
                endpoint.as_deref().unwrap_or("AWS")
            ),
        })
    }

    /// Reachable means a metadata request got an answer, even "not found".
    pub async fn ping(&self) -> Result<(), String> {
        let probe = object_store::path::Path::from(".dangjian-ready");
        match tokio::time::timeout(Duration::from_secs(5), self.store.head(&probe)).await {
            Err(_) => Err("object store did not answer within 5 s".into()),
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(format!("object store: {e}")),
        }
    }
}
