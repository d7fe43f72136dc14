//! A fault-injecting HTTP proxy in front of the test S3 server (loopback
//! only): it logs every request, answers the ones a rule matches with the
//! rule's error, and forwards the rest, one request per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::common::services;

/// `times` requests with `method` whose target contains `path` get
/// `status` with an S3 error body of `code`; status 0 cuts the connection
/// instead, without an answer.
struct Rule {
    method: String,
    path: String,
    times: usize,
    status: u16,
    code: String,
    /// Sent as `Retry-After` with the error, when set.
    retry_after: Option<u32>,
    /// Sent as the whole body instead of an error document, when set.
    body: Option<String>,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    /// (method, target, status) of every request, in order.
    log: Vec<(String, String, u16)>,
    /// When each request of `log` arrived.
    times: Vec<Instant>,
}

pub struct FaultProxy {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FaultProxy {
    pub fn start() -> FaultProxy {
        let upstream = services()
            .s3_endpoint
            .trim_start_matches("http://")
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (state, upstream) = (shared.clone(), upstream.clone());
                std::thread::spawn(move || serve(client, &upstream, &state));
            }
        });
        FaultProxy { endpoint, state }
    }

    pub fn fail(&self, method: &str, path: &str, times: usize, status: u16, code: &str) {
        self.state.lock().unwrap().rules.push(Rule {
            method: method.into(),
            path: path.into(),
            times,
            status,
            code: code.into(),
            retry_after: None,
            body: None,
        });
    }

    /// Answers `times` matching requests with `status` and `body` (an S3
    /// call the server behind has not got, such as ListMultipartUploads).
    pub fn answer(&self, method: &str, path: &str, times: usize, status: u16, body: &str) {
        self.state.lock().unwrap().rules.push(Rule {
            method: method.into(),
            path: path.into(),
            times,
            status,
            code: String::new(),
            retry_after: None,
            body: Some(body.into()),
        });
    }

    /// B2 past its rate limit: 503 SlowDown with `Retry-After: secs`.
    pub fn slow_down(&self, method: &str, path: &str, times: usize, secs: u32) {
        self.state.lock().unwrap().rules.push(Rule {
            method: method.into(),
            path: path.into(),
            times,
            status: 503,
            code: "SlowDown".into(),
            retry_after: Some(secs),
            body: None,
        });
    }

    pub fn requests(&self) -> Vec<(String, String, u16)> {
        self.state.lock().unwrap().log.clone()
    }

    /// `requests()` with the time each arrived.
    pub fn timed_requests(&self) -> Vec<(Instant, (String, String, u16))> {
        let s = self.state.lock().unwrap();
        s.times.iter().copied().zip(s.log.iter().cloned()).collect()
    }

    pub fn clear_log(&self) {
        let mut s = self.state.lock().unwrap();
        s.log.clear();
        s.times.clear();
    }
}

fn serve(client: TcpStream, upstream: &str, state: &Mutex<State>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if !lower.starts_with("connection:") {
            head.push(line);
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut parts = head[0].split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let arrived = Instant::now();
    let fault = {
        let mut s = state.lock().unwrap();
        let hit = s
            .rules
            .iter_mut()
            .find(|r| r.times > 0 && r.method == method && target.contains(&r.path));
        hit.map(|r| {
            r.times -= 1;
            (r.status, r.code.clone(), r.retry_after, r.body.clone())
        })
    };
    let record = |method: String, target: String, status: u16| {
        let mut s = state.lock().unwrap();
        s.log.push((method, target, status));
        s.times.push(arrived);
    };
    let mut client = client;
    if let Some((0, ..)) = fault {
        record(method, target, 0);
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    }
    if let Some((status, code, retry_after, answer)) = fault {
        let xml = answer.unwrap_or_else(|| format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
        ));
        let body = if method == "HEAD" { "" } else { xml.as_str() };
        let wait = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
        let _ = write!(
            client,
            "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n{wait}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        record(method, target, status);
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let mut request = head.concat();
    request.push_str("Connection: close\r\n\r\n");
    if server.write_all(request.as_bytes()).is_err() || server.write_all(&body).is_err() {
        return;
    }
    let mut response = Vec::new();
    let _ = server.read_to_end(&mut response);
    let status = std::str::from_utf8(&response[..response.len().min(12)])
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    record(method, target, status);
    let _ = client.write_all(&response);
}
