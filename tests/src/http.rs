//! A minimal HTTP/1.0 client over a loopback socket, for the coordinator's operator port and
//! Prometheus's API: one request per connection, the answer read to its close (HTTP/1.0 has no
//! chunked bodies), every step bounded in time.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest one request may take, connect to close.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Header lines as (lower-case name, value).
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// `GET http://{addr}{path}` with extra `headers` (`Name: value` lines).
pub async fn get(addr: &str, path: &str, headers: &[&str]) -> Result<Answer> {
    request(addr, "GET", path, headers, None).await
}

/// `POST` of a form body (`application/x-www-form-urlencoded`).
pub async fn post_form(addr: &str, path: &str, form: &str) -> Result<Answer> {
    let headers = ["Content-Type: application/x-www-form-urlencoded"];
    request(addr, "POST", path, &headers, Some(form)).await
}

async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> Result<Answer> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("{method} http://{addr}{path} took over {REQUEST_TIMEOUT:?}"))??;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers in the answer")?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let Some(status) = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()) else {
        bail!("not an HTTP status line: {status_line:?}");
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer { status, headers, body: body.to_string() })
}
