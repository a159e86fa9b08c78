//! PostgreSQL's two configuration file syntaxes, read as PostgreSQL reads them:
//! `postgresql.conf`'s `name = value` directives, and the records of tokens of `pg_hba.conf` and
//! `pg_ident.conf` (blanks and commas, double quotes, `@file` lists, include records). Which
//! other files a file names, and how a value is quoted. Text only, no I/O. Used by
//! backup/external_config.

/// The two syntaxes of PostgreSQL's configuration files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Syntax {
    /// `postgresql.conf`: `name = value`.
    Conf,
    /// `pg_hba.conf` and `pg_ident.conf`: records of tokens.
    Auth,
}

impl Syntax {
    /// The other files `text` names, in order.
    pub(super) fn references(self, text: &str) -> Vec<(Reference, String)> {
        match self {
            Syntax::Conf => directives(text)
                .into_iter()
                .filter_map(|d| {
                    let kind = match d.name.as_str() {
                        "include" => Reference::Include,
                        "include_if_exists" => Reference::IncludeIfExists,
                        "include_dir" => Reference::IncludeDir,
                        _ => return None,
                    };
                    Some((kind, d.value))
                })
                .collect(),
            Syntax::Auth => text
                .lines()
                .flat_map(auth_references)
                .map(|(kind, t)| (kind, t.text))
                .collect(),
        }
    }
}

/// How a configuration file names another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reference {
    Include,
    IncludeIfExists,
    IncludeDir,
    /// `@file` (pg_hba.conf syntax only): a list of names read from a file, in a record.
    File,
}

/// One token of a `pg_hba.conf`-syntax line: its text without quotes, whether it began with a
/// quote (then `@` is literal), and where it lies in the line.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct AuthToken {
    pub(super) text: String,
    pub(super) quoted: bool,
    pub(super) span: std::ops::Range<usize>,
}

/// The tokens of a line as PostgreSQL's `next_token` cuts them: separated by blanks or commas
/// outside double quotes (`""` inside quotes is a literal quote), up to a `#` outside quotes.
fn auth_tokens(line: &str) -> Vec<AuthToken> {
    let mut tokens = Vec::new();
    let mut chars = line.char_indices().peekable();
    loop {
        while chars
            .next_if(|(_, c)| c.is_whitespace() || *c == ',')
            .is_some()
        {}
        let Some(&(start, first)) = chars.peek() else {
            break;
        };
        if first == '#' {
            break;
        }
        let (mut text, mut in_quote, mut end) = (String::new(), false, start);
        while let Some(&(at, c)) = chars.peek() {
            // A quote left open ends with the line, as in PostgreSQL.
            if matches!(c, '\n' | '\r') || !in_quote && (c.is_whitespace() || c == ',' || c == '#')
            {
                break;
            }
            chars.next();
            end = at + c.len_utf8();
            if c != '"' {
                text.push(c);
            } else if in_quote && chars.peek().is_some_and(|(_, n)| *n == '"') {
                chars.next();
                end += 1;
                text.push('"');
            } else {
                in_quote = !in_quote;
            }
        }
        tokens.push(AuthToken {
            text,
            quoted: first == '"',
            span: start..end,
        });
    }
    tokens
}

/// The other files a `pg_hba.conf`-syntax line names: the file of an include directive (a
/// line of exactly two tokens, the first unquoted), or each unquoted `@file` token's file.
pub(super) fn auth_references(line: &str) -> Vec<(Reference, AuthToken)> {
    let mut tokens = auth_tokens(line);
    let directive = match tokens.first() {
        Some(t) if !t.quoted && tokens.len() == 2 => match t.text.as_str() {
            "include" => Some(Reference::Include),
            "include_if_exists" => Some(Reference::IncludeIfExists),
            "include_dir" => Some(Reference::IncludeDir),
            _ => None,
        },
        _ => None,
    };
    if let Some(kind) = directive {
        return tokens
            .pop()
            .map(|named| (kind, named))
            .into_iter()
            .collect();
    }
    tokens
        .into_iter()
        .filter(|t| !t.quoted && t.text.len() > 1 && t.text.starts_with('@'))
        .map(|mut t| {
            t.text.remove(0);
            t.span.start += 1;
            (Reference::File, t)
        })
        .collect()
}

