//! A passive HTTP/1.1 observer for the local inspector: it watches copies of the bytes a
//! tunnel splices between the gateway's stream and the app, and turns them into
//! request/response exchanges. It never touches or delays the data path; when it cannot
//! follow a connection (bytes it cannot parse, a protocol switch) it goes quiet for the
//! rest of that connection instead of guessing.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

/// A head still open after this many bytes is not one we will follow; it also bounds
/// what one connection's parser holds.
const HEAD_LIMIT: usize = 64 * 1024;
/// The header slots handed to httparse; more headers than this and we give up.
const MAX_HEADERS: usize = 100;
/// Requests in flight on one connection; a client pipelining further is not worth the memory.
const MAX_PENDING: usize = 8;
/// Sixteen hex digits already fill a u64.
const MAX_HEX_DIGITS: u8 = 16;
/// Trailers are skipped, but not without end.
const TRAILER_LIMIT: usize = 64 * 1024;

const BEFORE_RESPONSE: &str = "the connection closed before the response";
const MID_RESPONSE: &str = "the connection closed mid-response";
const UNPARSEABLE: &str = "the inspector could not parse the rest of this connection";
const SWITCHED: &str = "the connection switched protocols before the response";

/// A captured message body: the first `cap` bytes of the payload (chunked framing removed), and its full size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    pub bytes: Vec<u8>,
    pub size: u64,
    pub truncated: bool,
}

impl Body {
    /// Counts `chunk` and keeps what of it fits within `cap`.
    pub fn keep(&mut self, chunk: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.bytes.len()).min(chunk.len());
        self.bytes
            .extend_from_slice(chunk.get(..room).unwrap_or_default());
        self.size = self.size.saturating_add(chunk.len() as u64);
        self.truncated = self.size > cap as u64;
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// Wall-clock time the request head was complete.
    pub started: SystemTime,
    pub method: String,
    /// The request target as sent (origin form, e.g. "/a?b=1").
    pub target: String,
    /// Names as sent (case kept), in order.
    pub request_headers: Vec<(String, Vec<u8>)>,
    pub request_body: Body,
    /// None when no (final) response head was seen.
    pub status: Option<u16>,
    pub response_headers: Vec<(String, Vec<u8>)>,
    pub response_body: Body,
    /// From the request head's completion to the end of the response (or to when the exchange ended).
    pub duration: Duration,
    /// Why the exchange ended without a complete response, e.g. "the connection closed before the response".
    pub error: Option<String>,
    /// The app switched protocols (101) or accepted a CONNECT: the rest of the connection is not HTTP.
    pub upgraded: bool,
}

impl Exchange {
    /// A request whose head is complete now, with nothing else seen yet.
    pub fn new(method: String, target: String, request_headers: Vec<(String, Vec<u8>)>) -> Self {
        Self {
            started: SystemTime::now(),
            method,
            target,
            request_headers,
            request_body: Body::default(),
            status: None,
            response_headers: Vec::new(),
            response_body: Body::default(),
            duration: Duration::ZERO,
            error: None,
            upgraded: false,
        }
    }
}

/// One connection's two directions.
pub struct Conversation {
    cap: usize,
    mode: Mode,
    next_seq: u64,
    /// Requests whose head is complete and whose response has not ended, oldest first:
    /// responses answer them in this order.
    pending: VecDeque<Pending>,
    client: Client,
    app: App,
    /// A request head split across reads; while waiting on a possible upgrade, the
    /// client's bytes held back.
    client_buf: Vec<u8>,
    /// A response head split across reads.
    app_buf: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Live,
    /// Gave up or upgraded: nothing more is parsed or reported.
    Off,
    Closed,
}

struct Pending {
    seq: u64,
    since: Instant,
    exchange: Exchange,
    /// A response to HEAD has no body whatever its headers say.
    head_only: bool,
    /// A 2xx to CONNECT turns the connection into a tunnel.
    connect: bool,
    /// Its final response head has been seen, so an upgrade is no longer possible.
    answered: bool,
}

impl Pending {
    fn finish(mut self, now: Instant, error: Option<&str>) -> Exchange {
        self.exchange.duration = now.saturating_duration_since(self.since);
        self.exchange.error = error.map(str::to_owned);
        self.exchange
    }
}

enum Client {
    Head,
    Body {
        seq: u64,
        payload: Payload,
        then_wait: bool,
    },
    /// After a request that may switch protocols (Upgrade, CONNECT), the client's next
    /// bytes may not be HTTP: hold them until the response says which. `lost` when they
    /// outgrew the hold, so they cannot be followed if the connection stays HTTP.
    Waiting {
        seq: u64,
        lost: bool,
    },
}

enum App {
    Head,
    Body(Payload),
}

/// How a message body is delimited (RFC 9112 section 6.3).
enum Payload {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// Where a chunked body's reader stands; every state survives a read ending anywhere.
#[derive(Clone, Copy)]
enum Chunked {
    Size {
        size: u64,
        digits: u8,
    },
    Ext {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// `fresh` at the start of a trailer line: an empty line ends the body.
    Trailer {
        fresh: bool,
        seen: usize,
    },
    TrailerLf {
        fresh: bool,
        seen: usize,
    },
}

/// The bytes cannot be followed as HTTP/1.1.
struct Confused;

type Headers = Vec<(String, Vec<u8>)>;

/// A head parser's answer: nothing yet, or the head's length and the head.
type Parsed<H> = Result<Option<(usize, H)>, Confused>;

struct RequestHead {
    method: String,
    target: String,
    headers: Headers,
}

struct ResponseHead {
    status: u16,
    headers: Headers,
}

impl Conversation {
    /// `cap`: body bytes kept per message.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            mode: Mode::Live,
            next_seq: 0,
            pending: VecDeque::new(),
            client: Client::Head,
            app: App::Head,
            client_buf: Vec::new(),
            app_buf: Vec::new(),
        }
    }

