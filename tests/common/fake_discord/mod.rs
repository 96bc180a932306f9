//! A fake Discord on 127.0.0.1 that the real serenity client talks to: REST (hyper) and the
//! gateway (WebSocket). It records every REST call with its own clock, answers with full
//! Message objects, runs the gateway handshake, and lets tests inject events, reconnects,
//! invalid sessions, malformed payloads and REST failures. The bot reaches it through
//! `discord.api_base`; `GET /gateway` hands serenity the fake's WebSocket URL.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message as Ws;

pub const BOT_ID: u64 = 900_000_000_000_001;
pub const APP_ID: u64 = 900_000_000_000_002;
pub const GUILD_ID: u64 = 100_000_000_000_001;
pub const CHANNEL_ID: u64 = 200_000_000_000_001;
/// A role that grants SEND_MESSAGES etc. (the bot has it).
pub const BOT_ROLE_ID: u64 = 300_000_000_000_001;
/// Permission bits of the bot role: VIEW_CHANNEL, SEND_MESSAGES, READ_MESSAGE_HISTORY,
/// ADD_REACTIONS, EMBED_LINKS.
const BOT_ROLE_PERMS: &str = "85056";
/// ADMINISTRATOR set together with every other bit, as Discord reports admins' permissions.
pub const ADMIN_PERMS: &str = "2251799813685247";
pub const MEMBER_PERMS: &str = "68672";

/// One REST call as the fake received it.
#[derive(Debug, Clone)]
pub struct Call {
    /// Fake server clock: time since the fake started.
    pub at: Duration,
    pub method: String,
    pub path: String,
    pub body: Value,
    /// Status the fake answered with.
    pub status: u16,
    /// Id of the message created or edited, if any.
    pub message_id: Option<u64>,
    /// Files of a multipart request (attachments): name and bytes.
    pub files: Vec<(String, Vec<u8>)>,
}

