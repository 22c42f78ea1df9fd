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

/// Cuts `grpc-message` to [`MAX_STATUS_MESSAGE`] bytes, never inside a `%XX` escape
/// nor inside a character (a cut between the escapes of one UTF-8 sequence left the
/// client unable to read the status: found by the hostile-input tests).
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
    let cut = char_boundary(&b[..cut]);
    let mut out = b[..cut].to_vec();
    out.extend_from_slice(b"%20...%20(clipped)");
    if let Ok(v) = http::HeaderValue::from_bytes(&out) {
        headers.insert("grpc-message", v);
    }
}

/// The longest prefix of the percent-encoded `b` (cut outside escapes) whose decoded
/// bytes end on a UTF-8 character boundary.
fn char_boundary(b: &[u8]) -> usize {
    // (decoded byte, where its encoding ends in `b`)
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 3 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push((byte, i + 3));
                i += 3;
            }
            None => {
                decoded.push((b[i], i + 1));
                i += 1;
            }
        }
    }
    let bytes: Vec<u8> = decoded.iter().map(|d| d.0).collect();
    let valid = match std::str::from_utf8(&bytes) {
        Ok(_) => bytes.len(),
        Err(e) => e.valid_up_to(),
    };
    if valid == 0 {
        0
    } else {
        decoded[valid - 1].1
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
        // Cut at every offset: what the client decodes is whole characters.
        for pad in 0..6 {
            let mut h = http::HeaderMap::new();
            let long = format!("{}{}", "a".repeat(pad), "%C2%A1%E2%82%AC".repeat(400));
            h.insert("grpc-message", long.parse().unwrap());
            clip(&mut h);
            let v = h.get("grpc-message").unwrap().to_str().unwrap();
            let body = v.trim_end_matches("%20...%20(clipped)");
            let bytes: Vec<u8> = percent_decode(body);
            assert!(std::str::from_utf8(&bytes).is_ok(), "pad {pad}: {body}");
            assert!(
                body.len() + 9 > MAX_STATUS_MESSAGE,
                "pad {pad}: cut too short"
            );
        }
        let mut short = http::HeaderMap::new();
        short.insert("grpc-message", "fine".parse().unwrap());
        clip(&mut short);
        assert_eq!(short.get("grpc-message").unwrap(), "fine");
    }

    fn percent_decode(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }
}
