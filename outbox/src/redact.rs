//! Secret redaction: database connection strings, text that may echo them, and the names of
//! Kafka (librdkafka) properties whose values are secrets.
//!
//! Every secret is replaced by [`REDACTED`] (`***`). The connection string forms covered:
//!
//! - URLs: the password of `postgres://user:password@host/db` (raw `@` and `:` in the password
//!   included; `/` and `?` must be percent-encoded there, as libpq requires), and the
//!   `password=` / `sslpassword=` query parameters;
//! - libpq keyword/value strings: `host=db password=secret`, `password = 'a b \' c'`.
//!
//! Used by the relay and the consumer runner alike for logs, errors and `Debug` output.

/// What a secret is replaced with.
pub const REDACTED: &str = "***";

/// The connection string `url` with its password(s) replaced by `***`: the URL's userinfo
/// password and every `password`-like parameter (`password=`, `sslpassword=`, quoted or not,
/// in a URL query or a keyword/value string), case-insensitively.
///
/// ```
/// use outbox::redact;
/// assert_eq!(redact::database_url("postgres://app:s3cr3t@db/app"), "postgres://app:***@db/app");
/// assert_eq!(redact::database_url("host=db password='s3 cr3t'"), "host=db password=***");
/// ```
#[must_use]
pub fn database_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return password_params(url);
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return password_params(url);
    };
    let creds = &authority[..at];
    let redacted = match creds.split_once(':') {
        Some((user, _)) => format!("{user}:{REDACTED}"),
        None => creds.to_owned(),
    };
    password_params(&format!(
        "{}{}{}",
        &url[..scheme_end + 3],
        redacted,
        &rest[at..]
    ))
}

/// `text` (an error message, a log line) with every password it visibly carries replaced by
/// `***`: the userinfo password of any URL in it and the value of any `password`-like parameter.
/// When the connection string is known, prefer [`text_with_url`], which also finds its
/// password where the text does not mark it as one.
#[must_use]
pub fn text(text: &str) -> String {
    password_params(&url_passwords(text))
}

/// `text` with the secrets of the connection string `url` removed wherever they occur (a driver
/// message may echo the URL, or the password alone), then redacted as by [`text`].
#[must_use]
pub fn text_with_url(text: &str, url: &str) -> String {
    let mut out = if url.is_empty() {
        text.to_owned()
    } else {
        text.replace(url, &database_url(url))
    };
    let mut secrets = secrets_of(url);
    // Longer first: a secret that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets
        .iter()
        .filter(|s| !s.is_empty() && s.as_str() != REDACTED)
    {
        out = out.replace(s.as_str(), REDACTED);
    }
    self::text(&out)
}

/// Whether the librdkafka property `key` holds a secret (its value is shown as `***`):
/// anything naming a password, secret or passphrase (`sasl.password`, `ssl.key.password`,
/// `ssl.keystore.password`, `sasl.oauthbearer.client.secret`, ...), private keys
/// (`ssl.key.pem`, `ssl_key`, `*private.key*`) and `sasl.oauthbearer.config`. Case-insensitive.
#[must_use]
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("passphrase")
        || k.contains("private.key")
        || k == "ssl.key.pem"
        || k == "ssl_key"
        || k == "sasl.oauthbearer.config"
}

/// The byte ranges of the values of every `password`-like parameter in `s` (`password=x`,
/// `sslpassword=x`, `password = 'x y'`, `&password=x`), case-insensitively; a quoted value's
/// range includes its quotes.
fn password_values(s: &str) -> Vec<std::ops::Range<usize>> {
    let lower = s.to_ascii_lowercase();
    let mut values = Vec::new();
    let mut pos = 0;
    while let Some(found) = lower[pos..].find("password") {
        let key_end = pos + found + "password".len();
        let after = &s[key_end..];
        let ws = after.len() - after.trim_start().len();
        if !after[ws..].starts_with('=') {
            pos = key_end;
            continue;
        }
        let value_start = key_end + ws + 1;
        let v = &s[value_start..];
        let lead = v.len() - v.trim_start().len();
        let v = &v[lead..];
        let value_len = if let Some(quoted) = v.strip_prefix('\'') {
            // libpq quoting: backslash escapes, a closing single quote ends the value
            let mut end = quoted.len();
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = i + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end
        } else {
            v.find(['&', ' ', '\t', '\n']).unwrap_or(v.len())
        };
        let start = value_start + lead;
        values.push(start..start + value_len);
        pos = start + value_len;
    }
    values
}

/// `s` with the value of every `password`-like parameter replaced by `***`.
fn password_params(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    for range in password_values(s) {
        out.push_str(&s[pos..range.start]);
        out.push_str(REDACTED);
        pos = range.end;
    }
    out.push_str(&s[pos..]);
    out
}

/// `s` with the userinfo password of every `scheme://user:password@host` in it replaced by
/// `***` (the authority ends at `/`, `?`, `#`, white space or a quote).
fn url_passwords(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    while let Some(found) = s[pos..].find("://") {
        let rest_start = pos + found + 3;
        let rest = &s[rest_start..];
        let end = rest
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '`' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        if let Some(at) = authority.rfind('@') {
            if let Some(colon) = authority[..at].find(':') {
                out.push_str(&s[pos..rest_start + colon + 1]);
                out.push_str(REDACTED);
                pos = rest_start + at;
                continue;
            }
        }
        out.push_str(&s[pos..rest_start]);
        pos = rest_start;
    }
    out.push_str(&s[pos..]);
    out
}

