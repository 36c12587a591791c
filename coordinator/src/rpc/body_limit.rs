//! Request bodies limited per method, before tonic buffers a message.
//!
//! tonic's `max_decoding_message_size` is one number for a whole service, and it must admit an
//! upload chunk (4 MiB and a header). Every other call carries a few hundred bytes, so without a
//! tighter bound an unauthenticated `JoinChallenge` could make the coordinator buffer megabytes
//! per stream before any check ran. [`BodyLimit`] wraps the service and cuts the body of every
//! call but `UploadUpdate` off at [`MAX_UNARY_REQUEST_BYTES`], answering RESOURCE_EXHAUSTED;
//! upload messages stay bounded by the service's message limit (one chunk plus header room).
//! The two secure-aggregation calls that carry a share bundle per neighbour (`SendShares`,
//! `AnswerUnmask`) get [`MAX_SECAGG_REQUEST_BYTES`] instead.

use std::pin::Pin;
use std::task::{Context, Poll};

use fedtune_shared::limits::MAX_SECAGG_REQUEST_BYTES;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::{http, Bytes, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Largest request body of any call but `UploadUpdate`, gRPC framing included. The largest
/// honest one, a `JoinRequest` with its key and proof or a report with its metrics, is well
/// under a kibibyte.
pub const MAX_UNARY_REQUEST_BYTES: usize = 16 << 10;

/// The one method whose body may be large (its messages are bounded by the service's limit).
pub(crate) const UPLOAD_PATH: &str = "/fedtune.v1.Coordinator/UploadUpdate";

/// The calls whose body may reach [`MAX_SECAGG_REQUEST_BYTES`]: their size grows with the
/// secure round's graph degree.
const SECAGG_PATHS: [&str; 2] =
    ["/fedtune.v1.Coordinator/SendShares", "/fedtune.v1.Coordinator/AnswerUnmask"];

/// The body limit of a call other than `UploadUpdate`.
fn limit_of(path: &str) -> usize {
    if SECAGG_PATHS.contains(&path) {
        MAX_SECAGG_REQUEST_BYTES
    } else {
        MAX_UNARY_REQUEST_BYTES
    }
}

/// Wraps a gRPC service so that request bodies are limited per method.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
}

impl<S> BodyLimit<S> {
    /// Limits the request bodies of `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for BodyLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for BodyLimit<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == UPLOAD_PATH {
            return self.inner.call(req);
        }
        let method = req.uri().path().to_string();
        let limit = limit_of(&method);
        self.inner.call(req.map(|body| Body::new(Limited { inner: body, left: limit, limit, method })))
    }
}

/// A body that fails with RESOURCE_EXHAUSTED once more than `left` bytes arrived; tonic answers
/// the call with that status (it finds a `Status` in a body error) and drops the rest.
struct Limited {
    inner: Body,
    left: usize,
    limit: usize,
    method: String,
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let len = frame.data_ref().map_or(0, Bytes::len);
        if len > this.left {
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "request body of {} exceeds its limit of {} bytes",
                this.method, this.limit
            )))));
        }
        this.left -= len;
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_bundles_and_unmask_answers_get_the_secagg_limit_and_every_other_call_16_kib() {
        assert_eq!(limit_of("/fedtune.v1.Coordinator/SendShares"), MAX_SECAGG_REQUEST_BYTES);
        assert_eq!(limit_of("/fedtune.v1.Coordinator/AnswerUnmask"), MAX_SECAGG_REQUEST_BYTES);
        assert_eq!(limit_of("/fedtune.v1.Coordinator/AdvertiseKeys"), MAX_UNARY_REQUEST_BYTES);
        assert_eq!(limit_of("/fedtune.v1.Coordinator/JoinChallenge"), MAX_UNARY_REQUEST_BYTES);
    }
}