    /// Bytes the client sent toward the app. Exchanges finished by these bytes are pushed to `done`.
    pub fn from_client(&mut self, data: &[u8], now: Instant, done: &mut Vec<Exchange>) {
        if self.mode == Mode::Live {
            self.client_bytes(data, now, done);
        }
    }

    /// Bytes the app sent toward the client.
    pub fn from_app(&mut self, data: &[u8], now: Instant, done: &mut Vec<Exchange>) {
        if self.mode == Mode::Live {
            self.app_bytes(data, now, done);
        }
    }

    /// The connection ended (either side): a close-delimited response body ends here (complete, no error);
    /// any other exchange still pending is pushed with `error` set (and whatever was captured). Idempotent.
    pub fn close(&mut self, now: Instant, done: &mut Vec<Exchange>) {
        if self.mode != Mode::Live {
            return;
        }
        let app = std::mem::replace(&mut self.app, App::Head);
        for (i, p) in self.pending.drain(..).enumerate() {
            let error = match (&app, i) {
                (App::Body(Payload::UntilClose), 0) => None,
                (App::Body(_), 0) => Some(MID_RESPONSE),
                _ => Some(BEFORE_RESPONSE),
            };
            done.push(p.finish(now, error));
        }
        self.release(Mode::Closed);
    }

    /// The parser gave up (bytes it could not parse, a head over the limit) or the connection was upgraded:
    /// the caller may stop feeding it.
    pub fn is_off(&self) -> bool {
        self.mode == Mode::Off
    }

    fn client_bytes(&mut self, data: &[u8], now: Instant, done: &mut Vec<Exchange>) {
        let mut rest = data;
        while !rest.is_empty() && self.mode == Mode::Live {
            let used = match &mut self.client {
                Client::Head => {
                    // RFC 9112 section 2.2: empty lines before a request line are ignored.
                    // Dropping them here also keeps the accumulator from starting with them.
                    if self.client_buf.is_empty() {
                        let blank = leading_newlines(rest);
                        if blank > 0 {
                            rest = rest.get(blank..).unwrap_or_default();
                            continue;
                        }
                    }
                    match take_head(&mut self.client_buf, rest, parse_request) {
                        Err(Confused) => return self.give_up(now, done, UNPARSEABLE),
                        Ok((used, None)) => used,
                        Ok((used, Some(head))) => {
                            self.on_request(head, now, done);
                            used
                        }
                    }
                }
                Client::Body {
                    seq,
                    payload,
                    then_wait,
                } => {
                    let (seq, then_wait) = (*seq, *then_wait);
                    // The response may have ended first (an early 413): then the rest of
                    // this body is read past, not kept.
                    let sink = self
                        .pending
                        .back_mut()
                        .filter(|p| p.seq == seq)
                        .map(|p| &mut p.exchange.request_body);
                    match payload.read(rest, sink, self.cap) {
                        Err(Confused) => return self.give_up(now, done, UNPARSEABLE),
                        Ok((used, false)) => used,
                        Ok((used, true)) => {
                            self.client = self.after_request(seq, then_wait);
                            used
                        }
                    }
                }
                Client::Waiting { lost, .. } => {
                    if !*lost {
                        if self.client_buf.len() + rest.len() <= HEAD_LIMIT {
                            self.client_buf.extend_from_slice(rest);
                        } else {
                            *lost = true;
                            self.client_buf = Vec::new();
                        }
                    }
                    rest.len()
                }
            };
            rest = rest.get(used..).unwrap_or_default();
        }
    }

    fn app_bytes(&mut self, data: &[u8], now: Instant, done: &mut Vec<Exchange>) {
        let mut rest = data;
        while !rest.is_empty() && self.mode == Mode::Live {
            let used = match &mut self.app {
                App::Head => {
                    // Some servers send a stray CRLF after a body; it is no response.
                    if self.app_buf.is_empty() {
                        let blank = leading_newlines(rest);
                        if blank > 0 {
                            rest = rest.get(blank..).unwrap_or_default();
                            continue;
                        }
                    }
                    match take_head(&mut self.app_buf, rest, parse_response) {
                        Err(Confused) => return self.give_up(now, done, UNPARSEABLE),
                        Ok((used, None)) => used,
                        Ok((used, Some(head))) => {
                            self.on_response(head, now, done);
                            used
                        }
                    }
                }
                App::Body(payload) => {
                    let sink = self
                        .pending
                        .front_mut()
                        .map(|p| &mut p.exchange.response_body);
                    match payload.read(rest, sink, self.cap) {
                        Err(Confused) => return self.give_up(now, done, UNPARSEABLE),
                        Ok((used, false)) => used,
                        Ok((used, true)) => {
                            self.app = App::Head;
                            self.complete(now, done);
                            used
                        }
                    }
                }
            };
            rest = rest.get(used..).unwrap_or_default();
        }
    }

    fn on_request(&mut self, head: RequestHead, now: Instant, done: &mut Vec<Exchange>) {
        if self.pending.len() >= MAX_PENDING {
            return self.give_up(now, done, UNPARSEABLE);
        }
        let Ok(payload) = request_payload(&head.headers) else {
            return self.give_up(now, done, UNPARSEABLE);
        };
        let connect = head.method == "CONNECT";
        let may_switch = connect || values(&head.headers, "upgrade").next().is_some();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(Pending {
            seq,
            since: now,
            head_only: head.method == "HEAD",
            connect,
            answered: false,
            exchange: Exchange::new(head.method, head.target, head.headers),
        });
        self.client = match payload {
            Some(payload) => Client::Body {
                seq,
                payload,
                then_wait: may_switch,
            },
            None => self.after_request(seq, may_switch),
        };
    }

