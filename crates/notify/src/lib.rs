//! Pure logic of notification campaigns: templates, SMS segment counting,
//! E.164 checks, retry backoff, the SMS provider's request signature and
//! the classification of send failures. No I/O, no clock (callers pass the
//! time and the randomness), and total: no panic on any input (property
//! tests in `tests/properties.rs`).

pub mod backoff;
pub mod classify;
pub mod phone;
pub mod sms;
pub mod template;
pub mod twilio;
