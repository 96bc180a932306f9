//! robots.txt (RFC 9309): groups by user agent, `allow`/`disallow` with `*` and `$`, longest
//! match wins and `allow` wins ties, plus the common `crawl-delay` extension.

use std::time::Duration;

use url::Url;

/// RFC 9309 asks crawlers to parse at least 500 KiB; anything after that is ignored.
const MAX_BYTES: usize = 500 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    allow: bool,
    pattern: String,
}

#[derive(Debug, Default)]
struct Group {
    agents: Vec<String>,
    rules: Vec<Rule>,
    crawl_delay: Option<Duration>,
}

/// The rules that apply to one user agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Robots {
    rules: Vec<Rule>,
    crawl_delay: Option<Duration>,
}

/// The product token robots.txt groups are matched against: `freeski-bot/0.1 (+url)` →
/// `freeski-bot`.
pub fn product_token(user_agent: &str) -> String {
    user_agent.split(|c: char| c == '/' || c.is_whitespace()).next().unwrap_or("").to_ascii_lowercase()
}

impl Robots {
    /// No robots.txt (4xx): everything is allowed.
    pub fn allow_all() -> Self {
        Self { rules: Vec::new(), crawl_delay: None }
    }

    /// robots.txt unreachable (5xx, network): RFC 9309 says assume complete disallow.
    pub fn disallow_all() -> Self {
        Self { rules: vec![Rule { allow: false, pattern: "/".into() }], crawl_delay: None }
    }

    pub fn parse(text: &str, user_agent: &str) -> Self {
        let text = if text.len() > MAX_BYTES {
            let mut end = MAX_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &text[..end]
        } else {
            text
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut groups: Vec<Group> = Vec::new();
        // Consecutive user-agent lines share one group; any rule line closes the agent list.
        let mut collecting_agents = false;
        for raw in text.lines() {
            let line = raw.split('#').next().unwrap_or("").trim();
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim();
            match key.as_str() {
                "user-agent" => {
                    if !collecting_agents || groups.is_empty() {
                        groups.push(Group::default());
                    }
                    if let Some(g) = groups.last_mut() {
                        g.agents.push(value.to_ascii_lowercase());
                    }
                    collecting_agents = true;
                }
                "allow" | "disallow" => {
                    collecting_agents = false;
                    if value.is_empty() {
                        continue; // `Disallow:` with no path means "nothing disallowed".
                    }
                    if let Some(g) = groups.last_mut() {
                        g.rules.push(Rule { allow: key == "allow", pattern: value.to_string() });
                    }
                }
                "crawl-delay" => {
                    collecting_agents = false;
                    if let (Some(g), Ok(secs)) = (groups.last_mut(), value.parse::<f64>()) {
                        if secs.is_finite() && secs >= 0.0 {
                            g.crawl_delay = Some(Duration::from_secs_f64(secs.min(3600.0)));
                        }
                    }
                }
                _ => {}
            }
        }
        let token = product_token(user_agent);
        let mine: Vec<&Group> = groups.iter().filter(|g| g.agents.contains(&token)).collect();
        let chosen = if mine.is_empty() { groups.iter().filter(|g| g.agents.iter().any(|a| a == "*")).collect() } else { mine };
        Self { rules: chosen.iter().flat_map(|g| g.rules.iter().cloned()).collect(), crawl_delay: chosen.iter().filter_map(|g| g.crawl_delay).max() }
    }

    pub fn crawl_delay(&self) -> Option<Duration> {
        self.crawl_delay
    }

    pub fn allowed(&self, url: &Url) -> bool {
        let mut target = url.path().to_string();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        self.allowed_path(&target)
    }

    /// `path` is the URL path plus `?query`.
    pub fn allowed_path(&self, path: &str) -> bool {
        if path == "/robots.txt" {
            return true;
        }
        let mut best: Option<(usize, bool)> = None;
        for rule in &self.rules {
            if pattern_matches(&rule.pattern, path) {
                let len = rule.pattern.len();
                best = match best {
                    Some((l, allow)) if l > len || (l == len && allow) => Some((l, allow)),
                    _ => Some((len, rule.allow)),
                };
            }
        }
        best.is_none_or(|(_, allow)| allow)
    }
}

/// Prefix match with `*` (any run of characters) and a trailing `$` (end of path).
fn pattern_matches(pattern: &str, path: &str) -> bool {
    let (pattern, anchored) = match pattern.strip_suffix('$') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    let p = pattern.as_bytes();
    let s = path.as_bytes();
    // Classic wildcard matching with one backtrack point; the pattern is a prefix match unless
    // anchored, which is the same as an implicit trailing `*`.
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi == p.len() {
            if !anchored || si == s.len() {
                return true;
            }
        } else if p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
            continue;
        } else if si < s.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
            continue;
        }
        match star {
            Some((sp, ss)) if ss < s.len() => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UA: &str = "freeski-bot/0.1 (+https://example.org/bot)";

    #[test]
    fn groups_and_longest_match() {
        let txt = "\u{feff}# comment\nUser-agent: *\nDisallow: /forum/search\nDisallow: /private/\nAllow: /private/ok\n\nUser-agent: BadBot\nUser-Agent: OtherBot\nDisallow: /\n";
        let r = Robots::parse(txt, UA);
        assert!(r.allowed_path("/forum/1/Ski-Gabber?page=2"));
        assert!(!r.allowed_path("/forum/search?q=skis"));
        assert!(!r.allowed_path("/private/x"));
        assert!(r.allowed_path("/private/ok/x"));
        assert!(r.allowed_path("/robots.txt"));
        let bad = Robots::parse(txt, "OtherBot/2.0");
        assert!(!bad.allowed_path("/forum/1/Ski-Gabber"));
    }

    #[test]
    fn own_group_replaces_star_and_merges() {
        let txt = "User-agent: *\nDisallow: /\n\nUser-agent: freeski-bot\nDisallow: /forum/thread/13/\nCrawl-delay: 2\n\nuser-agent: FREESKI-BOT\ndisallow: /tmp\n";
        let r = Robots::parse(txt, UA);
        assert!(r.allowed_path("/forum/1/Ski-Gabber"));
        assert!(!r.allowed_path("/forum/thread/13/Some-Title?page=2"));
        assert!(!r.allowed_path("/tmp/x"));
        assert_eq!(r.crawl_delay(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn wildcards_anchor_and_ties() {
        let txt = "User-agent: *\nDisallow: /*?sort=\nDisallow: /*.php$\nAllow: /page\nDisallow: /page\nDisallow:\n";
        let r = Robots::parse(txt, UA);
        assert!(!r.allowed_path("/forum/1/x?sort=new"));
        assert!(!r.allowed_path("/index.php"));
        assert!(r.allowed_path("/index.php?x=1"));
        assert!(r.allowed_path("/page/2"), "allow wins a tie");
        assert!(pattern_matches("/a*b*c", "/axxbyyc/z"));
        assert!(!pattern_matches("/a*b*c$", "/axxbyyc/z"));
    }

    #[test]
    fn empty_and_unreachable() {
        assert!(Robots::parse("", UA).allowed_path("/anything"));
        assert!(Robots::allow_all().allowed_path("/x"));
        assert!(!Robots::disallow_all().allowed_path("/x"));
        assert!(Robots::disallow_all().allowed_path("/robots.txt"));
        // Rules before any user-agent line belong to no group.
        assert!(Robots::parse("Disallow: /\n", UA).allowed_path("/x"));
    }
}
