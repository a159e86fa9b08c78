//! A download that survives a stalled or broken response body.
//!
//! The SDK retries a request until its answer's headers arrive; the body streams afterwards,
//! outside its retry. This reader bounds each read by `s3.timeout` and, when a read stalls, fails
//! or the body ends short of its announced length, asks again for the rest (`Range: bytes=N-`,
//! `If-Match` the first answer's ETag so the pieces are of one object), after a backoff, up to
//! `s3.max_attempts` times per object. The bytes handed out are exactly the object's, in order;
//! the codec above checks them as always.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::Client;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Sleep;

type Body = Pin<Box<dyn AsyncRead + Send>>;
type Reopen = Pin<Box<dyn Future<Output = Result<Body, String>> + Send>>;

/// Which object a download reads, and how hard it may try.
pub(super) struct Source {
    pub(super) client: Client,
    pub(super) bucket: String,
    pub(super) full_key: String,
    pub(super) etag: Option<String>,
    /// The object's length from the first answer, when it gave one.
    pub(super) length: Option<u64>,
    pub(super) read_timeout: Duration,
    pub(super) max_attempts: u32,
}

enum State {
    Reading(Body),
    Reopening(Reopen),
}

pub(super) struct ResumingBody {
    source: Source,
    state: State,
    /// When the current read gives up waiting; reset whenever bytes arrive.
    stall: Pin<Box<Sleep>>,
    /// Bytes handed out so far.
    pos: u64,
    /// Attempts used, the first request included.
    attempts: u32,
}

impl ResumingBody {
    pub(super) fn new(source: Source, body: Body) -> Self {
        ResumingBody {
            stall: Box::pin(tokio::time::sleep(source.read_timeout)),
            source,
            state: State::Reading(body),
            pos: 0,
            attempts: 1,
        }
    }

    fn rearm(&mut self) {
        let deadline = tokio::time::Instant::now() + self.source.read_timeout;
        self.stall.as_mut().reset(deadline);
    }

    /// Gives up on the current body: asks for the rest again, or fails when out of attempts.
    fn failed(&mut self, problem: String) -> io::Result<()> {
        if self.attempts >= self.source.max_attempts {
            return Err(io::Error::other(format!(
                "{problem} (s3://{}/{} at byte {}, after {} attempts)",
                self.source.bucket, self.source.full_key, self.pos, self.attempts
            )));
        }
        tracing::warn!(
            key = %self.source.full_key,
            "download broke off at byte {} ({problem}); asking for the rest",
            self.pos
        );
        // Exponential, capped like the SDK's own backoff (200 ms doubling up to 5 s).
        let backoff =
            Duration::from_millis(200u64 << self.attempts.min(5)).min(Duration::from_secs(5));
        self.attempts += 1;
        let request = self
            .source
            .client
            .get_object()
            .bucket(&self.source.bucket)
            .key(&self.source.full_key)
            .range(format!("bytes={}-", self.pos))
            .set_if_match(self.source.etag.clone());
        let from = format!("bytes {}-", self.pos);
        self.state = State::Reopening(Box::pin(async move {
            tokio::time::sleep(backoff).await;
            let out = request
                .send()
                .await
                .map_err(|e| DisplayErrorContext(&e).to_string())?;
            // A server that ignored the Range would send the object from its start again.
            if !out.content_range().is_some_and(|r| r.starts_with(&from)) {
                return Err(format!(
                    "asked for the rest ({from}...) but got {:?}",
                    out.content_range()
                ));
            }
            Ok(Box::pin(out.body.into_async_read()) as Body)
        }));
        Ok(())
    }
}

impl AsyncRead for ResumingBody {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Reopening(reopen) => match ready!(reopen.as_mut().poll(cx)) {
                    Ok(body) => {
                        this.state = State::Reading(body);
                        this.rearm();
                    }
                    Err(problem) => this.failed(problem)?,
                },
                State::Reading(body) => {
                    let before = buf.filled().len();
                    match body.as_mut().poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {
                            let n = (buf.filled().len() - before) as u64;
                            let short = this.source.length.is_some_and(|len| this.pos < len);
                            if n == 0 && short && buf.remaining() > 0 {
                                this.failed("the body ended early".into())?;
                                continue;
                            }
                            this.pos += n;
                            this.rearm();
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Err(e)) => {
                            buf.set_filled(before);
                            this.failed(format!("read failed: {e}"))?;
                        }
                        Poll::Pending => {
                            ready!(this.stall.as_mut().poll(cx));
                            let waited = this.source.read_timeout;
                            this.failed(format!("no data for {waited:?}"))?;
                        }
                    }
                }
            }
        }
    }
}
