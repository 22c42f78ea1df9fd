//! A server layer that clips long `grpc-message` headers. An error status travels in an
//! HTTP/2 header, and an error that quotes a client's input (a name, an id) could grow
//! past what the client accepts in headers, so the client saw a protocol error instead
//! of the status (found by the hostile-input tests). Handlers check names against the
//! limits first; this is the backstop for whatever they quote.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Longest status message sent, in (percent-encoded) bytes.
pub const MAX_STATUS_MESSAGE: usize = 2048;

#[derive(Clone, Copy, Debug, Default)]
pub struct ClipStatusLayer;

impl<S> tower_layer::Layer<S> for ClipStatusLayer {
    type Service = ClipStatus<S>;
    fn layer(&self, inner: S) -> ClipStatus<S> {
        ClipStatus(inner)
    }
}

#[derive(Clone, Debug)]
pub struct ClipStatus<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for ClipStatus<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let f = self.0.call(req);
        Box::pin(async move {
            let mut resp = f.await?;
            clip(resp.headers_mut());
            Ok(resp)
        })
    }
}

/// Cuts `grpc-message` to [`MAX_STATUS_MESSAGE`] bytes, never inside a `%XX` escape.
pub fn clip(headers: &mut http::HeaderMap) {
    let Some(v) = headers.get("grpc-message") else {
        return;
    };
    let b = v.as_bytes();
    if b.len() <= MAX_STATUS_MESSAGE {
        return;
    }
    let mut cut = MAX_STATUS_MESSAGE;
    while cut > 0 && (b[cut - 1] == b'%' || (cut >= 2 && b[cut - 2] == b'%')) {
        cut -= 1;
    }
    let mut out = b[..cut].to_vec();
    out.extend_from_slice(b"%20...%20(clipped)");
    if let Ok(v) = http::HeaderValue::from_bytes(&out) {
        headers.insert("grpc-message", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_clipped_outside_escapes() {
        let mut h = http::HeaderMap::new();
        let long = "%C2%A1".repeat(1000);
        h.insert("grpc-message", long.parse().unwrap());
        clip(&mut h);
        let v = h.get("grpc-message").unwrap().to_str().unwrap();
        assert!(v.len() <= MAX_STATUS_MESSAGE + 20, "{}", v.len());
        assert!(v.ends_with("%20...%20(clipped)"));
        let body = v.trim_end_matches("%20...%20(clipped)");
        assert_eq!(body.len() % 3, 0, "cut inside an escape: {body}");
        let mut short = http::HeaderMap::new();
        short.insert("grpc-message", "fine".parse().unwrap());
        clip(&mut short);
        assert_eq!(short.get("grpc-message").unwrap(), "fine");
    }
}
