//! Client-facing listeners. Each accepts connections as fast as they come and turns requests into
//! [`Job`](crate::request::Job)s for [`crate::admission`], which queues them and ends them all the same
//! way; none of them ever talks to a worker directly.

pub(crate) mod acceptor;
pub(crate) mod conns;
pub(crate) mod fastcgi;
pub(crate) mod http;
pub mod listen;
pub(crate) mod proxy;
