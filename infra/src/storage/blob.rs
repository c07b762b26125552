//! Azure Blob Storage operations: whole-blob reads and conditional whole-blob writes.
//!
//! Writes are conditional by design: [`Write::Create`] succeeds only if no blob exists and
//! [`Write::Replace`] only if the blob still has the ETag it was read with. Two writers racing
//! on one blob therefore never overwrite each other's work unseen; the loser gets
//! [`PutOutcome::Conflict`] and re-reads.

use super::{call, StorageError};
use azure_core::prelude::IfMatchCondition;
use azure_core::request_options::Metadata;
use azure_storage_blobs::prelude::*;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;

/// A blob read in full, with the ETag the content belongs to.
#[derive(Debug, Clone)]
pub struct BlobContent {
    pub bytes: Bytes,
    pub etag: String,
}

/// A blob's properties.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub name: String,
    pub etag: String,
    pub size: u64,
    /// The access tier as the service names it (`Hot`, `Cool`, ...), if it reports one.
    pub tier: Option<String>,
    pub content_type: String,
    pub metadata: HashMap<String, String>,
}

/// The precondition of a write.
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    /// Only if no blob of that name exists (`If-None-Match: *`).
    Create,
    /// Only if the blob still has this ETag (`If-Match`).
    Replace { etag: &'a str },
}

/// What a conditional write came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written; the new ETag.
    Written { etag: String },
    /// The precondition failed: someone else created or changed the blob meanwhile.
    Conflict,
}

/// A new blob's attributes.
#[derive(Debug, Clone, Copy)]
pub struct PutOptions<'a> {
    pub content_type: &'static str,
    /// Written straight into the Cool tier when true, else the account's default tier.
    pub cool: bool,
    pub metadata: &'a [(&'static str, String)],
}

#[derive(Debug, Clone)]
pub struct Container {
    client: ContainerClient,
    timeout: Duration,
}

impl Container {
    pub(super) fn new(client: ContainerClient, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    pub fn name(&self) -> &str {
        self.client.container_name()
    }

    /// Creates the container (private) unless it exists.
    pub async fn create_if_missing(&self) -> Result<(), StorageError> {
        super::create_if_missing(
            "blob_container_create",
            self.timeout,
            self.client.create().into_future(),
        )
        .await
    }

    /// A blob's properties, or `None` if it does not exist.
    pub async fn properties(&self, name: &str) -> Result<Option<BlobInfo>, StorageError> {
        let request = self.client.blob_client(name).get_properties().into_future();
        match call("blob_properties", self.timeout, request).await {
            Ok(r) => Ok(Some(info(r.blob))),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The whole blob and its ETag, or `None` if it does not exist. Every chunk is read under
    /// `If-Match` of the ETag, so the bytes are one version even if a writer races the read
    /// (the read then fails with 412 and the caller retries).
    pub async fn get(&self, name: &str) -> Result<Option<BlobContent>, StorageError> {
        const OP: &str = "blob_get";
        let Some(props) = self.properties(name).await? else {
            return Ok(None);
        };
        let blob = self.client.blob_client(name);
        let mut chunks = blob
            .get()
            .if_match(IfMatchCondition::Match(props.etag.clone()))
            .into_stream();
        let mut bytes = Vec::with_capacity(props.size as usize);
        while let Some(chunk) = call(OP, self.timeout, async {
            match chunks.next().await {
                Some(Ok(r)) => r.data.collect().await.map(Some),
                Some(Err(e)) => Err(e),
                None => Ok(None),
            }
        })
        .await?
        {
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(BlobContent {
            bytes: Bytes::from(bytes),
            etag: props.etag,
        }))
    }

    /// Writes a whole block blob under `condition`.
    pub async fn put(
        &self,
        name: &str,
        body: Bytes,
        condition: Write<'_>,
        options: PutOptions<'_>,
    ) -> Result<PutOutcome, StorageError> {
        let mut metadata = Metadata::new();
        for (k, v) in options.metadata {
            metadata.insert(*k, v.clone());
        }
        let mut request = self
            .client
            .blob_client(name)
            .put_block_blob(body)
            .content_type(options.content_type)
            .metadata(metadata)
            .if_match(match condition {
                Write::Create => IfMatchCondition::NotMatch("*".into()),
                Write::Replace { etag } => IfMatchCondition::Match(etag.to_owned()),
            });
        if options.cool {
            request = request.access_tier(AccessTier::Cool);
        }
        match call("blob_put", self.timeout, request.into_future()).await {
            Ok(r) => Ok(PutOutcome::Written { etag: r.etag }),
            // 409 BlobAlreadyExists for Create, 412 ConditionNotMet for Replace.
            Err(e) if matches!(e.status(), Some(409 | 412)) => Ok(PutOutcome::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Every blob whose name starts with `prefix`, with its metadata.
    pub async fn list(&self, prefix: &str) -> Result<Vec<BlobInfo>, StorageError> {
        let mut pages = self
            .client
            .list_blobs()
            .prefix(prefix.to_owned())
            .include_metadata(true)
            .into_stream();
        let mut out = Vec::new();
        while let Some(page) = call("blob_list", self.timeout, async {
            pages.next().await.transpose()
        })
        .await?
        {
            out.extend(page.blobs.blobs().cloned().map(info));
        }
        Ok(out)
    }
}

fn info(blob: Blob) -> BlobInfo {
    BlobInfo {
        etag: blob.properties.etag.to_string(),
        size: blob.properties.content_length,
        tier: blob.properties.access_tier.map(|t| t.as_ref().to_owned()),
        content_type: blob.properties.content_type,
        metadata: blob.metadata.unwrap_or_default(),
        name: blob.name,
    }
}
