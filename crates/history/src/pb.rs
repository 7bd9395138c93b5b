//! The gRPC messages, clients and servers generated from
//! `proto/clinflow/history/v1/history.proto` (committed; the `codegen` test
//! keeps them current).
#![allow(clippy::all, missing_docs)]

include!("pb/clinflow.history.v1.rs");
