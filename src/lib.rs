//! freeski-bot: a self-hosted Discord bot that answers freeskiing questions with a local,
//! QLoRA-tuned Llama-family model. See ARCHITECTURE.md for the parts and how data flows.

pub mod adapters;
pub mod bench;
pub mod bot;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod discord;
pub mod kernels;
pub mod llm;
pub mod scrape;
pub mod serve;
pub mod store;
pub mod train;
pub mod util;
pub mod worker;