/// Every secret of the connection string `url`, in each form a message may show it: as
/// written, percent-decoded (URLs), unquoted and unescaped (keyword/value strings).
fn secrets_of(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let mut add = |s: &str| {
        if !s.is_empty() {
            secrets.push(s.to_owned());
            if let Some(decoded) = percent_decoded(s) {
                secrets.push(decoded);
            }
        }
    };
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@') {
            if let Some((_, pw)) = authority[..at].split_once(':') {
                add(pw);
            }
        }
    }
    for range in password_values(url) {
        let value = &url[range];
        match value.strip_prefix('\'') {
            Some(quoted) => {
                let inner = quoted.strip_suffix('\'').unwrap_or(quoted);
                add(inner);
                add(&unescaped(inner));
            }
            None => add(value),
        }
    }
    secrets
}

/// libpq's backslash escapes removed.
fn unescaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if c == '\\' && !escaped {
            escaped = true;
        } else {
            out.push(c);
            escaped = false;
        }
    }
    out
}

/// `s` percent-decoded, when it has escapes and decodes to UTF-8.
fn percent_decoded(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|&b| char::from(b).to_digit(16))
                .and_then(|d| u8::try_from(d).ok())
        };
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().filter(|d| d != s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_string_form_is_redacted() {
        for (url, expected) in [
            // URL with a password
            (
                "postgres://relay:s3cr3t@db:5432/app",
                "postgres://relay:***@db:5432/app",
            ),
            ("postgresql://relay:s3cr3t@db", "postgresql://relay:***@db"),
            // passwords with @ : / % (raw @ and :, percent-encoded / and %)
            ("postgres://u:p@ss@h/d", "postgres://u:***@h/d"),
            ("postgres://u:p:a:ss@h/d", "postgres://u:***@h/d"),
            ("postgres://u:p%40ss@h/d", "postgres://u:***@h/d"),
            ("postgres://u:a%2Fb%3Ac%25d@h/d", "postgres://u:***@h/d"),
            // URL without a password
            ("postgres://relay@db/app", "postgres://relay@db/app"),
            ("postgres://db:5432/app", "postgres://db:5432/app"),
            // query-parameter passwords
            (
                "postgres://db/app?user=x&password=s3cr3t&sslmode=require",
                "postgres://db/app?user=x&password=***&sslmode=require",
            ),
            (
                "postgres://u@db/app?sslpassword=keypw&sslmode=verify-full",
                "postgres://u@db/app?sslpassword=***&sslmode=verify-full",
            ),
            // keyword/value strings
            (
                "host=db user=relay password=s3cr3t dbname=app",
                "host=db user=relay password=*** dbname=app",
            ),
            ("host=db PASSWORD=s3cr3t", "host=db PASSWORD=***"),
            // quoted keyword values
            (
                "host=db password = 's3 cr\\'3t' dbname=app",
                "host=db password = *** dbname=app",
            ),
            ("password='a b'", "password=***"),
            // several secrets
            (
                "postgres://u:one@h/d?sslpassword=two&password=three",
                "postgres://u:***@h/d?sslpassword=***&password=***",
            ),
            (
                "host=db password=one sslpassword='two x' dbname=app",
                "host=db password=*** sslpassword=*** dbname=app",
            ),
            // nothing secret
            ("host=db dbname=app", "host=db dbname=app"),
            ("", ""),
        ] {
            assert_eq!(database_url(url), expected, "{url}");
        }
    }

    #[test]
    fn text_embedding_a_url_or_a_dsn_loses_its_secrets() {
        let url = "postgres://relay:s3cr3t@db/app";
        let msg = format!("could not connect to {url}: password s3cr3t rejected");
        let r = text_with_url(&msg, url);
        assert!(!r.contains("s3cr3t"), "{r}");
        assert!(r.contains("postgres://relay:***@db/app"), "{r}");

        let url = "postgres://u:p%40ss@h/d";
        let r = text_with_url("bad password p@ss for postgres://u:p%40ss@h/d", url);
        assert!(!r.contains("p@ss") && !r.contains("p%40ss"), "{r}");

        let dsn = "host=db user=relay password=s3cr3t";
        let r = text_with_url(&format!("connect {dsn}: password s3cr3t rejected"), dsn);
        assert!(!r.contains("s3cr3t"), "{r}");

        let dsn = "host=db password='a b\\'c' dbname=x";
        let r = text_with_url("password a b'c rejected; a b\\'c", dsn);
        assert!(!r.contains("a b'c") && !r.contains("a b\\'c"), "{r}");

        // Unknown connection strings in free text.
        for (t, secret) in [
            (
                "error: cannot reach postgres://app:hunter2@db:5432/app (timeout)",
                "hunter2",
            ),
            (
                "conninfo \"host=db password=hunter2 dbname=app\" invalid",
                "hunter2",
            ),
            ("urls a://x:one@h and b://y:two@h", "one"),
            ("urls a://x:one@h and b://y:two@h", "two"),
        ] {
            let r = text(t);
            assert!(!r.contains(secret), "{t} -> {r}");
        }
        assert_eq!(
            text("password authentication failed for user \"relay\""),
            "password authentication failed for user \"relay\""
        );
        assert_eq!(
            text("see https://example.com/x"),
            "see https://example.com/x"
        );
        assert_eq!(text_with_url("no secret here", ""), "no secret here");
    }

    #[test]
    fn secret_kafka_properties_are_recognised() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "ssl_key",
            "SSL.KEY.PASSWORD",
            "sasl.oauthbearer.config",
            "ssl.private.key",
            "some.passphrase",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "sasl.username",
            "bootstrap.servers",
            "ssl.ca.location",
            "ssl.certificate.pem",
            "acks",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }
}
