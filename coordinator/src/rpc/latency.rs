//! Every call's latency by method and gRPC status, for `fedtune_rpc_duration_seconds`.
//!
//! A call's status is known only when its answer ends: in the headers of a trailers-only answer
//! (an early refusal), else in the trailers after the body (a unary answer, or a stream). So
//! [`RpcLatency`] wraps the response body and records once, when the trailers pass, the body
//! ends, or the body is dropped unfinished (the client went away: `cancelled`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Code;

use crate::telemetry;

/// Wraps a gRPC service to record each call's latency and status.
#[derive(Debug, Clone)]
pub struct RpcLatency<S> {
    inner: S,
}

impl<S> RpcLatency<S> {
    /// Measures the calls of `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for RpcLatency<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for RpcLatency<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        // `/fedtune.v1.Coordinator/UploadUpdate` → `UploadUpdate`: a closed set of names
        // (unknown paths are answered UNIMPLEMENTED by tonic and labelled `other`).
        let method = method_label(req.uri().path());
        let call = self.inner.call(req);
        Box::pin(async move {
            let answer = call.await?;
            let (parts, body) = answer.into_parts();
            let early = status_of(&parts.headers);
            let timed = Timed { inner: body, method, started, code: early, recorded: false };
            Ok(http::Response::from_parts(parts, Body::new(timed)))
        })
    }
}

/// The method's name if it is one of the service's, else `other` (label values stay bounded
/// whatever paths a caller sends).
fn method_label(path: &str) -> &'static str {
    use fedtune_shared::pb::coordinator_server::SERVICE_NAME;
    let Some(name) =
        path.strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE_NAME)).and_then(|p| p.strip_prefix('/'))
    else {
        return "other";
    };
    METHODS.iter().find(|m| **m == name).copied().unwrap_or("other")
}

/// The methods of `fedtune.v1.Coordinator`.
const METHODS: [&str; 16] = [
    "Join",
    "WaitForTask",
    "Heartbeat",
    "DownloadModel",
    "UploadUpdate",
    "ReportEvaluation",
    "ReportFailure",
    "Leave",
    "GetStatus",
    "JoinChallenge",
    "Enroll",
    "AdvertiseKeys",
    "SendShares",
    "AwaitSecAggStep",
    "AnswerUnmask",
    "ReserveUpload",
];

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(value))
}

/// A response body that records its call when it ends.
struct Timed {
    inner: Body,
    method: &'static str,
    started: Instant,
    /// The status, once seen (headers of a trailers-only answer, or the trailers).
    code: Option<Code>,
    recorded: bool,
}

impl Timed {
    fn record(&mut self, code: Code) {
        if !self.recorded {
            self.recorded = true;
            telemetry::rpc_ended(self.method, code, self.started.elapsed());
        }
    }
}

impl HttpBody for Timed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    this.code = Some(code);
                    this.record(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                let code = status.code();
                this.record(code);
            }
            Poll::Ready(None) => {
                let code = this.code.unwrap_or(Code::Ok);
                this.record(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        // An answer whose status was in its headers may never be polled to its end.
        let code = self.code.unwrap_or(Code::Cancelled);
        self.record(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_the_services_methods_or_other() {
        assert_eq!(method_label("/fedtune.v1.Coordinator/UploadUpdate"), "UploadUpdate");
        assert_eq!(method_label("/fedtune.v1.Coordinator/Nope"), "other");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "other");
    }
}
