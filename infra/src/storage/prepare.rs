//! Start-up creation of the queues, tables and containers a service uses.
//!
//! Creating needs rights a least-privilege credential does not hold (ingest runs on "queue
//! add" alone), so creation is optional (`STORAGE_CREATE_MISSING`), and a create refused with
//! 403 is no reason to stop: the service starts, and a resource that is really missing shows
//! as a 404 the first time an operation needs it (readiness 503 naming it), never as a crash
//! loop and never through a probe write.

use super::{Container, Queue, StorageError, Table};
use tokio_util::sync::CancellationToken;

/// A resource a service needs.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    Queue(&'a Queue),
    Table(&'a Table),
    Container(&'a Container),
}

impl Resource<'_> {
    fn describe(&self) -> String {
        match self {
            Resource::Queue(q) => format!("queue {}", q.name()),
            Resource::Table(t) => format!("table {}", t.name()),
            Resource::Container(c) => format!("container {}", c.name()),
        }
    }

    async fn create(&self) -> Result<(), StorageError> {
        match self {
            Resource::Queue(q) => q.create_if_missing().await,
            Resource::Table(t) => t.create_if_missing().await,
            Resource::Container(c) => c.create_if_missing().await,
        }
    }
}

/// Creates each resource unless it exists, when `create` is on; retries unreachable storage
/// until `shutdown` (then returns `false`). A create the credential may not make (403) is
/// skipped with one log line.
pub async fn create_missing(
    resources: &[Resource<'_>],
    create: bool,
    shutdown: &CancellationToken,
) -> bool {
    if !create {
        tracing::info!("Not creating queues, tables or containers (STORAGE_CREATE_MISSING=false).");
        return true;
    }
    for resource in resources {
        let what = format!("create {}", resource.describe());
        let created = crate::retry::until_ok(&what, shutdown, || async {
            match resource.create().await {
                Err(e) if e.status() == Some(403) => {
                    tracing::info!(
                        resource = %resource.describe(),
                        "The credential may not create it; assuming it exists."
                    );
                    Ok(())
                }
                other => other,
            }
        });
        if created.await.is_none() {
            return false;
        }
    }
    true
}
