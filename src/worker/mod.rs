//! Talking to one worker: hand it one request, relay its answer to the waiting client.
//!
//! The worker's slot task calls [`Link::serve`] with a request it took from the queue. The response head is
//! sent to the client as soon as it is complete; the body follows through a channel while this task keeps
//! reading, so the worker is free the moment it has written its answer, however slowly the client reads.
//! The connection to the worker is kept between requests (FCGI_KEEP_CONN, HTTP keep-alive) and reopened when
//! the worker has closed it.

pub mod fastcgi;
pub mod http;

use std::path::{Path, PathBuf};

use crate::config::{Config, WorkerProtocol};
use crate::request::Job;

/// A response body up to this size is collected whole before the response goes to the client, so that it
/// leaves with a Content-Length in one write; a larger one streams as it comes (through `spill`). The same
/// for both worker protocols.
const WHOLE_BODY: usize = 256 << 10;

/// What went wrong with a worker, said so that the log line explains the 502.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot connect to the worker: {0}")]
    Connect(std::io::Error),
    #[error("connection to the worker failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the worker closed the connection before finishing its response")]
    Closed,
    /// Nothing of the request reached the worker: a kept-alive connection turned out to be closed, or the
    /// first write failed. Safe to send again whatever the method, since the worker cannot have acted on it.
    #[error("the request did not reach the worker: {0}")]
    NotDelivered(std::io::Error),
    #[error("bad response from the worker: {0}")]
    Protocol(#[from] BadResponse),
    #[error("the worker exited while holding the request")]
    Exited,
    #[error("anteroom is stopping")]
    Stopping,
    #[error("the client went away while the worker held its request")]
    ClientGone,
    #[error("the worker held the request longer than the request timeout ({0:?})")]
    Timeout(std::time::Duration),
}

