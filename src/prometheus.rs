//! The Prometheus text exposition format (`# HELP`, `# TYPE`, samples with escaped labels) and a
//! minimal HTTP endpoint that answers every request with one page. Shared by wal-receive's
//! `--metrics-addr` and `walvault metrics` (printed once, or served with `--listen`), so both
//! speak the same format. The endpoint is bounded: one page per connection, a timeout per scrape,
//! a bounded number of scrapes at once.

use std::fmt::{Display, Write as _};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on serving one scrape, so a stuck client cannot hold a task forever.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);
/// Scrapes served at once; more wait for a turn.
const MAX_SCRAPES: usize = 4;

/// The kind of a metric family.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Gauge,
    Counter,
}

/// A page being written.
#[derive(Default)]
pub(crate) struct Page(String);

impl Page {
    /// A family of one sample without labels.
    pub(crate) fn one(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        let none: [(&str, &str); 0] = [];
        self.family(name, kind, help, [(none, value)]);
    }

    /// A family: its help and type, then one sample per label set.
    pub(crate) fn family<'a, L: AsRef<[(&'a str, &'a str)]>, V: Display>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (labels, value) in samples {
            self.0.push_str(name);
            let labels = labels.as_ref();
            if !labels.is_empty() {
                self.0.push('{');
                for (i, (label, text)) in labels.iter().enumerate() {
                    if i > 0 {
                        self.0.push(',');
                    }
                    let _ = write!(self.0, "{label}=\"{}\"", escape(text));
                }
                self.0.push('}');
            }
            let _ = writeln!(self.0, " {value}");
        }
    }

    pub(crate) fn finish(self) -> String {
        self.0
    }
}

/// A label value as the format writes it: backslash, double quote and newline escaped.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves the page `render` makes on `addr` until the process ends; returns the bound address.
pub(crate) async fn serve<F, Fut>(addr: SocketAddr, render: F) -> std::io::Result<SocketAddr>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!("metrics on http://{bound}/metrics");
    let render = Arc::new(render);
    let turns = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let (render, turns) = (Arc::clone(&render), Arc::clone(&turns));
            tokio::spawn(async move {
                let answer = async {
                    let Ok(_turn) = turns.acquire().await else {
                        return Ok(());
                    };
                    // The request itself does not matter: every path gets the page.
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await?;
                    let body = render().await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    socket.write_all(head.as_bytes()).await?;
                    socket.write_all(body.as_bytes()).await?;
                    socket.shutdown().await
                };
                let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer).await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_labels_follow_the_format() {
        let mut page = Page::default();
        page.one("a_total", Kind::Counter, "A count.", 3);
        page.family(
            "b",
            Kind::Gauge,
            "B by type.",
            [(vec![("type", "fu\"ll\n")], 1.5), (vec![], 2.0)],
        );
        assert_eq!(
            page.finish(),
            "# HELP a_total A count.\n# TYPE a_total counter\na_total 3\n\
             # HELP b B by type.\n# TYPE b gauge\nb{type=\"fu\\\"ll\\n\"} 1.5\nb 2\n"
        );
    }
}