    /// Where the client side goes once a request has been read in full.
    fn after_request(&self, seq: u64, may_switch: bool) -> Client {
        let unanswered = self.pending.iter().any(|p| p.seq == seq && !p.answered);
        if may_switch && unanswered {
            Client::Waiting { seq, lost: false }
        } else {
            Client::Head
        }
    }

    fn on_response(&mut self, head: ResponseHead, now: Instant, done: &mut Vec<Exchange>) {
        let Some(front) = self.pending.front_mut() else {
            // A response nobody asked for: we have lost track of the pairing.
            return self.give_up(now, done, UNPARSEABLE);
        };
        let status = head.status;
        let upgraded = status == 101 || (front.connect && (200..300).contains(&status));
        if !upgraded && (100..200).contains(&status) {
            // Interim (100 Continue, 103 Early Hints): the final response is still to come.
            return;
        }
        let no_body = upgraded || front.head_only || status == 204 || status == 304;
        let framing = if no_body {
            Ok(None)
        } else {
            response_payload(&head.headers).map(Some)
        };
        let seq = front.seq;
        front.answered = true;
        front.exchange.status = Some(status);
        front.exchange.response_headers = head.headers;
        front.exchange.upgraded = upgraded;
        if upgraded {
            if let Some(p) = self.pending.pop_front() {
                done.push(p.finish(now, None));
            }
            // Whatever follows is another protocol, so also for requests pipelined after it.
            return self.give_up(now, done, SWITCHED);
        }
        match framing {
            Err(Confused) => return self.give_up(now, done, UNPARSEABLE),
            Ok(None | Some(Payload::Length(0))) => self.complete(now, done),
            Ok(Some(payload)) => self.app = App::Body(payload),
        }
        self.resume_client(seq, now, done);
    }

    /// The front exchange's response ended.
    fn complete(&mut self, now: Instant, done: &mut Vec<Exchange>) {
        if let Some(p) = self.pending.pop_front() {
            done.push(p.finish(now, None));
        }
    }

    /// The response to `seq` did not switch protocols, so bytes the client sent after it
    /// are HTTP after all.
    fn resume_client(&mut self, seq: u64, now: Instant, done: &mut Vec<Exchange>) {
        let Client::Waiting { seq: waiting, lost } = self.client else {
            return;
        };
        if waiting != seq {
            return;
        }
        if lost {
            return self.give_up(now, done, UNPARSEABLE);
        }
        self.client = Client::Head;
        let held = std::mem::take(&mut self.client_buf);
        self.client_bytes(&held, now, done);
    }

    fn give_up(&mut self, now: Instant, done: &mut Vec<Exchange>, why: &str) {
        for p in self.pending.drain(..) {
            done.push(p.finish(now, Some(why)));
        }
        self.release(Mode::Off);
    }

    /// Frees the buffers: a connection we no longer follow should not hold them.
    fn release(&mut self, mode: Mode) {
        self.mode = mode;
        self.pending = VecDeque::new();
        self.client = Client::Head;
        self.app = App::Head;
        self.client_buf = Vec::new();
        self.app_buf = Vec::new();
    }
}

impl Payload {
    /// Reads this body's bytes from the front of `data`, keeping the payload in `sink`.
    /// Returns the bytes used and whether the body ended.
    fn read(
        &mut self,
        data: &[u8],
        sink: Option<&mut Body>,
        cap: usize,
    ) -> Result<(usize, bool), Confused> {
        match self {
            Payload::Length(left) => {
                let used = take(*left, data.len());
                keep(sink, data.get(..used), cap);
                *left -= used as u64;
                Ok((used, *left == 0))
            }
            Payload::UntilClose => {
                keep(sink, Some(data), cap);
                Ok((data.len(), false))
            }
            Payload::Chunked(state) => state.read(data, sink, cap),
        }
    }
}

impl Chunked {
    const START: Chunked = Chunked::Size { size: 0, digits: 0 };

