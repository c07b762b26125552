//! Azure Blob Storage operations: whole-blob reads and conditional whole-blob writes.
//!
//! Writes are conditional by design: [`Write::Create`] succeeds only if no blob exists and
//! [`Write::Replace`] only if the blob still has the ETag it was read with. Two writers racing
//! on one blob therefore never overwrite each other's work unseen; the loser gets
//! [`PutOutcome::Conflict`] and re-reads.

use super::{call, StorageError};
use azure_core::http::Etag;
use azure_storage_blob::models::{
    AccessTier, BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
    BlobClientUploadOptions, BlobContainerClientListBlobsOptions, BlobItem, ListBlobsIncludeItem,
};
use azure_storage_blob::BlobContainerClient;
use bytes::Bytes;
use futures::TryStreamExt;
use std::collections::HashMap;
use std::num::NonZero;
use std::sync::Arc;
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

#[derive(Clone)]
pub struct Container {
    name: String,
    client: Arc<BlobContainerClient>,
    timeout: Duration,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Container {
    pub(super) fn new(name: &str, client: BlobContainerClient, timeout: Duration) -> Self {
        Self {
            name: name.to_owned(),
            client: Arc::new(client),
            timeout,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the container (private) unless it exists.
    pub async fn create_if_missing(&self) -> Result<(), StorageError> {
        super::create_if_missing(call("blob_container_create", self.timeout, async {
            self.client.create(None).await.map(drop)
        }))
        .await
    }

    /// A blob's properties, or `None` if it does not exist.
    pub async fn properties(&self, name: &str) -> Result<Option<BlobInfo>, StorageError> {
        let read = call("blob_properties", self.timeout, async {
            let r = self.client.blob_client(name).get_properties(None).await?;
            Ok(BlobInfo {
                name: name.to_owned(),
                etag: r.etag()?.map(|e| e.as_ref().to_owned()).unwrap_or_default(),
                size: r.content_length()?.unwrap_or(0),
                tier: r.access_tier()?,
                content_type: r.content_type()?.unwrap_or_default(),
                metadata: r.metadata()?,
            })
        });
        match read.await {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The whole blob and its ETag, or `None` if it does not exist. It is read under
    /// `If-Match` of the ETag, so the bytes are one version even if a writer races the read
    /// (the read then fails with 412). The whole read is one call, under one timeout.
    pub async fn get(&self, name: &str) -> Result<Option<BlobContent>, StorageError> {
        let Some(props) = self.properties(name).await? else {
            return Ok(None);
        };
        let options = BlobClientDownloadOptions {
            if_match: Some(Etag::from(props.etag.as_str())),
            // One range at a time: an archive is read whole, into one buffer, anyway.
            parallel: NonZero::new(1),
            ..Default::default()
        };
        let bytes = call("blob_get", self.timeout, async {
            let download = self
                .client
                .blob_client(name)
                .download(Some(options))
                .await?;
            download.body.collect().await
        })
        .await?;
        Ok(Some(BlobContent {
            bytes,
            etag: props.etag,
        }))
    }

    /// Writes a whole block blob under `condition`, in one request.
    pub async fn put(
        &self,
        name: &str,
        body: Bytes,
        condition: Write<'_>,
        options: PutOptions<'_>,
    ) -> Result<PutOutcome, StorageError> {
        let metadata: HashMap<String, String> = options
            .metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let (if_match, if_none_match) = match condition {
            Write::Create => (None, Some(Etag::from("*"))),
            Write::Replace { etag } => (Some(Etag::from(etag)), None),
        };
        let upload = BlobClientUploadOptions {
            blob_content_type: Some(options.content_type.to_owned()),
            metadata: Some(metadata),
            if_match,
            if_none_match,
            tier: options.cool.then_some(AccessTier::Cool),
            // One Put Blob, never staged blocks: the condition then holds for the whole
            // write, and a refused write leaves no uncommitted blocks behind.
            partition_size: NonZero::new(u64::MAX),
            ..Default::default()
        };
        let written = call("blob_put", self.timeout, async {
            self.client
                .blob_client(name)
                .upload(body.into(), Some(upload))
                .await
        });
        match written.await {
            Ok(r) => Ok(PutOutcome::Written {
                etag: r.etag.map(|e| e.as_ref().to_owned()).unwrap_or_default(),
            }),
            // 409 BlobAlreadyExists for Create, 412 ConditionNotMet for Replace.
            Err(e) if matches!(e.status(), Some(409 | 412)) => Ok(PutOutcome::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Every blob whose name starts with `prefix`, with its metadata.
    pub async fn list(&self, prefix: &str) -> Result<Vec<BlobInfo>, StorageError> {
        const OP: &str = "blob_list";
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(prefix.to_owned()),
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            ..Default::default()
        };
        let mut pages = self
            .client
            .list_blobs(Some(options))
            .map_err(|e| super::sdk_error(OP, &e))?
            .into_pages();
        let mut out = Vec::new();
        while let Some(page) = call(OP, self.timeout, async {
            match pages.try_next().await? {
                Some(page) => page.into_model().map(Some),
                None => Ok(None),
            }
        })
        .await?
        {
            out.extend(page.blob_items.into_iter().filter_map(info));
        }
        Ok(out)
    }
}

/// A listed blob's properties; `None` for an entry without a name.
fn info(blob: BlobItem) -> Option<BlobInfo> {
    let properties = blob.properties.unwrap_or_default();
    Some(BlobInfo {
        name: blob.name?,
        etag: properties
            .etag
            .map(|e| e.as_ref().to_owned())
            .unwrap_or_default(),
        size: properties.content_length.unwrap_or(0),
        tier: properties.access_tier.map(|t| t.to_string()),
        content_type: properties.content_type.unwrap_or_default(),
        metadata: blob.metadata.and_then(|m| m.values).unwrap_or_default(),
    })
}
