//! Moving instances between members (layer 2). `plan` (what each
//! participant does next) and `compat` (the compatibility check) are pure,
//! layer 0; `engine` drives jobs (decide → act → report), `source` and
//! `target` are the two halves (`live` when the runtime moves the
//! instance itself, relayed; `pages` a final dump's memory pages streamed
//! while they are dumped, `lazy` a lazy move's pages fetched after it), `serve` answers transfer channels, `jobs` the
//! operator's job requests, `image` a layered instance's image on the
//! rootfs channel, `method` how each rootfs pass travels (entries or btrfs
//! send/receive, agreed on its channel), `relay` the third member of a
//! move in relay mode.

pub mod compat;
pub mod engine;
mod error;
mod image;
pub mod jobs;
mod lazy;
mod live;
mod method;
mod pages;
pub mod plan;
mod relay;
mod serve;
mod source;
mod target;

pub use engine::run;
pub use relay::serve_relay;
pub use serve::serve_transfer;