enum WsCmd {
    Dispatch(&'static str, Value),
    Raw(String),
    Close,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    next_id: u64,
    /// (method, path prefix) → how many more calls fail with 500.
    failures: Vec<(String, String, u32)>,
    /// Messages the bot created, by id (for PATCH replies).
    messages: HashMap<u64, Value>,
    gateway: Option<mpsc::UnboundedSender<WsCmd>>,
    identifies: u32,
    resumes: u32,
    seq: u64,
    session: u32,
}

pub struct FakeDiscord {
    pub rest_url: String,
    ws_url: String,
    started: Instant,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn user(id: u64, name: &str, bot: bool) -> Value {
    json!({"id": id.to_string(), "username": name, "discriminator": "0", "global_name": name, "avatar": null, "bot": bot})
}

fn member(user: Value, roles: &[u64], perms: Option<&str>) -> Value {
    let mut m = json!({"user": user, "roles": roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(), "joined_at": "2024-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false, "flags": 0});
    if let Some(p) = perms {
        m["permissions"] = p.into();
    }
    m
}

impl FakeDiscord {
    pub async fn start() -> Self {
        let rest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest_addr: SocketAddr = rest.local_addr().unwrap();
        let ws_url = format!("ws://{}", ws.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { next_id: 500_000_000_000_000, ..Default::default() }));
        let changed = Arc::new(Notify::new());
        let started = Instant::now();
        let mut fake = Self { rest_url: format!("http://{rest_addr}"), ws_url, started, state, changed, tasks: Vec::new() };
        let (st, ch, wsu) = (fake.state.clone(), fake.changed.clone(), fake.ws_url.clone());
        fake.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = rest.accept().await else { return };
                let (st, ch, wsu) = (st.clone(), ch.clone(), wsu.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, ch, wsu) = (st.clone(), ch.clone(), wsu.clone());
                        async move { Ok::<_, Infallible>(handle_rest(req, &st, &ch, &wsu, started).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                });
            }
        }));
        let (st, ch, wsu) = (fake.state.clone(), fake.changed.clone(), fake.ws_url.clone());
        fake.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = ws.accept().await else { return };
                let (st, ch, wsu) = (st.clone(), ch.clone(), wsu.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = tokio_tungstenite::accept_async(stream).await {
                        gateway_session(conn, st, ch, wsu).await;
                    }
                });
            }
        }));
        fake
    }

    /// Fake clock now.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn identifies(&self) -> u32 {
        self.state.lock().unwrap().identifies
    }

    pub fn resumes(&self) -> u32 {
        self.state.lock().unwrap().resumes
    }

    /// Wait until `pred` holds on the recorded calls (checked after every change); panics
    /// after `timeout` (a failure guard, not a measurement).
    pub async fn wait_for<T>(&self, what: &str, timeout: Duration, mut pred: impl FnMut(&FakeDiscord) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = pred(self) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Some(v) = pred(self) {
                    return v;
                }
                let calls: Vec<String> = self.calls().iter().map(|c| format!("{:?} {} {} {}", c.at, c.method, c.path, c.body)).collect();
                panic!("timed out waiting for {what}; REST calls so far:\n{}", calls.join("\n"));
            }
        }
    }

    /// Wait until a gateway session is ready (READY sent) and the bot registered its commands.
    pub async fn wait_connected(&self, sessions: u32) {
        self.wait_for("the bot to connect", Duration::from_secs(30), |f| {
            let s = f.state.lock().unwrap();
            (s.session >= sessions && s.gateway.is_some() && s.calls.iter().any(|c| c.method == "PUT" && c.path.contains("/commands"))).then_some(())
        })
        .await;
    }

    /// Make the next `n` `method` calls whose path starts with `prefix` fail with HTTP 500.
    pub fn fail_next(&self, method: &str, prefix: &str, n: u32) {
        self.state.lock().unwrap().failures.push((method.into(), prefix.into(), n));
    }

    fn send(&self, cmd: WsCmd) {
        let s = self.state.lock().unwrap();
        assert!(s.gateway.as_ref().expect("no gateway connection").send(cmd).is_ok(), "gateway connection closed");
    }

    pub fn dispatch(&self, t: &'static str, d: Value) {
        self.send(WsCmd::Dispatch(t, d));
    }

    /// Send raw text on the gateway (malformed payloads).
    pub fn raw(&self, text: &str) {
        self.send(WsCmd::Raw(text.to_string()));
    }

    /// op 7: the client must reconnect (and resume).
    pub fn reconnect(&self) {
        self.send(WsCmd::Raw(json!({"op": 7, "d": null}).to_string()));
    }

    /// op 9 with `d: false`: the session is gone; the client must identify again.
    pub fn invalid_session(&self) {
        self.send(WsCmd::Raw(json!({"op": 9, "d": false}).to_string()));
    }

    pub fn close_gateway(&self) {
        self.send(WsCmd::Close);
    }

    pub fn new_id(&self) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        s.next_id
    }

    /// A user's message in the test channel (or a DM with `guild = false`).
    pub fn message(&self, author: u64, content: &str, mention_bot: bool, reply_to: Option<&Value>) -> Value {
        let id = self.new_id();
        let author_v = user(author, &format!("user{author}"), false);
        let mut m = json!({
            "id": id.to_string(), "channel_id": CHANNEL_ID.to_string(), "guild_id": GUILD_ID.to_string(),
            "author": author_v.clone(), "member": member(Value::Null, &[], None),
            "content": content, "timestamp": "2024-01-01T00:00:00.000000+00:00", "edited_timestamp": null,
            "tts": false, "mention_everyone": false,
            "mentions": if mention_bot { vec![user(BOT_ID, "freeski-bot", true)] } else { vec![] },
            "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0, "flags": 0,
        });
        m["member"].as_object_mut().unwrap().remove("user");
        if let Some(parent) = reply_to {
            m["type"] = 19.into();
            m["message_reference"] = json!({"message_id": parent["id"], "channel_id": parent["channel_id"], "guild_id": GUILD_ID.to_string()});
            m["referenced_message"] = parent.clone();
        }
        m
    }

    /// Send a user message as MESSAGE_CREATE; returns it.
    pub fn say(&self, author: u64, content: &str, mention_bot: bool, reply_to: Option<&Value>) -> Value {
        let m = self.message(author, content, mention_bot, reply_to);
        self.dispatch("MESSAGE_CREATE", m.clone());
        m
    }

    /// A message the bot created, as the fake stored it.
    pub fn bot_message(&self, id: u64) -> Value {
        self.state.lock().unwrap().messages.get(&id).cloned().expect("no such bot message")
    }

    /// Send a slash command; returns its interaction token.
    pub fn slash(&self, user_id: u64, admin: bool, name: &str, options: Value) -> String {
        let id = self.new_id();
        let token = format!("itoken{id}");
        let perms = if admin { ADMIN_PERMS } else { MEMBER_PERMS };
        let d = json!({
            "id": id.to_string(), "application_id": APP_ID.to_string(), "type": 2,
            "data": {"id": "1", "name": name, "type": 1, "options": options},
            "guild_id": GUILD_ID.to_string(), "channel_id": CHANNEL_ID.to_string(),
            "member": member(user(user_id, &format!("user{user_id}"), false), &[], Some(perms)),
            "token": token, "version": 1, "locale": "en-US", "guild_locale": "en-US",
            "entitlements": [], "attachment_size_limit": 8_388_608, "app_permissions": ADMIN_PERMS,
            "authorizing_integration_owners": {"0": GUILD_ID.to_string()}, "context": 0,
        });
        self.dispatch("INTERACTION_CREATE", d);
        token
    }

    pub fn react(&self, user_id: u64, message_id: u64, emoji: &str, add: bool, bot: bool) {
        let mut d = json!({
            "user_id": user_id.to_string(), "channel_id": CHANNEL_ID.to_string(), "message_id": message_id.to_string(),
            "guild_id": GUILD_ID.to_string(), "emoji": {"id": null, "name": emoji}, "burst": false, "type": 0,
        });
        if add {
            d["member"] = member(user(user_id, &format!("user{user_id}"), bot), &[], None);
            d["message_author_id"] = BOT_ID.to_string().into();
        }
        self.dispatch(if add { "MESSAGE_REACTION_ADD" } else { "MESSAGE_REACTION_REMOVE" }, d);
    }

    pub fn delete_message(&self, id: u64) {
        self.dispatch("MESSAGE_DELETE", json!({"id": id.to_string(), "channel_id": CHANNEL_ID.to_string(), "guild_id": GUILD_ID.to_string()}));
    }
}