    fn read(
        &mut self,
        data: &[u8],
        mut sink: Option<&mut Body>,
        cap: usize,
    ) -> Result<(usize, bool), Confused> {
        let mut pos = 0;
        while let Some(&b) = data.get(pos) {
            *self = match *self {
                Chunked::Data { left } => {
                    // The one state that takes a run of bytes rather than one.
                    let used = take(left, data.len() - pos);
                    keep(sink.as_deref_mut(), data.get(pos..pos + used), cap);
                    pos += used;
                    let left = left - used as u64;
                    *self = if left == 0 {
                        Chunked::DataCr
                    } else {
                        Chunked::Data { left }
                    };
                    continue;
                }
                Chunked::Size { size, digits } => match (hex(b), b) {
                    (Some(_), _) if digits >= MAX_HEX_DIGITS => return Err(Confused),
                    (Some(d), _) => Chunked::Size {
                        size: (size << 4) | d,
                        digits: digits + 1,
                    },
                    _ if digits == 0 => return Err(Confused),
                    (None, b'\r') => Chunked::SizeLf { size },
                    (None, b';' | b' ' | b'\t') => Chunked::Ext { size },
                    (None, _) => return Err(Confused),
                },
                // Extensions are skipped; a quoted value cannot hold CR or LF, so the
                // first CR ends the line.
                Chunked::Ext { size } => match b {
                    b'\r' => Chunked::SizeLf { size },
                    b'\n' => return Err(Confused),
                    _ => Chunked::Ext { size },
                },
                Chunked::SizeLf { size } => match (b, size) {
                    (b'\n', 0) => Chunked::Trailer {
                        fresh: true,
                        seen: 0,
                    },
                    (b'\n', left) => Chunked::Data { left },
                    _ => return Err(Confused),
                },
                Chunked::DataCr if b == b'\r' => Chunked::DataLf,
                Chunked::DataLf if b == b'\n' => Chunked::START,
                Chunked::DataCr | Chunked::DataLf => return Err(Confused),
                Chunked::Trailer { fresh, seen } => {
                    if seen >= TRAILER_LIMIT {
                        return Err(Confused);
                    }
                    match b {
                        b'\r' => Chunked::TrailerLf {
                            fresh,
                            seen: seen + 1,
                        },
                        b'\n' => return Err(Confused),
                        _ => Chunked::Trailer {
                            fresh: false,
                            seen: seen + 1,
                        },
                    }
                }
                Chunked::TrailerLf { fresh, seen } => match b {
                    b'\n' if fresh => return Ok((pos + 1, true)),
                    b'\n' => Chunked::Trailer {
                        fresh: true,
                        seen: seen + 1,
                    },
                    _ => return Err(Confused),
                },
            };
            pos += 1;
        }
        Ok((pos, false))
    }
}

/// How many of `available` bytes a body with `left` to go takes.
fn take(left: u64, available: usize) -> usize {
    usize::try_from(left).map_or(available, |left| left.min(available))
}

fn keep(sink: Option<&mut Body>, chunk: Option<&[u8]>, cap: usize) {
    if let (Some(body), Some(chunk)) = (sink, chunk) {
        body.keep(chunk, cap);
    }
}

