//! The connection to a store: where it is (`s3://BUCKET/NAME`), the S3 client (credentials
//! and endpoint from the standard `AWS_*` environment variables), its runtime, and the few
//! object operations the rest of the crate uses, each bounded in time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use crate::StoreError;

/// A request that has not completed in this long failed (it is retried, see [`RETRIES`]).
/// Short enough that a connection that went silent (a frozen flow, a pooled connection a
/// middlebox dropped) is given up several times within [`RETRY_FOR`]: each retry may meet
/// another such pooled connection before a fresh one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to the store takes at most this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A failed request is retried this many times, for at most [`RETRY_FOR`] in all.
const RETRIES: usize = 5;
/// How long a request and its retries may take in all.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// `s3://BUCKET/NAME` (NAME may hold `/`; `s3://BUCKET` or `s3://BUCKET/` names the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The bucket: one store.
    pub bucket: String,
    /// A snapshot's name in it (empty for the store itself).
    pub name: String,
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{text:?} is not an s3://BUCKET/NAME address"))?;
        let (bucket, name) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{text:?} names no bucket"));
        }
        let name = name.trim_end_matches('/');
        // Only characters an object key carries as they are: a name the client would escape
        // would come back escaped from a listing, and removal could then miss its manifest.
        let bad = |part: &str| {
            part.is_empty()
                || part == "."
                || part == ".."
                || !part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if !name.is_empty() && name.split('/').any(bad) {
            return Err(format!(
                "{name:?} is not a snapshot name (letters, digits, '.', '_', '-'; parts separated by single '/', no '.' or '..')"
            ));
        }
        Ok(StoreUrl {
            bucket: bucket.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.name)
    }
}

/// One store (a bucket) and a runtime to reach it from ordinary threads.
pub struct Store {
    pub(crate) objects: Arc<dyn ObjectStore>,
    pub(crate) runtime: tokio::runtime::Runtime,
    bucket: String,
}

impl Store {
    /// Connects to the bucket `url` names. Credentials, region and endpoint come from the
    /// standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, and `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint such as a
    /// local test server). Nothing is sent yet.
    ///
    /// # Errors
    /// [`StoreError::Config`] if the environment does not describe a usable store.
    pub fn open(url: &StoreUrl) -> Result<Self, StoreError> {
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: RETRIES,
            retry_timeout: RETRY_FOR,
        };
        // The client options are set here as a whole, so the one the environment may set
        // (object_store's `AWS_ALLOW_HTTP`) is read here too.
        let allow_http = std::env::var("AWS_ALLOW_HTTP")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let options = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT);
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_retry(retry)
            .with_client_options(options);
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        let objects = builder
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-io")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Store {
            objects: Arc::new(objects),
            runtime,
            bucket: url.bucket.clone(),
        })
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

/// Reads a whole object.
pub(crate) async fn get_object(objects: &dyn ObjectStore, key: &str) -> Result<Bytes, StoreError> {
    let path = Path::from(key);
    let got = objects
        .get(&path)
        .await
        .map_err(|e| StoreError::request("read", key, e))?;
    got.bytes()
        .await
        .map_err(|e| StoreError::request("read", key, e))
}

/// Reads bytes `range` of an object (one ranged GET).
pub(crate) async fn get_object_range(
    objects: &dyn ObjectStore,
    key: &str,
    range: std::ops::Range<u64>,
) -> Result<Bytes, StoreError> {
    let bytes = objects
        .get_range(&Path::from(key), range.clone())
        .await
        .map_err(|e| StoreError::request("read", key, e))?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(StoreError::Short {
            key: key.to_owned(),
            wanted: range.end - range.start,
            got: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Writes a whole object.
pub(crate) async fn put_object(
    objects: &dyn ObjectStore,
    key: &str,
    bytes: Vec<u8>,
) -> Result<(), StoreError> {
    objects
        .put(&Path::from(key), PutPayload::from(bytes))
        .await
        .map(drop)
        .map_err(|e| StoreError::request("write", key, e))
}

/// Writes a whole object that must not exist yet (`If-None-Match: *`): of two writers of
/// one key, one wins and the other is told. Returns `false` if another object was there;
/// `true` if the one there holds `bytes` (this write landed, and a retry of it, whose
/// answer was lost, met it).
pub(crate) async fn put_new_object(
    objects: &dyn ObjectStore,
    key: &str,
    bytes: Vec<u8>,
) -> Result<bool, StoreError> {
    let options = object_store::PutOptions {
        mode: object_store::PutMode::Create,
        ..Default::default()
    };
    let path = Path::from(key);
    match objects
        .put_opts(&path, PutPayload::from(bytes.clone()), options)
        .await
    {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => {
            let there = objects
                .get(&path)
                .await
                .map_err(|e| StoreError::request("read", key, e))?
                .bytes()
                .await
                .map_err(|e| StoreError::request("read", key, e))?;
            Ok(there[..] == bytes[..])
        }
        Err(e) => Err(StoreError::request("write", key, e)),
    }
}

/// Whether an object exists (uploads only: serving never asks before it reads).
pub(crate) async fn object_exists(
    objects: &dyn ObjectStore,
    key: &str,
) -> Result<bool, StoreError> {
    match objects.head(&Path::from(key)).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(StoreError::request("look up", key, e)),
    }
}

/// Every object under `prefix`.
pub(crate) async fn list_objects(
    objects: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<ObjectMeta>, StoreError> {
    objects
        .list(Some(&Path::from(prefix)))
        .try_collect()
        .await
        .map_err(|e| StoreError::request("list", prefix, e))
}

/// Deletes an object.
pub(crate) async fn delete_object(objects: &dyn ObjectStore, key: &str) -> Result<(), StoreError> {
    objects
        .delete(&Path::from(key))
        .await
        .map_err(|e| StoreError::request("delete", key, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_new_object_is_written_once_and_the_second_writer_is_told() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let objects = object_store::memory::InMemory::new();
        let key = "snapshots/vm.manifest";
        runtime.block_on(async {
            assert!(
                put_new_object(&objects, key, b"one".to_vec())
                    .await
                    .unwrap()
            );
            assert!(
                !put_new_object(&objects, key, b"two".to_vec())
                    .await
                    .unwrap()
            );
            // The same bytes again: a retry of the write that won.
            assert!(
                put_new_object(&objects, key, b"one".to_vec())
                    .await
                    .unwrap()
            );
            let there = objects.get(&Path::from(key)).await.unwrap();
            assert_eq!(&there.bytes().await.unwrap()[..], b"one");
        });
    }

    #[test]
    fn test_store_urls_parse() {
        let url: StoreUrl = "s3://snaps/team/vm1".parse().unwrap();
        assert_eq!(url.bucket, "snaps");
        assert_eq!(url.name, "team/vm1");
        assert_eq!(url.to_string(), "s3://snaps/team/vm1");
        let store: StoreUrl = "s3://snaps/".parse().unwrap();
        assert_eq!(store.name, "");
        for bad in [
            "snaps/vm1",
            "s3:///vm1",
            "s3://b/a//c",
            "s3://b/../x",
            "s3://b/a\n",
            "s3://b/vm#1",
            "s3://b/a b",
        ] {
            assert!(bad.parse::<StoreUrl>().is_err(), "{bad:?} accepted");
        }
    }
}