fn guild_create() -> Value {
    let role = |id: u64, name: &str, perms: &str| {
        json!({"id": id.to_string(), "name": name, "color": 0, "colors": {"primary_color": 0, "secondary_color": null, "tertiary_color": null},
               "hoist": false, "icon": null, "unicode_emoji": null, "position": 1, "permissions": perms, "managed": false, "mentionable": false, "flags": 0})
    };
    let mut g = json!({
        "id": GUILD_ID.to_string(), "name": "Freeski test", "icon": null, "splash": null, "discovery_splash": null,
        "owner_id": "1", "afk_channel_id": null, "afk_timeout": 300, "verification_level": 0,
        "default_message_notifications": 0, "explicit_content_filter": 0, "features": [], "mfa_level": 0,
        "application_id": null, "system_channel_id": null, "system_channel_flags": 0, "rules_channel_id": null,
    });
    let more = json!({
        "vanity_url_code": null, "description": null, "banner": null, "premium_tier": 0, "preferred_locale": "en-US",
        "public_updates_channel_id": null, "nsfw_level": 0, "premium_progress_bar_enabled": false,
        "roles": [role(GUILD_ID, "@everyone", "0"), role(BOT_ROLE_ID, "bot", BOT_ROLE_PERMS)],
        "emojis": [], "stickers": [], "joined_at": "2024-01-01T00:00:00.000000+00:00", "large": false, "unavailable": false,
    });
    let rest = json!({
        "member_count": 2, "voice_states": [], "presences": [], "threads": [], "stage_instances": [], "guild_scheduled_events": [],
        "members": [member(user(BOT_ID, "freeski-bot", true), &[BOT_ROLE_ID], None)],
        "channels": [{"id": CHANNEL_ID.to_string(), "type": 0, "guild_id": GUILD_ID.to_string(), "name": "ski-talk", "position": 0,
                      "permission_overwrites": [], "nsfw": false, "topic": null, "last_message_id": null, "parent_id": null, "rate_limit_per_user": 0}],
    });
    for part in [more, rest] {
        if let (Some(g), Value::Object(p)) = (g.as_object_mut(), part) {
            g.extend(p);
        }
    }
    g
}

