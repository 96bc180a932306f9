//! Small helpers shared by every part of the crate, depending on none of them.

pub mod backoff;
pub mod clock;
pub mod compare;
pub mod hash;
pub mod secret;
pub mod tmp_path;
