//! The object store on local disk and on a real Garage S3 server (started by `scripts/test`).

mod common;

use common::{Backend, TestApp};
use dangjian::config::{Layer, Secret};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use portal::storage::{S3Keys, Storage};

/// The Garage that `scripts/test` starts; these tests fail without it rather than pass vacuously.
fn garage() -> (String, S3Keys) {
    let url = std::env::var("DJTEST_S3_URL")
        .expect("DJTEST_S3_URL is not set: run the tests with scripts/test, which starts Garage");
    let keys = S3Keys {
        access_key_id: std::env::var("DJTEST_S3_KEY_ID").ok(),
        secret_access_key: std::env::var("DJTEST_S3_SECRET").ok(),
    };
    (url, keys)
}

async fn exercise(storage: &Storage) {
    let prefix = format!("t/{}", uuid::Uuid::new_v4());
    let small = Path::from(format!("{prefix}/hello.txt"));
    storage
        .store
        .put(&small, PutPayload::from_static(b"hello, branch"))
        .await
        .unwrap();
    let got = storage
        .store
        .get(&small)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], b"hello, branch");
    let range = storage.store.get_range(&small, 7..13).await.unwrap();
    assert_eq!(&range[..], b"branch");

    // Multipart: two 5 MiB parts and a short last one, as a long recording would upload.
    let big = Path::from(format!("{prefix}/big.bin"));
    let mut upload = storage.store.put_multipart(&big).await.unwrap();
    let part = |b: u8, n: usize| PutPayload::from(vec![b; n]);
    upload.put_part(part(1, 5 << 20)).await.unwrap();
    upload.put_part(part(2, 5 << 20)).await.unwrap();
    upload.put_part(part(3, 1000)).await.unwrap();
    upload.complete().await.unwrap();
    let meta = storage.store.head(&big).await.unwrap();
    assert_eq!(meta.size, (10 << 20) + 1000);
    let tail = storage
        .store
        .get_range(&big, (10 << 20) - 2..(10 << 20) + 2)
        .await
        .unwrap();
    assert_eq!(&tail[..], &[2, 2, 3, 3]);

    let listed: Vec<_> = storage
        .store
        .list(Some(&Path::from(prefix.clone())))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    storage.store.delete(&small).await.unwrap();
    storage.store.delete(&big).await.unwrap();
    assert!(matches!(
        storage.store.head(&small).await,
        Err(object_store::Error::NotFound { .. })
    ));
    storage.ping().await.unwrap();
}

#[tokio::test]
async fn local_disk_store_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    exercise(&Storage::local(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn garage_store_round_trips_with_multipart_and_ranges() {
    let (url, keys) = garage();
    exercise(&Storage::s3(&url, &keys).unwrap()).await;
}

#[tokio::test]
async fn wrong_s3_keys_are_not_ready() {
    let (url, _) = garage();
    let keys = S3Keys {
        access_key_id: Some("GK000000000000000000000000".into()),
        secret_access_key: Some("0".repeat(64)),
    };
    let err = Storage::s3(&url, &keys).unwrap().ping().await.unwrap_err();
    assert!(err.contains("object store"), "{err}");
}

#[test]
fn bad_storage_urls_are_explained() {
    let keys = S3Keys::default();
    let err = |u: &str| Storage::s3(u, &keys).unwrap_err().to_string();
    assert!(err("s3://?endpoint=http://x").contains("bucket"));
    assert!(err("s3://b?endpint=http://x").contains("endpint"));
    assert!(err("ftp://b").contains("ftp"));
    let half = S3Keys {
        access_key_id: Some("a".into()),
        secret_access_key: None,
    };
    assert!(Storage::s3("s3://b?endpoint=http://127.0.0.1:1&region=x", &half).is_err());
}

fn s3_layer(url: String, keys: &S3Keys) -> Layer {
    Layer {
        storage_url: Some(url),
        s3_access_key_id: keys.access_key_id.clone(),
        s3_secret_access_key: keys.secret_access_key.clone().map(Secret::new),
        ..Layer::default()
    }
}

async fn server_on_garage_is_ready(backend: Backend) {
    let (url, keys) = garage();
    let app = TestApp::spawn_with(backend, s3_layer(url, &keys)).await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    app.stop().await;
}

async fn unreachable_store_is_503_and_the_rest_keeps_serving(backend: Backend) {
    // A port nobody listens on: connection refused, as when the S3 server is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("s3://dangjian-test?endpoint=http://127.0.0.1:{port}&region=garage");
    let keys = S3Keys {
        access_key_id: Some("GKx".into()),
        secret_access_key: Some("y".into()),
    };
    let app = TestApp::spawn_with(backend, s3_layer(url, &keys)).await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["database"], "ok");
    assert!(
        body["object_store"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{body}"
    );
    assert!(!body.to_string().contains("GKx"), "no keys in the answer");
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.sign_in_admin().await;
    app.stop().await;
}

on_both_databases!(
    server_on_garage_is_ready,
    unreachable_store_is_503_and_the_rest_keeps_serving
);
