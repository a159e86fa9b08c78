//! libpq's password file (`~/.pgpass`, `PGPASSFILE`, `passfile=`), so a password need never be
//! on a command line or in the environment.
//!
//! Lines are `host:port:database:user:password`; `*` matches anything in the first four fields,
//! `\` escapes `:` and `\`, `#` starts a comment, the first match wins. As libpq does, a file
//! that is not a plain file or that its group or others may read is ignored with a warning.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// What a line must match.
pub(crate) struct Entry<'a> {
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) database: &'a str,
    pub(crate) user: &'a str,
}

/// The password of the first line matching `entry`, if the file exists, is private and has one.
pub(crate) fn lookup(path: &Path, entry: &Entry<'_>) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!(
            "password file {} is not a plain file; ignoring it",
            path.display()
        );
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; permissions should be u=rw (0600) or \
             less; ignoring it",
            path.display()
        );
        return None;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("cannot read password file {}: {e}", path.display());
            return None;
        }
    };
    find(&text, entry)
}

fn find(text: &str, entry: &Entry<'_>) -> Option<String> {
    let port = entry.port.to_string();
    let wanted = [entry.host, port.as_str(), entry.database, entry.user];
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|line| {
            let fields = split(line);
            // A line with fewer than five fields names no password.
            if fields.len() < 5 {
                return None;
            }
            let matches = wanted
                .iter()
                .zip(&fields)
                .all(|(want, (field, raw))| raw == "*" || field == want);
            // The password ends at the next unescaped colon, as in libpq.
            matches.then(|| fields[4].0.clone())
        })
}

/// The fields of a line, unescaped, each with its raw text (a raw `*` is the wildcard, an
/// escaped `\*` is not).
fn split(line: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let (mut field, mut raw) = (String::new(), String::new());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                raw.push(c);
                if let Some(escaped) = chars.next() {
                    field.push(escaped);
                    raw.push(escaped);
                }
            }
            ':' => fields.push((std::mem::take(&mut field), std::mem::take(&mut raw))),
            c => {
                field.push(c);
                raw.push(c);
            }
        }
    }
    fields.push((field, raw));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(host: &'a str, port: u16, database: &'a str, user: &'a str) -> Entry<'a> {
        Entry {
            host,
            port,
            database,
            user,
        }
    }

    #[test]
    fn first_matching_line_wins_with_wildcards() {
        let text = "# comment\n\
                    db1:5432:app:bob:first\n\
                    *:5432:*:bob:second\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            find(text, &entry("db1", 5432, "app", "bob")).as_deref(),
            Some("first")
        );
        assert_eq!(
            find(text, &entry("db2", 5432, "x", "bob")).as_deref(),
            Some("second")
        );
        assert_eq!(
            find(text, &entry("db2", 6000, "x", "bob")).as_deref(),
            Some("fallback")
        );
        assert_eq!(
            find("db1:5432:app:bob\n", &entry("db1", 5432, "app", "bob")),
            None
        );
    }

    #[test]
    fn escapes_protect_colons_backslashes_and_stars() {
        let text = "/run/my\\:pg:5432:replication:rep:pa\\:ss\\\\word\n\
                    \\*:5432:*:lit:star\n";
        assert_eq!(
            find(text, &entry("/run/my:pg", 5432, "replication", "rep")).as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(find(text, &entry("host", 5432, "d", "lit")), None);
        assert_eq!(
            find(text, &entry("*", 5432, "d", "lit")).as_deref(),
            Some("star")
        );
        // An unescaped colon ends the password, as in libpq.
        assert_eq!(
            find("h:1:d:u:a:b\r\n", &entry("h", 1, "d", "u")).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn a_file_others_can_read_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        let any = entry("h", 5432, "d", "u");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(lookup(&path, &any), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(lookup(&path, &any).as_deref(), Some("secret"));
        assert_eq!(lookup(dir.path(), &any), None);
        assert_eq!(lookup(&dir.path().join("absent"), &any), None);
    }
}
