//! `[discord]` settings (documented with their defaults in `config/default.toml`).

use anyhow::{ensure, Result};
use serde::Deserialize;

/// How the bot reaches Discord and who it listens to. The token is not here: it comes from
/// `DISCORD_TOKEN` or `token_file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscordSettings {
    /// REST base URL of a Discord API proxy; "" talks to Discord itself.
    pub api_base: String,
    /// File holding the bot token (used when `DISCORD_TOKEN` is unset); "" for none.
    pub token_file: String,
    /// Guilds to register slash commands in (instant); empty registers them globally.
    #[serde(deserialize_with = "ids")]
    pub guild_ids: Vec<u64>,
    #[serde(deserialize_with = "ids")]
    pub admin_role_ids: Vec<u64>,
    #[serde(deserialize_with = "ids")]
    pub admin_user_ids: Vec<u64>,
    /// Channels where every message is answered (mentions and replies work everywhere).
    #[serde(deserialize_with = "ids")]
    pub answer_channel_ids: Vec<u64>,
    pub answer_dms: bool,
    /// Shortest time between two writes (post or edit) of one streamed answer.
    pub edit_interval_ms: u64,
    /// Retries of a failed post or edit (5xx, connection errors) before giving up.
    pub rest_retries: u32,
    pub rest_retry_backoff_ms: u64,
    /// Gateway connections: a number, or `"auto"` (Discord's recommendation).
    pub shards: Shards,
}

/// `discord.shards`: `"auto"` or a count (a number, or a numeric string from the environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    Auto,
    Count(u32),
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Shards::Count(n)),
            Raw::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(Shards::Auto),
            Raw::Text(t) => t.trim().parse().map(Shards::Count).map_err(|_| serde::de::Error::custom(format!("`{t}` is neither \"auto\" nor a number of shards"))),
        }
    }
}

/// A list of ids; one id alone is accepted too. From the environment, `FREESKI__DISCORD__GUILD_IDS=123`
/// arrives as a single number and `=1,22` as a list of strings: both are read as ids.
fn ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Num(u64),
        Text(String),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Id),
        Many(Vec<Id>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(v) => vec![v],
        OneOrMany::Many(v) => v,
    };
    list.into_iter()
        .map(|id| match id {
            Id::Num(n) => Ok(n),
            Id::Text(t) => t.trim().parse().map_err(|_| serde::de::Error::custom(format!("`{t}` is not a Discord id"))),
        })
        .collect()
}

impl DiscordSettings {
    /// How failed posts and edits are retried.
    pub fn retry_policy(&self) -> crate::discord::rest::RetryPolicy {
        let base = std::time::Duration::from_millis(self.rest_retry_backoff_ms);
        crate::discord::rest::RetryPolicy { retries: self.rest_retries, backoff: crate::util::backoff::Backoff { base, max: base * 64 } }
    }

    pub fn validate(&self) -> Result<()> {
        let d = "discord";
        ensure!(
            self.api_base.is_empty() || self.api_base.starts_with("http://") || self.api_base.starts_with("https://"),
            "{d}.api_base must be empty or an http(s) URL, got {:?}",
            self.api_base
        );
        ensure!(self.edit_interval_ms >= 50, "{d}.edit_interval_ms must be at least 50 (Discord rate-limits edits), got {}", self.edit_interval_ms);
        ensure!(self.rest_retries <= 10, "{d}.rest_retries must be at most 10, got {}", self.rest_retries);
        ensure!(self.shards != Shards::Count(0), "{d}.shards must be \"auto\" or at least 1");
        Ok(())
    }
}
