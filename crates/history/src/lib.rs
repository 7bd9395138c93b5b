//! Patient history: the records and billing services behind gRPC, and the
//! gateway's resilient clients of them.
//!
//! - [`pb`]: the generated messages, clients and servers
//!   (`proto/clinflow/history/v1/history.proto`).
//! - [`service`]: the two services over the store, and their server.
//! - [`client`], [`breaker`]: the gateway's side: deadline, retries,
//!   adaptive throttling, as tower layers.
//! - [`wire`], [`money`]: `grpc-timeout`, the service token, exact sums.

pub mod breaker;
pub mod client;
pub mod money;
pub mod pb;
pub mod service;
pub mod wire;
