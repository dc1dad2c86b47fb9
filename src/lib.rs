//! anteroom: an application server that holds waiting requests in its own bounded, visible queue rather
//! than in the kernel's listen backlog, and serves them through a supervised pool of worker processes that
//! speak FastCGI or HTTP.
//!
//! The path of a request, one room each (see `docs/ARCHITECTURE.md`):
//! [`front`] accepts and reads it whole, [`admission`] queues it in [`queue`] or refuses it (and ends every
//! request the same way, whatever its front), [`pool`] owns the worker processes,
//! [`worker`] hands the request to one of them over [`fastcgi`] (with [`cgi`] variables) or HTTP, and the
//! answer goes back the way it came. [`app`] wires them together around listeners it is given and handles
//! signals; [`config`] is what it runs with; [`systemd`] speaks socket activation and `sd_notify`, and
//! [`upgrade`] replaces the running binary on SIGUSR2. Beside the path: [`admin`] and [`metrics`] show it, [`sockdiag`] reads the kernel's
//! accept queues (also as `anteroom sockets`), [`quarantine`] keeps poison requests out, [`spill`] bounds the
//! memory that bodies take, [`demo`] is the built-in app. Below them all, `sys` holds every raw call to the
//! OS and is the only module allowed `unsafe`.

// Unsafe code lives in `sys` only, behind safe functions; everything else is checked by the compiler.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub(crate) mod admin;
pub(crate) mod admission;
pub mod app;
pub(crate) mod cgi;
pub mod config;
pub mod demo;
pub mod fastcgi;
pub mod front;
pub mod http1;
pub mod logfmt;
pub(crate) mod metrics;
pub mod pool;
pub mod proxy_protocol;
pub(crate) mod quarantine;
pub(crate) mod queue;
pub(crate) mod ratelog;
pub(crate) mod request;
pub mod sockdiag;
pub(crate) mod spill;
pub(crate) mod sync;
#[allow(unsafe_code)]
pub(crate) mod sys;
pub mod systemd;
pub(crate) mod upgrade;
pub(crate) mod worker;

/// The process's allocator (`sys/alloc.rs`): the binary installs it with `#[global_allocator]`.
pub use sys::alloc::Allocator;
