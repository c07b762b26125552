//! A webhook for the alarm tests, on hyper: it keeps the body of every POST it accepts, and
//! answers 503 to all while it is down.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Seen {
    down: AtomicBool,
    refused: AtomicUsize,
    bodies: Mutex<Vec<String>>,
}

/// A webhook listening on a free loopback port until dropped.
#[derive(Debug)]
pub struct Receiver {
    pub port: u16,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook");
        let port = listener.local_addr().expect("its address").port();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let seen = seen.clone();
                        async move { answer(&seen, request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { port, seen, task }
    }

    /// Answers 503 to everything while `down`.
    pub fn set_down(&self, down: bool) {
        self.seen.down.store(down, Ordering::SeqCst);
    }

    /// The bodies accepted so far.
    pub fn bodies(&self) -> Vec<String> {
        self.seen.bodies.lock().expect("bodies").clone()
    }

    /// POSTs refused while down.
    pub fn refused(&self) -> usize {
        self.seen.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    seen: &Seen,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let post = request.method() == hyper::Method::POST;
    let body = request.into_body().collect().await?.to_bytes();
    let status = if !post {
        405
    } else if seen.down.load(Ordering::SeqCst) {
        seen.refused.fetch_add(1, Ordering::SeqCst);
        503
    } else {
        seen.bodies
            .lock()
            .expect("bodies")
            .push(String::from_utf8_lossy(&body).into_owned());
        204
    };
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("a status");
    Ok(response)
}
