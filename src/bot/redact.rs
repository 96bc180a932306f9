//! Secrets out of the logs. serenity instruments its HTTP calls, so with debug logging every
//! event inside a request prints that request: its route (interaction tokens, webhook tokens)
//! and its body (the message text, as bytes). [`RedactingStderr`] is the log writer of the
//! binary: each formatted line passes through [`secrets`] before it reaches stderr.

use std::borrow::Cow;
use std::io::Write;
use std::sync::LazyLock;

use regex::Regex;

/// `line` with interaction and webhook tokens, bot tokens and request bodies replaced by `***`.
pub fn secrets(line: &str) -> Cow<'_, str> {
    static RULES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
        [
            // Debug of serenity's routes: `token: "…"`, `token: Some("…")`.
            (r#"(token: (?:Some\()?)"[^"]*""#, r#"$1"***""#),
            // JSON payloads (interactions carry their token).
            (r#"("token"\s*:\s*)"[^"]*""#, r#"$1"***""#),
            // URLs of interaction callbacks and webhooks: the token is the segment after the id.
            (r"(/(?:webhooks|interactions)/[0-9]+/)[^/\s\x22?]+", "$1***"),
            // An Authorization header value.
            (r"(Bot )[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-.]+", "$1***"),
            // Request bodies, printed as byte lists.
            (r"(body: Some\()\[[0-9, ]*\]", "$1[…]"),
        ]
        .into_iter()
        .map(|(re, with)| (Regex::new(re).expect("valid regex"), with))
        .collect()
    });
    let mut out = Cow::Borrowed(line);
    for (re, with) in RULES.iter() {
        if re.is_match(&out) {
            out = Cow::Owned(re.replace_all(&out, *with).into_owned());
        }
    }
    out
}

/// A `tracing_subscriber` writer to stderr that passes each log record through [`secrets`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RedactingStderr;

/// One log record, buffered until it is complete (the formatter writes a record in pieces).
pub struct RedactingWriter {
    buf: Vec<u8>,
}

impl Write for RedactingWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactingWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let _ = std::io::stderr().lock().write_all(secrets(&text).as_bytes());
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter { buf: Vec::with_capacity(256) }
    }
}

#[cfg(test)]
mod tests {
    use super::secrets;

    #[test]
    fn tokens_and_bodies_are_redacted() {
        let line = r#"request{req=Request { body: Some([123, 34, 99]), route: EditOriginalInteractionResponse { application_id: ApplicationId(9), token: "aW50ZXJhY3Rpb24" } }}: connecting to 127.0.0.1"#;
        let out = secrets(line);
        assert!(!out.contains("aW50ZXJhY3Rpb24") && !out.contains("123, 34"), "{out}");
        assert!(out.contains("connecting to 127.0.0.1"), "{out}");
        for (line, secret) in [
            (r#"{"token":"itoken42","id":"1"}"#, "itoken42"),
            ("POST /api/v10/interactions/123/itoken42/callback", "itoken42"),
            ("PATCH /api/v10/webhooks/900/itoken42/messages/@original", "itoken42"),
            ("token: Some(\"itoken42\")", "itoken42"),
            ("Authorization: Bot MTA5ODc2NTQzMjEwOTg3NjU0.GaBcDe.abcdefghijklmnop", "GaBcDe"),
        ] {
            let out = secrets(line);
            assert!(!out.contains(secret), "{line} → {out}");
        }
        assert_eq!(secrets("nothing secret here"), "nothing secret here");
    }
}
