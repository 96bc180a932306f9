//! Talking to Discord, below both the bot and the worker: rendering model text into messages
//! ([`render`]), retrying writes ([`rest`]), streaming an answer into messages ([`stream`]), and
//! the `[discord]` settings. Nothing here knows about questions, jobs or the model.

pub mod render;
pub mod rest;
pub mod settings;
pub mod stream;

pub use settings::{DiscordSettings, Shards};