/// What was wrong with a worker's answer; the decoder's own error is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    #[error("{0}")]
    Record(#[source] crate::fastcgi::ProtocolError),
    #[error("{0}")]
    Head(#[source] crate::cgi::CgiError),
    /// The worker's HTTP response head (`http1::client`).
    #[error("{0}")]
    Http(#[source] crate::http1::ResponseError),
    /// The worker's chunked response body.
    #[error("bad chunked body: {0}")]
    Chunked(#[source] crate::http1::ChunkError),
    /// The request itself could not be put in the worker's terms (FastCGI params, the HTTP target).
    #[error("cannot encode the request for the worker: {0}")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Wrong in a way no decoder reports: said in our words.
    #[error("{0}")]
    Worker(String),
}

impl From<crate::fastcgi::ProtocolError> for WorkerError {
    fn from(e: crate::fastcgi::ProtocolError) -> Self {
        WorkerError::Protocol(BadResponse::Record(e))
    }
}

impl From<crate::cgi::CgiError> for WorkerError {
    fn from(e: crate::cgi::CgiError) -> Self {
        WorkerError::Protocol(BadResponse::Head(e))
    }
}

impl WorkerError {
    /// The worker answered wrongly in a way no decoder reports.
    pub fn bad(why: impl Into<String>) -> WorkerError {
        WorkerError::Protocol(BadResponse::Worker(why.into()))
    }

    /// No byte of the request reached the worker, so it can go to another worker whatever its method, and
    /// the worker's death (if it died) was not this request's doing.
    pub fn delivered_nothing(&self) -> bool {
        matches!(self, WorkerError::Connect(_) | WorkerError::NotDelivered(_))
    }
}

/// How much of a request went through; for the log and, later, crash attribution.
#[derive(Debug, Default, Clone, Copy)]
pub struct Progress {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// The response head has gone to the client: no other answer can be given any more.
    pub head_sent: bool,
    /// A first attempt on a kept-alive connection was closed by the worker before any byte of its answer,
    /// and the request went again on a new connection (this attempt): the one retry it gets.
    pub retried_after_close: bool,
}

/// The kept-alive connection to a worker, in its protocol.
pub enum WorkerConn {
    Fastcgi(fastcgi::FcgiConn),
    Http(http::HttpConn),
}

/// One worker's connection, opened lazily and reopened after a failure.
pub struct Link {
    path: PathBuf,
    protocol: WorkerProtocol,
    conn: Option<WorkerConn>,
}

impl Link {
    pub fn new(path: &Path, protocol: WorkerProtocol) -> Link {
        Link {
            path: path.to_owned(),
            protocol,
            conn: None,
        }
    }

    /// Serves `job` on this worker. On error the connection is dropped, and the job's reply is left
    /// unsent if no response head went out, for the caller to answer.
    ///
    /// A kept-alive connection can be closed by the worker at any moment between two requests (gunicorn's
    /// sync worker closes every one; others after an idle timeout or their own request limit). When such a
    /// connection fails before any byte of the request reached the worker, the request goes once more on
    /// a fresh connection, whatever its method: the worker cannot have acted on it.
    pub async fn serve(
        &mut self,
        job: &mut Job,
        cfg: &Config,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        let reused = self.conn.is_some();
        match self.serve_once(job, cfg, progress).await {
            Err(WorkerError::NotDelivered(e)) if reused => {
                tracing::debug!(request_id = %job.id, "kept-alive worker connection was closed ({e}); sending on a new one");
                *progress = Progress::default();
                self.serve_once(job, cfg, progress).await
            }
            // Closed or reset with not a byte of answer: most often the worker's keep-alive timeout crossed
            // our request. An idempotent request may go again; if the worker turns out to be gone, the
            // first error stands, so that a request that killed its worker is still known as such.
            Err(e @ (WorkerError::Closed | WorkerError::Io(_)))
                if reused
                    && job.idempotent()
                    && progress.received_bytes == 0
                    && !job.client_gone() =>
            {
                tracing::debug!(request_id = %job.id, "kept-alive worker connection failed without an answer ({e}); sending on a new one");
                let first = *progress;
                *progress = Progress {
                    retried_after_close: true,
                    ..Progress::default()
                };
                match self.serve_once(job, cfg, progress).await {
                    Err(again) if again.delivered_nothing() => {
                        *progress = first;
                        Err(e)
                    }
                    r => r,
                }
            }
            r => r,
        }
    }

    async fn serve_once(
        &mut self,
        job: &mut Job,
        cfg: &Config,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        match self.protocol {
            WorkerProtocol::Fastcgi => {
                let mut conn = match self.conn.take() {
                    Some(WorkerConn::Fastcgi(c)) if c.is_open() => c,
                    _ => fastcgi::FcgiConn::connect(&self.path).await?,
                };
                let r = conn.serve(job, &cfg.params, progress).await;
                if r.is_ok() && conn.keep() {
                    self.conn = Some(WorkerConn::Fastcgi(conn));
                }
                r
            }
            WorkerProtocol::Http => {
                let mut conn = match self.conn.take() {
                    Some(WorkerConn::Http(c)) if c.is_open() => c,
                    _ => http::HttpConn::connect(&self.path).await?,
                };
                let r = conn.serve(job, progress).await;
                if r.is_ok() && conn.keep() {
                    self.conn = Some(WorkerConn::Http(conn));
                }
                r
            }
        }
    }

    /// Opens the connection now, ahead of the first request (readiness: the worker must accept it).
    pub async fn warm(&mut self) -> Result<(), WorkerError> {
        if self.conn.is_none() {
            self.conn = Some(match self.protocol {
                WorkerProtocol::Fastcgi => {
                    WorkerConn::Fastcgi(fastcgi::FcgiConn::connect(&self.path).await?)
                }
                WorkerProtocol::Http => {
                    WorkerConn::Http(http::HttpConn::connect(&self.path).await?)
                }
            });
        }
        Ok(())
    }

    /// Forgets the connection (the worker is gone or in an unknown state).
    pub fn reset(&mut self) {
        self.conn = None;
    }
}