async fn gateway_session(conn: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, st: Arc<Mutex<State>>, ch: Arc<Notify>, ws_url: String) {
    let (mut tx, mut rx) = conn.split();
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<WsCmd>();
    if tx.send(Ws::Text(json!({"op": 10, "d": {"heartbeat_interval": 41250}}).to_string())).await.is_err() {
        return;
    }
    let next_seq = |st: &Arc<Mutex<State>>| {
        let mut s = st.lock().unwrap();
        s.seq += 1;
        s.seq
    };
    loop {
        tokio::select! {
            msg = rx.next() => {
                let Some(Ok(msg)) = msg else { break };
                let Ws::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                match v["op"].as_u64() {
                    Some(1) => { let _ = tx.send(Ws::Text(json!({"op": 11}).to_string())).await; }
                    Some(2) => {
                        let session = {
                            let mut s = st.lock().unwrap();
                            s.identifies += 1;
                            s.session += 1;
                            s.seq = 0;
                            s.session
                        };
                        let ready = json!({"v": 10, "user": user(BOT_ID, "freeski-bot", true), "guilds": [{"id": GUILD_ID.to_string(), "unavailable": true}],
                            "session_id": format!("session{session}"), "resume_gateway_url": ws_url, "application": {"id": APP_ID.to_string(), "flags": 0}});
                        let s1 = next_seq(&st);
                        let _ = tx.send(Ws::Text(json!({"op": 0, "t": "READY", "s": s1, "d": ready}).to_string())).await;
                        let s2 = next_seq(&st);
                        let _ = tx.send(Ws::Text(json!({"op": 0, "t": "GUILD_CREATE", "s": s2, "d": guild_create()}).to_string())).await;
                        st.lock().unwrap().gateway = Some(cmd_tx.clone());
                        ch.notify_waiters();
                    }
                    Some(6) => {
                        let s = next_seq(&st);
                        let _ = tx.send(Ws::Text(json!({"op": 0, "t": "RESUMED", "s": s, "d": {}}).to_string())).await;
                        // Counted once the connection can take commands: a test that saw the
                        // resume may send on it at once.
                        let mut state = st.lock().unwrap();
                        state.gateway = Some(cmd_tx.clone());
                        state.resumes += 1;
                        drop(state);
                        ch.notify_waiters();
                    }
                    _ => {}
                }
            }
            cmd = cmd_rx.recv() => match cmd {
                Some(WsCmd::Dispatch(t, d)) => {
                    let s = next_seq(&st);
                    if tx.send(Ws::Text(json!({"op": 0, "t": t, "s": s, "d": d}).to_string())).await.is_err() { break; }
                }
                Some(WsCmd::Raw(text)) => { if tx.send(Ws::Text(text)).await.is_err() { break; } }
                Some(WsCmd::Close) | None => { let _ = tx.send(Ws::Close(None)).await; break; }
            },
        }
    }
    let mut s = st.lock().unwrap();
    if s.gateway.as_ref().is_some_and(|g| g.same_channel(&cmd_tx)) {
        s.gateway = None;
    }
    drop(s);
    ch.notify_waiters();
}

fn message_json(st: &mut State, id: u64, channel: &str, content: &str, body: &Value, webhook: bool) -> Value {
    let mut m = json!({
        "id": id.to_string(), "channel_id": channel, "author": user(BOT_ID, "freeski-bot", true),
        "content": content, "timestamp": "2024-01-01T00:00:00.000000+00:00", "edited_timestamp": null,
        "tts": false, "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
        "pinned": false, "type": 0, "flags": 0,
    });
    if webhook {
        m["webhook_id"] = APP_ID.to_string().into();
        m["application_id"] = APP_ID.to_string().into();
        m["type"] = 20.into();
        m["interaction_metadata"] = json!({"id": "1", "type": 2, "user": user(1, "asker", false), "authorizing_integration_owners": {"0": GUILD_ID.to_string()}});
    }
    if let Some(r) = body.get("message_reference").filter(|r| !r.is_null()) {
        m["type"] = 19.into();
        m["message_reference"] = r.clone();
    }
    st.messages.insert(id, m.clone());
    m
}

