//! Client-facing listeners. Each accepts connections as fast as they come and turns requests into queued
//! [`Job`](crate::request::Job)s; none of them ever talks to a worker directly.

pub mod acceptor;
pub mod conns;
pub mod fastcgi;
pub mod http;
pub mod listen;
mod timeout_io;
