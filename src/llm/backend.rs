//! Where answers come from: the local engine, or an OpenAI-compatible server (`[llm] backend`).
//! Either way a question goes in and a [`Ticket`] of the same events comes out, so the bot's
//! answering, streaming edits and votes do not know which one answered.
//!
//! With the remote backend the local engine is still there: its tokenizer counts question
//! tokens and trims reply context, its model is what `/retrain` trains and gates, and its
//! active adapter says which model name the server is asked for (the adapter's id, else the
//! server's base name), so `/adapter` and promotion work the same on both.

use super::engine::{Engine, Question, SubmitError, Ticket};
use super::remote::RemoteClient;

#[derive(Clone)]
pub struct Backend {
    engine: Engine,
    remote: Option<RemoteClient>,
}

impl Backend {
    pub fn local(engine: Engine) -> Self {
        Self { engine, remote: None }
    }

    pub fn remote(engine: Engine, client: RemoteClient) -> Self {
        Self { engine, remote: Some(client) }
    }

    /// The local engine (tokenizer, training, the active adapter).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn remote_client(&self) -> Option<&RemoteClient> {
        self.remote.as_ref()
    }

    /// Queue `q` on the engine, or send it to the server (inside a tokio runtime) with the
    /// engine's system prompt, asking for the active adapter's model.
    pub fn submit(&self, q: Question) -> Result<Ticket, SubmitError> {
        match &self.remote {
            None => self.engine.submit(q),
            Some(r) => {
                let model = r.model_for(self.engine.active_adapter_id().as_deref());
                Ok(r.submit(&self.engine.config().system_prompt, &q, &model))
            }
        }
    }

    /// The queue line of `/status`.
    pub fn describe(&self) -> String {
        match &self.remote {
            None => format!("{} waiting, {} being answered", self.engine.queue_depth(), self.engine.running()),
            Some(r) => format!("{} being answered by the model server", r.in_flight()),
        }
    }

    /// Stop: answers in flight on the server end as cancelled (the local engine is stopped by
    /// its owner).
    pub fn shutdown(&self) {
        if let Some(r) = &self.remote {
            r.shutdown();
        }
    }
}
