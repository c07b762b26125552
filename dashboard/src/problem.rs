//! Errors as `application/problem+json` (RFC 9457): a status, a title, and a detail that
//! says what to change.

use infra::storage::StorageError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    pub title: &'static str,
    pub detail: String,
}

impl Problem {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self {
            status: 400,
            title: "Bad request",
            detail: detail.into(),
        }
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self {
            status: 404,
            title: "Not found",
            detail: detail.into(),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: 401,
            title: "Unauthorized",
            detail: "this API needs the dashboard's token: Authorization: Bearer <token>".into(),
        }
    }

    pub fn method_not_allowed() -> Self {
        Self {
            status: 405,
            title: "Method not allowed",
            detail: "the API is read-only: use GET".into(),
        }
    }

    /// Storage could not answer: the client may retry; the operator sees the cause in the
    /// log and `/readyz`.
    pub fn storage(error: &StorageError) -> Self {
        Self {
            status: 503,
            title: "Storage unavailable",
            detail: format!("storage did not answer: {error}"),
        }
    }

    /// Too many requests of this kind at once.
    pub fn busy() -> Self {
        Self {
            status: 503,
            title: "Busy",
            detail: "too many readings requests at once; retry in a moment".into(),
        }
    }

    /// Something the pipeline stored cannot be read back (a bug, or a foreign writer); the
    /// detail names it.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self {
            status: 500,
            title: "Unreadable data",
            detail: detail.into(),
        }
    }

    pub fn body(&self) -> String {
        serde_json::json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        })
        .to_string()
    }
}