fn hex(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

fn leading_newlines(data: &[u8]) -> usize {
    data.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// Offers `data` to a head parser, through `buf` once a head arrives in pieces. Returns
/// the bytes of `data` used and, when the head is complete, the head.
fn take_head<H>(
    buf: &mut Vec<u8>,
    data: &[u8],
    parse: fn(&[u8]) -> Parsed<H>,
) -> Result<(usize, Option<H>), Confused> {
    if buf.is_empty() {
        // The common case, a whole head in one read, is parsed where it lies.
        if let Some((len, head)) = parse(data)? {
            // Over the limit is over the limit, however it was cut into reads.
            return if len > HEAD_LIMIT {
                Err(Confused)
            } else {
                Ok((len, Some(head)))
            };
        }
        if data.len() >= HEAD_LIMIT {
            return Err(Confused);
        }
        buf.extend_from_slice(data);
        return Ok((data.len(), None));
    }
    let old = buf.len();
    let fresh = data.get(..HEAD_LIMIT.saturating_sub(old)).unwrap_or(data);
    buf.extend_from_slice(fresh);
    // Only a line end can complete a head (or finish a bad line), so a head fed in tiny
    // pieces is parsed once per line rather than once per piece.
    if fresh.contains(&b'\n')
        && let Some((len, head)) = parse(buf)?
    {
        buf.clear();
        // The head could not end inside bytes already found to be partial.
        return match len.checked_sub(old) {
            Some(used) if used > 0 => Ok((used, Some(head))),
            _ => Err(Confused),
        };
    }
    if buf.len() >= HEAD_LIMIT {
        return Err(Confused);
    }
    Ok((fresh.len(), None))
}

fn parse_request(buf: &[u8]) -> Parsed<RequestHead> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let (Some(method), Some(target)) = (req.method, req.path) else {
                return Err(Confused);
            };
            let head = RequestHead {
                method: method.to_owned(),
                target: target.to_owned(),
                headers: owned(req.headers),
            };
            Ok(Some((len, head)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(Confused),
    }
}

fn parse_response(buf: &[u8]) -> Parsed<ResponseHead> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut slots);
    match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let Some(status) = res.code else {
                return Err(Confused);
            };
            let head = ResponseHead {
                status,
                headers: owned(res.headers),
            };
            Ok(Some((len, head)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(Confused),
    }
}

fn owned(headers: &[httparse::Header<'_>]) -> Headers {
    headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect()
}

fn values<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// RFC 9112 section 6.3, for a request: chunked, a length, or no body at all.
fn request_payload(headers: &Headers) -> Result<Option<Payload>, Confused> {
    match chunked_last(headers) {
        Some(true) => Ok(Some(Payload::Chunked(Chunked::START))),
        // A request body whose end cannot be found: the server must reject it.
        Some(false) => Err(Confused),
        None => Ok(content_length(headers)?
            .filter(|&len| len > 0)
            .map(Payload::Length)),
    }
}

/// RFC 9112 section 6.3, for a response that may have a body.
fn response_payload(headers: &Headers) -> Result<Payload, Confused> {
    Ok(match chunked_last(headers) {
        Some(true) => Payload::Chunked(Chunked::START),
        Some(false) => Payload::UntilClose,
        None => content_length(headers)?.map_or(Payload::UntilClose, Payload::Length),
    })
}

/// Whether the last transfer coding is chunked; None without Transfer-Encoding.
fn chunked_last(headers: &Headers) -> Option<bool> {
    let mut present = false;
    let mut last: &[u8] = b"";
    for value in values(headers, "transfer-encoding") {
        present = true;
        for coding in value.split(|&b| b == b',').map(trim) {
            if !coding.is_empty() {
                last = coding;
            }
        }
    }
    present.then(|| last.eq_ignore_ascii_case(b"chunked"))
}

/// The Content-Length, when given; repeated values must agree (RFC 9110 section 8.6).
fn content_length(headers: &Headers) -> Result<Option<u64>, Confused> {
    let mut found = None;
    for value in values(headers, "content-length") {
        for item in value.split(|&b| b == b',').map(trim) {
            let len = decimal(item).ok_or(Confused)?;
            if found.is_some_and(|seen| seen != len) {
                return Err(Confused);
            }
            found = Some(len);
        }
    }
    Ok(found)
}

fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let d = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Step<'a> {
        Client(&'a [u8]),
        App(&'a [u8]),
        Close,
    }
    use Step::{App as A, Client as C, Close};

    const TICK: Duration = Duration::from_millis(10);

    /// Runs `steps`, each one tick after the last, and returns what was pushed.
    fn run(cap: usize, steps: &[Step<'_>]) -> (Vec<Exchange>, Conversation) {
        let mut conv = Conversation::new(cap);
        let mut done = Vec::new();
        let mut now = Instant::now();
        for step in steps {
            match step {
                C(data) => conv.from_client(data, now, &mut done),
                A(data) => conv.from_app(data, now, &mut done),
                Close => conv.close(now, &mut done),
            }
            now += TICK;
        }
        (done, conv)
    }

    /// The exchange without its clocks, for comparing runs.
    fn plain(mut e: Exchange) -> Exchange {
        e.started = SystemTime::UNIX_EPOCH;
        e.duration = Duration::ZERO;
        e
    }

    fn plains(done: Vec<Exchange>) -> Vec<Exchange> {
        done.into_iter().map(plain).collect()
    }

    fn body(bytes: &[u8]) -> Body {
        Body {
            bytes: bytes.to_vec(),
            size: bytes.len() as u64,
            truncated: false,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn exchange(method: &str, target: &str, req: &[(&str, &str)]) -> Exchange {
        Exchange {
            started: SystemTime::UNIX_EPOCH,
            method: method.into(),
            target: target.into(),
            request_headers: headers(req),
            request_body: Body::default(),
            status: None,
            response_headers: Vec::new(),
            response_body: Body::default(),
            duration: Duration::ZERO,
            error: None,
            upgraded: false,
        }
    }

    fn answered(mut e: Exchange, status: u16, res: &[(&str, &str)], bytes: &[u8]) -> Exchange {
        e.status = Some(status);
        e.response_headers = headers(res);
        e.response_body = body(bytes);
        e
    }

    #[test]
    fn get_with_content_length_completes_when_the_body_ends() {
        let (done, conv) = run(
            1024,
            &[
                C(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"),
                A(b"lo"),
            ],
        );
        assert_eq!(done.len(), 1);
        // Head complete at tick 0, body's last byte at tick 2.
        assert_eq!(done[0].duration, 2 * TICK);
        let want = answered(
            exchange("GET", "/a?b=1", &[("Host", "x")]),
            200,
            &[("Content-Length", "5")],
            b"hello",
        );
        assert_eq!(plains(done), vec![want]);
        assert!(!conv.is_off());
    }

    #[test]
    fn post_body_is_captured() {
        let (done, _) = run(
            1024,
            &[
                C(b"POST /form HTTP/1.1\r\ncontent-length: 7\r\n\r\na=1"),
                C(b"&b=2"),
                A(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        let mut want = answered(
            exchange("POST", "/form", &[("content-length", "7")]),
            201,
            &[("Content-Length", "0")],
            b"",
        );
        want.request_body = body(b"a=1&b=2");
        assert_eq!(plains(done), vec![want]);
    }

    const CHUNKED_REQUEST: &[u8] = b"POST /up HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        5;name=\"a b\"\r\nhello\r\n6 ; x\r\n world\r\n0;last\r\nX-Sum: 1\r\nX-More: 2\r\n\r\n";
    const CHUNKED_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        A\r\n0123456789\r\n0\r\n\r\n";

    #[test]
    fn chunked_bodies_lose_their_framing_extensions_and_trailers() {
        let (done, conv) = run(1024, &[C(CHUNKED_REQUEST), A(CHUNKED_RESPONSE)]);
        let mut want = answered(
            exchange("POST", "/up", &[("Transfer-Encoding", "gzip, chunked")]),
            200,
            &[("Transfer-Encoding", "chunked")],
            b"0123456789",
        );
        want.request_body = body(b"hello world");
        assert_eq!(plains(done), vec![want]);
        assert!(!conv.is_off());
    }

    /// Two pipelined exchanges with every framing the parser has states for.
    const PIPELINED_CLIENT: &[u8] =
        b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;n=v\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n\
        GET /b HTTP/1.1\r\nHost: a\r\n\r\n";
    const PIPELINED_APP: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=\"y\"\r\nabc\r\n0\r\nT: v\r\n\r\n\
        HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope";

    fn pipelined_want() -> Vec<Exchange> {
        let mut first = answered(
            exchange(
                "POST",
                "/up?x=1",
                &[("Host", "a"), ("Transfer-Encoding", "chunked")],
            ),
            200,
            &[("Transfer-Encoding", "chunked")],
            b"abc",
        );
        first.request_body = body(b"hello world");
        let second = answered(
            exchange("GET", "/b", &[("Host", "a")]),
            404,
            &[("Content-Length", "4")],
            b"nope",
        );
        vec![first, second]
    }

    #[test]
    fn pipelined_conversation_parses_the_same_at_every_split() {
        let want = pipelined_want();

        let whole = run(1024, &[C(PIPELINED_CLIENT), A(PIPELINED_APP)]).0;
        assert_eq!(plains(whole), want);

        let mut steps: Vec<Step<'_>> = PIPELINED_CLIENT.chunks(1).map(C).collect();
        steps.extend(PIPELINED_APP.chunks(1).map(A));
        let (done, conv) = run(1024, &steps);
        assert_eq!(plains(done), want, "byte by byte");
        assert!(!conv.is_off());

        for i in 0..=PIPELINED_CLIENT.len() {
            for j in 0..=PIPELINED_APP.len() {
                let (c1, c2) = PIPELINED_CLIENT.split_at(i);
                let (a1, a2) = PIPELINED_APP.split_at(j);
                let (done, _) = run(1024, &[C(c1), C(c2), A(a1), A(a2)]);
                assert_eq!(plains(done), want, "client split at {i}, app split at {j}");
            }
        }
    }

    #[test]
    fn each_response_may_follow_its_request_byte_by_byte() {
        let req1 = b"GET /1 HTTP/1.1\r\n\r\n";
        let res1 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let req2 = b"\r\nGET /2 HTTP/1.1\r\n\r\n";
        let res2 = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
        let mut steps: Vec<Step<'_>> = Vec::new();
        steps.extend(req1.chunks(1).map(C));
        steps.extend(res1.chunks(1).map(A));
        steps.extend(req2.chunks(1).map(C));
        steps.extend(res2.chunks(1).map(A));
        let (done, _) = run(1024, &steps);
        let want = vec![
            answered(
                exchange("GET", "/1", &[]),
                200,
                &[("Content-Length", "2")],
                b"ok",
            ),
            answered(
                exchange("GET", "/2", &[]),
                200,
                &[("Transfer-Encoding", "chunked")],
                b"hi",
            ),
        ];
        assert_eq!(plains(done), want);
    }

    #[test]
    fn head_response_has_no_body_whatever_its_length_says() {
        let (done, conv) = run(
            1024,
            &[
                C(b"HEAD /big HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"),
            ],
        );
        let want = vec![
            answered(
                exchange("HEAD", "/big", &[]),
                200,
                &[("Content-Length", "1000")],
                b"",
            ),
            answered(
                exchange("GET", "/next", &[]),
                200,
                &[("Content-Length", "1")],
                b"x",
            ),
        ];
        assert_eq!(plains(done), want);
        assert!(!conv.is_off());
    }

    #[test]
    fn no_content_and_not_modified_have_no_body() {
        for status in [204u16, 304] {
            let head = format!("HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n");
            let (done, conv) = run(
                1024,
                &[
                    C(b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
                    A(head.as_bytes()),
                    A(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                ],
            );
            let statuses: Vec<_> = done.iter().map(|e| (e.status, e.error.clone())).collect();
            assert_eq!(statuses, vec![(Some(status), None), (Some(200), None)]);
            assert!(done[0].response_body == Body::default());
            assert!(!conv.is_off());
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        let (done, _) = run(
            1024,
            &[
                C(b"PUT /f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
                A(b"HTTP/1.1 100 Continue\r\n\r\n"),
                C(b"abc"),
                A(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        let mut want = answered(
            exchange(
                "PUT",
                "/f",
                &[("Expect", "100-continue"), ("Content-Length", "3")],
            ),
            200,
            &[("Content-Length", "0")],
            b"",
        );
        want.request_body = body(b"abc");
        assert_eq!(plains(done), vec![want]);
    }

    #[test]
    fn switching_protocols_ends_the_exchange_and_turns_off() {
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        // The client's first frame may reach the tap before the 101 does.
        let frame: &[u8] = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
        let (done, conv) = run(
            1024,
            &[
                C(upgrade),
                C(frame),
                A(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"),
                C(b"GET /not-http-anymore HTTP/1.1\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\n\r\n"),
                Close,
            ],
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, Some(101));
        assert!(done[0].upgraded);
        assert_eq!(done[0].error, None);
        assert_eq!(
            done[0].response_headers,
            headers(&[("Upgrade", "websocket")])
        );
        assert!(conv.is_off());
    }

    #[test]
    fn declined_upgrade_goes_on_as_http() {
        let (done, conv) = run(
            1024,
            &[
                C(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
                // Held until the response says the connection stays HTTP.
                C(b"GET /after HTTP/1.1\r\n\r\n"),
                A(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        let got: Vec<_> = done
            .iter()
            .map(|e| (e.target.as_str(), e.status, e.upgraded))
            .collect();
        assert_eq!(
            got,
            vec![("/ws", Some(400), false), ("/after", Some(200), false)]
        );
        assert!(!conv.is_off());
    }

    #[test]
    fn upgrade_declined_before_its_body_ends_goes_on_as_http() {
        let (done, conv) = run(
            1024,
            &[
                C(b"POST /ws HTTP/1.1\r\nUpgrade: x\r\nContent-Length: 4\r\n\r\nab"),
                A(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nn"),
                // Already answered, so what follows the body is HTTP: no holding back.
                C(b"cdGET /next HTTP/1.1\r\n\r\n"),
                A(b"o"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        let got: Vec<_> = done.iter().map(|e| (e.target.as_str(), e.status)).collect();
        assert_eq!(got, vec![("/ws", Some(400)), ("/next", Some(200))]);
        assert!(!conv.is_off());
    }

    #[test]
    fn accepted_connect_is_upgraded() {
        let (done, conv) = run(
            1024,
            &[
                C(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"),
                C(b"\x16\x03\x01 optimistic tunnel bytes"),
                A(b"HTTP/1.1 200 Connection Established\r\n\r\n"),
                A(b"\x16\x03\x03 more"),
            ],
        );
        let mut want = answered(
            exchange("CONNECT", "db:5432", &[("Host", "db:5432")]),
            200,
            &[],
            b"",
        );
        want.upgraded = true;
        assert_eq!(plains(done), vec![want]);
        assert!(conv.is_off());
    }

    #[test]
    fn refused_connect_is_an_ordinary_response() {
        let (done, conv) = run(
            1024,
            &[
                C(b"CONNECT db:5432 HTTP/1.1\r\n\r\n"),
                A(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno!"),
            ],
        );
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].status, done[0].upgraded), (Some(403), false));
        assert_eq!(done[0].response_body, body(b"no!"));
        assert!(!conv.is_off());
    }

    #[test]
    fn close_delimited_response_ends_at_close() {
        let (done, _) = run(
            1024,
            &[
                C(b"GET / HTTP/1.0\r\n\r\n"),
                A(b"HTTP/1.0 200 OK\r\n\r\nsome "),
                A(b"bytes"),
                Close,
                Close,
            ],
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].duration, 3 * TICK);
        assert_eq!(
            plain(done[0].clone()),
            answered(exchange("GET", "/", &[]), 200, &[], b"some bytes")
        );
    }

    #[test]
    fn close_reports_exchanges_it_cut_short() {
        // Status and error of each exchange pushed.
        type Outcomes = &'static [(Option<u16>, Option<&'static str>)];
        let cases: &[(&[u8], &[u8], Outcomes)] = &[
            (
                b"GET / HTTP/1.1\r\n\r\n",
                b"",
                &[(None, Some(BEFORE_RESPONSE))],
            ),
            (
                b"GET / HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Le",
                &[(None, Some(BEFORE_RESPONSE))],
            ),
            (
                b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                &[
                    (Some(200), Some(MID_RESPONSE)),
                    (None, Some(BEFORE_RESPONSE)),
                ],
            ),
            (
                b"GET / HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n",
                &[(Some(200), Some(MID_RESPONSE))],
            ),
            // A request head that never ended is no exchange.
            (b"GET / HTTP/1.1\r\nHost:", b"", &[]),
        ];
        for (client, app, want) in cases {
            let (done, conv) = run(1024, &[C(client), A(app), Close, Close]);
            let got: Vec<_> = done
                .iter()
                .map(|e| (e.status, e.error.as_deref()))
                .collect();
            assert_eq!(got.as_slice(), *want, "{}", String::from_utf8_lossy(client));
            assert!(!conv.is_off());
            // After close, nothing more is reported.
            let mut conv = conv;
            let mut more = Vec::new();
            conv.from_app(b"HTTP/1.1 200 OK\r\n\r\n", Instant::now(), &mut more);
            conv.close(Instant::now(), &mut more);
            assert!(more.is_empty());
        }
    }

    #[test]
    fn capture_keeps_the_first_cap_bytes() {
        let (done, _) = run(
            4,
            &[
                C(b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabcdef"),
                A(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n12\r\n2\r\n34\r\n1\r\n5\r\n0\r\n\r\n"),
            ],
        );
        let e = &done[0];
        let want = |bytes: &[u8], size| Body {
            bytes: bytes.to_vec(),
            size,
            truncated: true,
        };
        assert_eq!(e.request_body, want(b"abcd", 6));
        assert_eq!(e.response_body, want(b"1234", 5));
    }

    #[test]
    fn early_response_leaves_the_rest_of_the_request_body_unkept() {
        let (done, conv) = run(
            1024,
            &[
                C(b"POST /big HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc"),
                A(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n"),
                C(b"defGET /next HTTP/1.1\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        let got: Vec<_> = done
            .iter()
            .map(|e| (e.target.as_str(), e.status, e.request_body.bytes.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/big", Some(413), &b"abc"[..]),
                ("/next", Some(200), &b""[..])
            ]
        );
        assert!(!conv.is_off());
    }

    #[test]
    fn unfollowable_bytes_turn_the_tap_off() {
        let cases: &[(&str, &[u8], &[u8])] = &[
            (
                "garbage from the client",
                b"\x00\x01\x02\xff\xfe binary",
                b"",
            ),
            (
                "a response nobody asked for",
                b"",
                b"HTTP/1.1 200 OK\r\n\r\n",
            ),
            (
                "a response to no pending request",
                b"GET / HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
            ),
            (
                "a request body coded other than chunked last",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                b"",
            ),
            (
                "chunked not last",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                b"",
            ),
            (
                "a length that is no number",
                b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
                b"",
            ),
            (
                "lengths that disagree",
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                b"",
            ),
            (
                "a list of lengths that disagree",
                b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
                b"",
            ),
            (
                "a negative length",
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                b"",
            ),
            (
                "a length past u64",
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                b"",
            ),
            (
                "a chunk size of 17 hex digits",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000001\r\n",
                b"",
            ),
            (
                "a chunk size line ending in a bare LF",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
                b"",
            ),
            (
                "chunk data not followed by CRLF",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\n0\r\n\r\n",
                b"",
            ),
            (
                "a chunk size with no digits",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n;x\r\n",
                b"",
            ),
            (
                "a bad response length",
                b"GET / HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            ),
            (
                "a bad response head",
                b"GET / HTTP/1.1\r\n\r\n",
                b"SSH-2.0-OpenSSH_9.6\r\n",
            ),
        ];
        for (why, client, app) in cases {
            let (done, conv) = run(1024, &[C(client), A(app), Close]);
            assert!(conv.is_off(), "{why}");
            // Exchanges that ended before the confusion stand; the rest say why they stop.
            assert!(
                done.iter()
                    .all(|e| e.error.is_none() || e.error.as_deref() == Some(UNPARSEABLE)),
                "{why}: {done:?}"
            );
        }
    }

    #[test]
    fn equal_repeated_lengths_are_one_length() {
        let (done, conv) = run(
            1024,
            &[
                C(b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2, 2\r\n\r\nok"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n!\r\n0\r\n\r\n"),
            ],
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request_body, body(b"ok"));
        // Transfer-Encoding wins over Content-Length.
        assert_eq!(done[0].response_body, body(b"!"));
        assert!(!conv.is_off());
    }

    #[test]
    fn non_chunked_response_coding_runs_to_close() {
        let (done, _) = run(
            1024,
            &[
                C(b"GET / HTTP/1.1\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef"),
                Close,
            ],
        );
        assert_eq!(done[0].response_body, body(b"abcdef"));
        assert_eq!(done[0].error, None);
    }

    #[test]
    fn parse_error_ends_pending_exchanges_with_what_was_captured() {
        let (done, conv) = run(
            1024,
            &[
                C(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
                A(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
                C(b"\x00garbage"),
                A(b"cde"),
                Close,
            ],
        );
        let got: Vec<_> = done
            .iter()
            .map(|e| {
                (
                    e.target.as_str(),
                    e.status,
                    e.response_body.bytes.as_slice(),
                    e.error.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("/1", Some(200), &b"ab"[..], Some(UNPARSEABLE)),
                ("/2", None, &b""[..], Some(UNPARSEABLE)),
            ]
        );
        assert!(conv.is_off());
    }

    #[test]
    fn oversized_heads_turn_the_tap_off() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        // Fewer than 100 headers, so it is the size that trips.
        let filler = format!("X-Filler: {}\r\n", "a".repeat(1024));
        while head.len() < 70 * 1024 {
            head.extend_from_slice(filler.as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut long = b"GET /".to_vec();
        long.resize(70 * 1024, b'a');
        long.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        for head in [&head, &long] {
            for piece in [head.len(), 1000, 1] {
                let steps: Vec<_> = head.chunks(piece).map(C).collect();
                let (done, conv) = run(1024, &steps);
                assert!(conv.is_off(), "in pieces of {piece}");
                assert!(done.is_empty());
            }
        }
        let mut response = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        response.resize(70 * 1024, b'a');
        let (_, conv) = run(1024, &[C(b"GET / HTTP/1.1\r\n\r\n"), A(&response)]);
        assert!(conv.is_off());
    }

    #[test]
    fn too_many_pending_requests_turn_the_tap_off() {
        let many = b"GET / HTTP/1.1\r\n\r\n".repeat(MAX_PENDING);
        let (done, conv) = run(1024, &[C(&many)]);
        assert!(done.is_empty() && !conv.is_off());
        let (done, conv) = run(1024, &[C(&many), C(b"GET / HTTP/1.1\r\n\r\n")]);
        assert_eq!(done.len(), MAX_PENDING);
        assert!(conv.is_off());
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn check(done: &[Exchange], cap: usize) {
        for e in done {
            for b in [&e.request_body, &e.response_body] {
                assert!(b.bytes.len() <= cap);
                assert!(b.bytes.len() as u64 <= b.size);
                assert_eq!(b.truncated, b.size > cap as u64);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"GETPOST HTTP/1.1\r\n:;0123456789abcdefABCDEF chunked Transfer-Encoding Content-Length 101 200 204 304 CONNECT HEAD Upgrade";
        for round in 0..2000 {
            let cap = rng.below(16);
            let mut conv = Conversation::new(cap);
            let mut done = Vec::new();
            let now = Instant::now();
            for _ in 0..rng.below(20) {
                let len = rng.below(64);
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        if round % 2 == 0 {
                            rng.next() as u8
                        } else {
                            alphabet[rng.below(alphabet.len())]
                        }
                    })
                    .collect();
                if rng.below(2) == 0 {
                    conv.from_client(&data, now, &mut done);
                } else {
                    conv.from_app(&data, now, &mut done);
                }
            }
            conv.close(now, &mut done);
            check(&done, cap);
        }
    }

    #[test]
    fn mutated_conversations_never_panic() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..5000 {
            let mut client = PIPELINED_CLIENT.to_vec();
            let mut app = PIPELINED_APP.to_vec();
            for _ in 0..1 + rng.below(3) {
                let side = if rng.below(2) == 0 {
                    &mut client
                } else {
                    &mut app
                };
                let at = rng.below(side.len());
                match rng.below(3) {
                    0 => side[at] = rng.next() as u8,
                    1 => {
                        side.remove(at);
                    }
                    _ => side.insert(at, b"\r\n0;:1"[rng.below(6)]),
                }
            }
            let cap = rng.below(8);
            let mut conv = Conversation::new(cap);
            let mut done = Vec::new();
            let now = Instant::now();
            let (mut c, mut a) = (&client[..], &app[..]);
            while !c.is_empty() || !a.is_empty() {
                let n = 1 + rng.below(16);
                if rng.below(2) == 0 && !c.is_empty() {
                    let (piece, rest) = c.split_at(n.min(c.len()));
                    conv.from_client(piece, now, &mut done);
                    c = rest;
                } else if !a.is_empty() {
                    let (piece, rest) = a.split_at(n.min(a.len()));
                    conv.from_app(piece, now, &mut done);
                    a = rest;
                }
            }
            conv.close(now, &mut done);
            check(&done, cap);
        }
    }
}
