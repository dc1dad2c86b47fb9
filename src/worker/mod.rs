//! Talking to one worker: hand it one request, relay its answer to the waiting client.
//!
//! The worker's slot task calls [`Conn::serve`] with a request it took from the queue. The response head is
//! sent to the client as soon as it is complete; the body follows through a channel while this task keeps
//! reading, so the worker is free the moment it has written its answer, however slowly the client reads.
//! The connection to the worker is kept between requests (FCGI_KEEP_CONN, HTTP keep-alive) and reopened when
//! the worker has closed it.

pub mod fastcgi;
pub mod http;

use std::path::{Path, PathBuf};

use crate::config::{Config, WorkerProtocol};
use crate::request::Job;

/// What went wrong with a worker, said so that the log line explains the 502.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot connect to the worker: {0}")]
    Connect(std::io::Error),
    #[error("connection to the worker failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the worker closed the connection before finishing its response")]
    Closed,
    #[error("bad response from the worker: {0}")]
    Protocol(String),
    #[error("the worker exited while holding the request")]
    Exited,
    #[error("anteroom is stopping")]
    Stopping,
    #[error("the client went away while the worker held its request")]
    ClientGone,
    #[error("the worker held the request longer than the request timeout ({0:?})")]
    Timeout(std::time::Duration),
}

/// How much of a request went through; for the log and, later, crash attribution.
#[derive(Debug, Default, Clone, Copy)]
pub struct Progress {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// The response head has gone to the client: no other answer can be given any more.
    pub head_sent: bool,
}

pub enum Conn {
    Fastcgi(fastcgi::Conn),
    Http(http::Conn),
}

/// One worker's connection, opened lazily and reopened after a failure.
pub struct Link {
    path: PathBuf,
    protocol: WorkerProtocol,
    conn: Option<Conn>,
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
    pub async fn serve(
        &mut self,
        job: &mut Job,
        cfg: &Config,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        match self.protocol {
            WorkerProtocol::Fastcgi => {
                let conn = match self.conn.take() {
                    Some(Conn::Fastcgi(c)) if c.is_open() => c,
                    _ => fastcgi::Conn::connect(&self.path).await?,
                };
                let mut conn = conn;
                let r = conn.serve(job, &cfg.params, progress).await;
                if r.is_ok() && conn.keep() {
                    self.conn = Some(Conn::Fastcgi(conn));
                }
                r
            }
            WorkerProtocol::Http => {
                let conn = match self.conn.take() {
                    Some(Conn::Http(c)) if c.is_open() => c,
                    _ => http::Conn::connect(&self.path).await?,
                };
                let mut conn = conn;
                let r = conn.serve(job, progress).await;
                if r.is_ok() {
                    self.conn = Some(Conn::Http(conn));
                }
                r
            }
        }
    }

    /// Opens the connection now, ahead of the first request (readiness: the worker must accept it).
    pub async fn warm(&mut self) -> Result<(), WorkerError> {
        if self.conn.is_none() {
            self.conn = Some(match self.protocol {
                WorkerProtocol::Fastcgi => Conn::Fastcgi(fastcgi::Conn::connect(&self.path).await?),
                WorkerProtocol::Http => Conn::Http(http::Conn::connect(&self.path).await?),
            });
        }
        Ok(())
    }

    /// Forgets the connection (the worker is gone or in an unknown state).
    pub fn reset(&mut self) {
        self.conn = None;
    }
}
