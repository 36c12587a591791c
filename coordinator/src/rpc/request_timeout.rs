//! A bound on how long any call but an upload may take to be answered.
//!
//! tonic's `Server::timeout` bounds every call alike, and an `UploadUpdate` handler runs until
//! the whole stream is in: a bound that admits a slow site's upload would be no bound for the
//! rest. So [`RequestTimeout`] applies `server.request_timeout` to every call but
//! `UploadUpdate`, whose own bounds are the round's deadline, the round closing, and
//! `server.upload_idle_timeout` between messages. The bound covers the handler until its answer
//! (headers) is ready: a download's body then streams under `server.download_send_timeout`
//! per chunk, and `WaitForTask` answers within `server.long_poll`, which validation keeps below
//! the request timeout.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Status;

use super::body_limit::UPLOAD_PATH;

/// Wraps a gRPC service so that every call but `UploadUpdate` is answered within a bound.
#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> RequestTimeout<S> {
    /// Bounds the calls of `inner` by `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

impl<S: NamedService> NamedService for RequestTimeout<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for RequestTimeout<S>
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
        let unbounded = req.uri().path() == UPLOAD_PATH;
        let method = req.uri().path().to_string();
        let call = self.inner.call(req);
        if unbounded {
            return Box::pin(call);
        }
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(answer) => answer,
                // Dropping the handler's future cancels it; its guards free what it held.
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "{method} was not answered within {timeout:?} (server.request_timeout)"
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// A service whose calls take `delay` to answer OK.
    #[derive(Clone)]
    struct Slow(Duration);

    impl Service<http::Request<()>> for Slow {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let d = self.0;
            Box::pin(async move {
                tokio::time::sleep(d).await;
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn grpc_status(r: &http::Response<Body>) -> Option<&str> {
        r.headers().get("grpc-status").map(|v| v.to_str().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_slower_than_the_bound_is_answered_deadline_exceeded_naming_the_key() {
        let mut svc = RequestTimeout::new(Slow(Duration::from_secs(60)), Duration::from_secs(30));
        let answer = svc.call(request("/fedtune.v1.Coordinator/GetStatus")).await.unwrap();
        assert_eq!(grpc_status(&answer), Some("4"), "DEADLINE_EXCEEDED");
        let message = answer.headers().get("grpc-message").unwrap().to_str().unwrap();
        assert!(message.contains("server.request_timeout"), "{message}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_the_bound_and_an_upload_beyond_it_are_both_answered_by_the_service() {
        let mut svc = RequestTimeout::new(Slow(Duration::from_secs(20)), Duration::from_secs(30));
        let answer = svc.call(request("/fedtune.v1.Coordinator/WaitForTask")).await.unwrap();
        assert_eq!(grpc_status(&answer), None);
        let mut svc = RequestTimeout::new(Slow(Duration::from_secs(600)), Duration::from_secs(30));
        let answer = svc.call(request(UPLOAD_PATH)).await.unwrap();
        assert_eq!(grpc_status(&answer), None, "uploads have their own bounds");
    }
}