/// One `name = value` line of a configuration file.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Directive {
    pub(super) name: String,
    pub(super) value: String,
}

/// The settings of a configuration file, in PostgreSQL's syntax: `name [=] value` per line,
/// `#` comments, values quoted with `'` (`''` and backslash escapes) or bare words.
pub(super) fn directives(text: &str) -> Vec<Directive> {
    text.lines().filter_map(directive).collect()
}

pub(super) fn directive(line: &str) -> Option<Directive> {
    let line = line.trim_start();
    let name_len = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(line.len());
    if name_len == 0 {
        return None;
    }
    let name = line[..name_len].to_ascii_lowercase();
    let rest = line[name_len..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    let value = if let Some(quoted) = rest.strip_prefix('\'') {
        let mut value = String::new();
        let mut chars = quoted.chars().peekable();
        loop {
            match chars.next()? {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    value.push('\'');
                }
                '\'' => break,
                '\\' => value.push(chars.next()?),
                c => value.push(c),
            }
        }
        value
    } else {
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '#')
            .unwrap_or(rest.len());
        rest[..end].to_owned()
    };
    Some(Directive { name, value })
}

/// A value quoted for a configuration file.
pub(super) fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_follow_postgresql_syntax() {
        let text = "# comment\n\
                    include_dir = 'conf.d'\t# Debian\n\
                    include 'it''s.conf'\n\
                    INCLUDE_IF_EXISTS=extra.conf\n\
                    port = 5433\n\
                    hba_file = '/etc/a\\\\b.conf'\n\
                    broken = 'unterminated\n";
        let got = directives(text);
        let pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|d| (d.name.as_str(), d.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("include_dir", "conf.d"),
                ("include", "it's.conf"),
                ("include_if_exists", "extra.conf"),
                ("port", "5433"),
                ("hba_file", "/etc/a\\b.conf"),
            ]
        );
        assert_eq!(quoted("/a'b\\c"), "'/a''b\\\\c'");
    }

    #[test]
    fn auth_references_follow_pg_hba_syntax() {
        let refs = |line: &str| -> Vec<(Reference, String)> {
            auth_references(line)
                .into_iter()
                .map(|(k, t)| {
                    let shown = if k == Reference::File {
                        &line[t.span.start - 1..t.span.end]
                    } else {
                        &line[t.span.clone()]
                    };
                    assert!(shown.contains(t.text.trim_start_matches('/')), "{line}");
                    (k, t.text)
                })
                .collect()
        };
        let r = |k, t: &str| (k, t.to_owned());
        assert_eq!(
            refs("include \"/etc/pg/hba d/x.conf\"  # note\n"),
            [r(Reference::Include, "/etc/pg/hba d/x.conf")]
        );
        assert_eq!(
            refs("include_if_exists  rel.conf"),
            [r(Reference::IncludeIfExists, "rel.conf")]
        );
        assert_eq!(
            refs("include_dir /etc/pg/hba.d"),
            [r(Reference::IncludeDir, "/etc/pg/hba.d")]
        );
        assert_eq!(
            refs("local all @admins,@/etc/pg/more,bob trust # @not_this"),
            [
                r(Reference::File, "admins"),
                r(Reference::File, "/etc/pg/more")
            ]
        );
        assert_eq!(refs("host \"@literal\" all 127.0.0.1/32 md5"), []);
        assert_eq!(
            refs("host \"a\"\"b\" @\"x\" all md5"),
            [r(Reference::File, "x")]
        );
        // Not directives: a quoted keyword, a third token; then only `@` tokens count.
        assert_eq!(refs("\"include\" x.conf"), []);
        assert_eq!(refs("include a.conf b.conf"), []);
        assert_eq!(refs("local all @ trust"), []);
        assert_eq!(refs("include \"/open\n"), [r(Reference::Include, "/open")]);
    }
}