async fn handle_rest(req: Request<Incoming>, st: &Arc<Mutex<State>>, ch: &Arc<Notify>, ws_url: &str, started: Instant) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let boundary = req.headers().get("content-type").and_then(|v| v.to_str().ok()).and_then(|v| v.split("boundary=").nth(1)).map(|b| b.trim_matches('"').to_string());
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let (body, files) = match boundary {
        Some(b) => multipart(&bytes, &b),
        None => (serde_json::from_slice(&bytes).unwrap_or(Value::Null), Vec::new()),
    };
    let at = started.elapsed();
    let mut s = st.lock().unwrap();
    let mut status = 200;
    let mut message_id = None;
    let failing = s.failures.iter_mut().find(|(m, p, n)| *m == method && path.starts_with(p.as_str()) && *n > 0);
    // Discord refuses message content over 2,000 characters (messages, edits, interaction responses).
    let content = body.get("content").or_else(|| body.get("data").and_then(|d| d.get("content"))).and_then(|c| c.as_str());
    let too_long = content.is_some_and(|c| c.chars().count() > 2000);
    let reply: Value = if let Some(f) = failing {
        f.2 -= 1;
        status = 500;
        json!({"message": "500: Internal Server Error", "code": 0})
    } else if too_long {
        status = 400;
        json!({"message": "Invalid Form Body", "code": 50035, "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}}})
    } else {
        let segs: Vec<&str> = path.trim_start_matches("/api/v10/").split('/').collect();
        match (method.as_str(), segs.as_slice()) {
            ("GET", ["gateway"]) => json!({"url": ws_url}),
            ("POST", ["channels", _, "typing"]) => {
                status = 204;
                Value::Null
            }
            ("POST", ["channels", c, "messages"]) => {
                s.next_id += 1;
                let id = s.next_id;
                message_id = Some(id);
                let content = body["content"].as_str().unwrap_or_default().to_string();
                message_json(&mut s, id, c, &content, &body, false)
            }
            ("PATCH", ["channels", _, "messages", m]) | ("PATCH", ["webhooks", _, _, "messages", m]) => {
                let id = if *m == "@original" { original_id(&mut s, &path) } else { m.parse().unwrap_or(0) };
                message_id = Some(id);
                let mut msg = s.messages.get(&id).cloned().unwrap_or_else(|| json!({}));
                if msg.get("id").is_none() {
                    msg = message_json(&mut s, id, &CHANNEL_ID.to_string(), "", &Value::Null, true);
                }
                if let Some(c) = body.get("content").and_then(|c| c.as_str()) {
                    msg["content"] = c.into();
                }
                msg["edited_timestamp"] = "2024-01-01T00:00:01.000000+00:00".into();
                s.messages.insert(id, msg.clone());
                msg
            }
            ("DELETE", _) => {
                status = 204;
                Value::Null
            }
            ("POST", ["interactions", _, _, "callback"]) => {
                status = 204;
                Value::Null
            }
            ("POST", ["webhooks", _, _]) => {
                s.next_id += 1;
                let id = s.next_id;
                message_id = Some(id);
                let content = body["content"].as_str().unwrap_or_default().to_string();
                message_json(&mut s, id, &CHANNEL_ID.to_string(), &content, &body, true)
            }
            ("PUT", ["applications", _, "guilds", _, "commands"]) | ("PUT", ["applications", _, "commands"]) => {
                let cmds = body.as_array().cloned().unwrap_or_default();
                let out: Vec<Value> = cmds
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut c)| {
                        c["id"] = (700 + i).to_string().into();
                        c["application_id"] = APP_ID.to_string().into();
                        c["version"] = "1".into();
                        c["type"] = 1.into();
                        if c.get("options").is_none() {
                            c["options"] = json!([]);
                        }
                        c
                    })
                    .collect();
                Value::Array(out)
            }
            _ => {
                status = 404;
                json!({"message": "Unknown route", "code": 0})
            }
        }
    };
    s.calls.push(Call { at, method, path, body, status, message_id, files });
    drop(s);
    ch.notify_waiters();
    let mut resp = Response::builder().status(StatusCode::from_u16(status).unwrap()).header("content-type", "application/json");
    if status == 204 {
        resp = resp.header("content-length", "0");
        return resp.body(Full::new(Bytes::new())).unwrap();
    }
    resp.body(Full::new(Bytes::from(reply.to_string()))).unwrap()
}

/// A multipart/form-data body as serenity sends attachments: the `payload_json` part is the
/// JSON body, every part with a filename is a file.
fn multipart(bytes: &[u8], boundary: &str) -> (Value, Vec<(String, Vec<u8>)>) {
    let delim = format!("--{boundary}").into_bytes();
    let mut cuts = Vec::new();
    let mut i = 0;
    while i + delim.len() <= bytes.len() {
        if bytes[i..].starts_with(&delim) {
            cuts.push(i);
            i += delim.len();
        } else {
            i += 1;
        }
    }
    let (mut body, mut files) = (Value::Null, Vec::new());
    for w in cuts.windows(2) {
        let part = &bytes[w[0] + delim.len()..w[1]];
        let Some(split) = part.windows(4).position(|x| x == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&part[..split]).to_string();
        let data = part[split + 4..].strip_suffix(b"\r\n").unwrap_or(&part[split + 4..]);
        let field = |key: &str| head.split(&format!("{key}=\"")).nth(1).and_then(|r| r.split('"').next()).map(str::to_string);
        match (field("name").as_deref(), field("filename")) {
            (_, Some(file)) => files.push((file, data.to_vec())),
            (Some("payload_json"), None) => body = serde_json::from_slice(data).unwrap_or(Value::Null),
            _ => {}
        }
    }
    (body, files)
}

/// The message id standing for an interaction's original response (one per token).
fn original_id(s: &mut State, path: &str) -> u64 {
    let token = path.split('/').nth(5).unwrap_or_default().to_string();
    let key = format!("original:{token}");
    if let Some(id) = s.messages.get(&0).and_then(|m| m.get(&key)).and_then(|v| v.as_u64()) {
        return id;
    }
    s.next_id += 1;
    let id = s.next_id;
    let index = s.messages.entry(0).or_insert_with(|| json!({}));
    index[key] = id.into();
    id
}
