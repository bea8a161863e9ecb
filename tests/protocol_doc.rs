//! `docs/PROTOCOL.md` is the contract for anyone writing a Shoal tracker or peer in another
//! language, so it is held to the code here: every example frame must decode with the crate's own
//! decoders and re-encode to the same JSON, every field the tables name must appear in a checked
//! example (and every field an example uses must be in a table), the example hashes, digests,
//! bitfields and chunk bytes must agree, and every message, error code and limit must be documented.

use serde_json::Value;
use shoal::bitfield::Bitfield;
use shoal::protocol::*;
use std::collections::{BTreeMap, BTreeSet};

// ---------------------------------------------------------------------------------------------
// The specifications.

#[test]
fn every_example_request_decodes_and_re_encodes_to_the_same_json() {
    let doc = Doc::load();
    let requests = doc.examples_of(Kind::Request);
    assert!(requests.len() >= 7, "too few example requests");
    for ex in requests {
        let (msg, _) = decode_envelope(ex.text.as_bytes())
            .unwrap_or_else(|(_, r)| panic!("{}: request refused: {r}", ex.at()));
        let encoded = reencode_request(msg, ex.text.as_bytes())
            .unwrap_or_else(|r| panic!("{}: request body refused: {r}", ex.at()));
        assert_same_json(&ex, &encoded);
    }
}

#[test]
fn every_example_reply_decodes_and_re_encodes_to_the_same_json() {
    let doc = Doc::load();
    for ex in doc.examples_of(Kind::Reply) {
        let envelope = read_envelope(ex.text.as_bytes())
            .unwrap_or_else(|(_, r)| panic!("{}: not a reply frame: {r}", ex.at()));
        let encoded = match (envelope.ok, Msg::from_number(envelope.msg)) {
            (Some(true), Some(msg)) => reencode_reply(msg, ex.text.as_bytes())
                .unwrap_or_else(|r| panic!("{}: success reply refused: {r}", ex.at())),
            (Some(false), Some(msg)) => {
                let Err(refusal) = reencode_reply(msg, ex.text.as_bytes()) else {
                    panic!("{}: a failure reply must decode as a refusal", ex.at());
                };
                assert_eq!(Some(refusal.code), envelope.error, "{}", ex.at());
                encode_refusal(msg as u64, &refusal)
            }
            (Some(false), None) => {
                // Refusals of unreadable lines (msg 0) and of unknown message numbers.
                let code = envelope
                    .error
                    .expect("a failure reply carries an error code");
                let message = envelope.message.clone().expect("and a message");
                encode_refusal(envelope.msg, &Refusal::new(code, message))
            }
            other => panic!("{}: a reply needs a known msg and ok: {other:?}", ex.at()),
        };
        assert_same_json(&ex, &encoded);
    }
}

#[test]
fn every_malformed_example_is_refused_as_its_reply_says() {
    let doc = Doc::load();
    let malformed = doc.examples_of(Kind::Malformed);
    assert!(!malformed.is_empty(), "no malformed examples");
    for ex in malformed {
        let (echoed, refusal) = refuse_while_decoding(ex.text.as_bytes())
            .unwrap_or_else(|| panic!("{}: the crate accepts this 'malformed' line", ex.at()));
        let reply = doc
            .next_example(&ex)
            .filter(|r| r.kind == Kind::Reply)
            .unwrap_or_else(|| panic!("{}: a malformed line needs its reply next", ex.at()));
        let reply = json(&reply);
        assert_eq!(reply["ok"], false, "{}", ex.at());
        assert_eq!(reply["msg"], echoed, "{}: echoed msg", ex.at());
        assert_eq!(reply["error"], refusal.code.as_str(), "{}: code", ex.at());
    }
}

#[test]
fn every_reply_answers_the_request_before_it() {
    let doc = Doc::load();
    let mut asked: Option<u64> = None;
    for ex in &doc.examples {
        match ex.kind {
            Kind::Request => asked = Some(json(ex)["msg"].as_u64().expect("msg")),
            Kind::Malformed => asked = refuse_while_decoding(ex.text.as_bytes()).map(|r| r.0),
            Kind::Reply => {
                let msg = json(ex)["msg"].as_u64().expect("msg");
                assert!(
                    msg == 0 || Some(msg) == asked,
                    "{}: reply to msg {msg} follows a request for {asked:?}",
                    ex.at()
                );
            }
            Kind::RawBody => {}
        }
    }
}

#[test]
fn every_field_in_an_example_is_in_its_message_table_and_every_table_field_is_exemplified() {
    let doc = Doc::load();
    for msg in all_messages() {
        let section = doc.message_section(msg);
        for direction in [Kind::Request, Kind::Reply] {
            let documented = field_table(section, direction);
            let mut exemplified = BTreeSet::new();
            for ex in doc.examples_of(direction) {
                let v = json(&ex);
                if v["msg"] == msg as u64 && v.get("ok") != Some(&Value::Bool(false)) {
                    field_paths(&v, "", &mut exemplified);
                }
            }
            for envelope_field in ["v", "msg", "ok"] {
                exemplified.remove(envelope_field);
            }
            let undocumented: Vec<_> = exemplified.difference(&documented).collect();
            let unexemplified: Vec<_> = documented.difference(&exemplified).collect();
            assert!(
                undocumented.is_empty(),
                "message {} {direction:?}: fields used in examples but missing from its table: {undocumented:?}",
                msg as u8
            );
            assert!(
                unexemplified.is_empty(),
                "message {} {direction:?}: table fields that no example shows (so nothing checks them): {unexemplified:?}",
                msg as u8
            );
        }
    }
}

#[test]
fn every_message_number_has_a_section() {
    let doc = Doc::load();
    for msg in all_messages() {
        doc.message_section(msg);
    }
    for line in doc.text.lines() {
        if let Some(rest) = line.strip_prefix("## Message ") {
            let n: u64 = rest.split(':').next().unwrap().parse().expect("a number");
            assert!(
                Msg::from_number(n).is_some(),
                "the doc describes unknown message {n}"
            );
        }
    }
}

#[test]
fn every_error_code_is_in_the_error_table_and_nothing_else_is() {
    let doc = Doc::load();
    let table = first_column(doc.section("## Error codes"));
    let codes: BTreeSet<String> = every_error_code()
        .into_iter()
        .map(|c| c.as_str().to_string())
        .collect();
    assert_eq!(
        table, codes,
        "the error table must list exactly the ErrorCode set"
    );
}

#[test]
fn example_hash_lists_match_their_digests_and_bitfields_fit_their_files() {
    let doc = Doc::load();
    let mut checked = 0;
    for ex in doc.examples_of(Kind::Request) {
        if json(&ex)["msg"] != Msg::Register as u64 {
            continue;
        }
        let register: Register = decode_body(ex.text.as_bytes()).unwrap();
        for offer in &register.files {
            assert_consistent(&ex, &offer.info, &offer.hashes);
            if let Some(have) = &offer.have {
                assert_fits(&ex, have, offer.info.chunks());
            }
            checked += 1;
        }
    }
    for (ex, reply) in locations_replies(&doc) {
        assert_eq!(reply.chunks, reply.file.chunks(), "{}: chunks", ex.at());
        if let Some(hashes) = &reply.hashes {
            assert_consistent(&ex, &reply.file, hashes);
            checked += 1;
        }
        for holder in &reply.peers {
            assert_fits(&ex, &holder.have, reply.chunks);
        }
    }
    assert!(checked >= 3, "too few hash lists in the examples");
}

#[test]
fn example_chunk_bodies_hash_to_the_published_chunk_hash() {
    let doc = Doc::load();
    let published: BTreeMap<String, (FileInfo, HashList)> = locations_replies(&doc)
        .into_iter()
        .filter_map(|(_, r)| Some((r.file.name.clone(), (r.file, r.hashes?))))
        .collect();
    let mut bodies = 0;
    for ex in doc.examples_of(Kind::Reply) {
        let Ok(header) = decode_reply::<ChunkHeader>(Msg::ChunkRequest, ex.text.as_bytes()) else {
            continue;
        };
        let (info, hashes) = &published[&header.file];
        assert_eq!(header.hash, hashes.0[header.index as usize], "{}", ex.at());
        assert_eq!(
            header.length,
            info.chunk_span(header.index).1,
            "{}",
            ex.at()
        );
        let body = doc
            .next_example(&ex)
            .filter(|b| b.kind == Kind::RawBody)
            .unwrap_or_else(|| panic!("{}: a chunk header needs its raw body next", ex.at()));
        let bytes = hex_bytes(&body.text);
        assert_eq!(
            bytes.len(),
            header.length as usize,
            "{}: body length",
            body.at()
        );
        assert_eq!(
            Hash::of(&bytes),
            header.hash,
            "{}: BLAKE3 of the body",
            body.at()
        );
        bodies += 1;
    }
    assert!(bodies >= 1, "no chunk body example");
}

#[test]
fn the_limits_table_gives_the_real_defaults() {
    let doc = Doc::load();
    let tracker = serde_json::to_value(shoal::config::TrackerConfig::default()).unwrap();
    let peer = serde_json::to_value(shoal::config::PeerConfig::default()).unwrap();
    let fixed: BTreeMap<&str, u64> = BTreeMap::from([
        ("Lease", u64::from(shoal::tracker::state::LEASE_INTERVALS)),
        (
            "Peer request line",
            shoal::peer::server::MAX_REQUEST_BYTES as u64,
        ),
        ("File name length", MAX_NAME_BYTES as u64),
        ("File name component length", MAX_COMPONENT_BYTES as u64),
        (
            "Smallest chunk size",
            u64::from(shoal::chunking::MIN_CHUNK_SIZE),
        ),
        (
            "Largest chunk size",
            u64::from(shoal::chunking::MAX_CHUNK_SIZE),
        ),
        (
            "Chunks granted per origin reply",
            u64::from(shoal::tracker::origin::MAX_GRANT),
        ),
        (
            "Origin validator length",
            shoal::tracker::origin::MAX_VALIDATOR_BYTES as u64,
        ),
        ("Wait for news (message 10)", MAX_HAVE_WAIT_MS),
    ]);
    let rows = table_rows(doc.section("## Limits"));
    assert!(rows.len() >= 15, "the limits table looks truncated");
    let mut fixed_seen = 0;
    for row in rows {
        let [limit, side, default, variable, _policy] = &row[..] else {
            panic!("a limits row has five columns: {row:?}");
        };
        let default = backticked(default).unwrap_or_else(|| panic!("{limit}: default in `...`"));
        if variable == "fixed" {
            assert_eq!(default, fixed[limit.as_str()].to_string(), "{limit}");
            fixed_seen += 1;
            continue;
        }
        let var = backticked(variable).unwrap_or_else(|| panic!("{limit}: variable in `...`"));
        let field = var
            .strip_prefix("SHOAL_")
            .unwrap_or_else(|| panic!("{limit}: {var} is not a SHOAL_ variable"))
            .to_lowercase();
        let config = match side.as_str() {
            "tracker" => &tracker,
            "peer" => &peer,
            other => {
                panic!("{limit}: a configurable limit belongs to tracker or peer, not {other}")
            }
        };
        let actual = match &config[&field] {
            Value::String(s) => s.clone(),
            Value::Null => panic!("{limit}: {var} is not a {side} setting"),
            other => other.to_string(),
        };
        assert_eq!(default, actual, "{limit}: documented default of {var}");
    }
    assert_eq!(fixed_seen, fixed.len(), "every fixed limit has its row");
}

#[test]
fn the_example_session_is_what_a_real_tracker_answers() {
    // Everything before "### Refusals in other situations" happens on one tracker with default
    // settings. Its requests go through the tracker's own request handler (no sockets). The chunk
    // transfer goes to a peer and is skipped. Tokens and peer ids are random, so the doc's stand
    // for the real ones; a registration comes from the ip its reply gives out.
    let doc = Doc::load();
    let tracker = shoal::tracker::Tracker::from_config(&shoal::config::TrackerConfig::default())
        .expect("no TLS files to read");
    let session =
        doc.line_of("## Example exchanges")..doc.line_of("### Refusals in other situations");
    let mut tokens: Vec<(String, String)> = Vec::new();
    let mut ids: Vec<(u64, u64)> = Vec::new();
    let mut request = String::new();
    let mut replayed = 0;
    for ex in doc.examples.iter().filter(|ex| session.contains(&ex.line)) {
        match ex.kind {
            Kind::Request | Kind::Malformed => {
                request = ex.text.clone();
                for (in_doc, real) in &tokens {
                    request = request.replace(in_doc.as_str(), real);
                }
                // A malformed request is refused before its id is read, with a column number
                // in the message: it keeps the doc's id.
                for (in_doc, real) in ids.iter().filter(|_| ex.kind == Kind::Request) {
                    for end in [",", "}"] {
                        let doc_field = format!("\"peer_id\":{in_doc}{end}");
                        request = request.replace(&doc_field, &format!("\"peer_id\":{real}{end}"));
                    }
                }
            }
            Kind::Reply => {
                let expected = json(ex);
                if expected["msg"] == Msg::ChunkRequest as u64 && expected["ok"] == true {
                    continue;
                }
                let from = expected["addr"].as_str().unwrap_or("192.0.2.99:1");
                let from: std::net::SocketAddr = from.parse().unwrap();
                let reply = tracker.handle(request.as_bytes(), from.ip(), None);
                let mut reply: Value = serde_json::from_slice(&reply).unwrap();

                if let (Some(in_doc), Some(real)) =
                    (expected["token"].as_str(), reply["token"].as_str())
                {
                    tokens.push((in_doc.to_string(), real.to_string()));
                    reply["token"] = Value::from(in_doc);
                }
                if let (Some(in_doc), Some(real)) =
                    (expected["peer_id"].as_u64(), reply["peer_id"].as_u64())
                {
                    if !ids.contains(&(in_doc, real)) {
                        ids.push((in_doc, real));
                    }
                }
                // Real ids are 16 digits long: no other number in a reply looks like one.
                let mut text = reply.to_string();
                for (in_doc, real) in &ids {
                    text = text.replace(&real.to_string(), &in_doc.to_string());
                }
                let reply: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(
                    reply,
                    expected,
                    "{}: the tracker answers differently",
                    ex.at()
                );
                replayed += 1;
            }
            Kind::RawBody => {}
        }
    }
    assert!(
        replayed >= 18,
        "the example session looks truncated: {replayed} replies"
    );
}

// ---------------------------------------------------------------------------------------------
// Decoding with the crate, one body type per message.

fn reencode_request(msg: Msg, line: &[u8]) -> Result<Vec<u8>, Refusal> {
    Ok(match msg {
        Msg::Register => encode_request(msg, &decode_body::<Register>(line)?),
        Msg::FileList => encode_request(msg, &decode_body::<FileList>(line)?),
        Msg::Locations => encode_request(msg, &decode_body::<Locations>(line)?),
        Msg::ChunkRegister => encode_request(msg, &decode_body::<ChunkRegister>(line)?),
        Msg::ChunkRequest => encode_request(msg, &decode_body::<ChunkRequest>(line)?),
        Msg::Leave | Msg::Announce => encode_request(msg, &decode_body::<PeerAuth>(line)?),
        Msg::Withdraw => encode_request(msg, &decode_body::<Withdraw>(line)?),
        Msg::Origin => encode_request(msg, &decode_body::<OriginClaim>(line)?),
        Msg::Have => encode_request(msg, &decode_body::<HaveRequest>(line)?),
    })
}

fn reencode_reply(msg: Msg, line: &[u8]) -> Result<Vec<u8>, Refusal> {
    Ok(match msg {
        Msg::Register => encode_reply(msg, &decode_reply::<Registered>(msg, line)?),
        Msg::FileList => encode_reply(msg, &decode_reply::<FileListReply>(msg, line)?),
        Msg::Locations => encode_reply(msg, &decode_reply::<LocationsReply>(msg, line)?),
        Msg::ChunkRegister => encode_reply(msg, &decode_reply::<ChunksRecorded>(msg, line)?),
        Msg::ChunkRequest => encode_reply(msg, &decode_reply::<ChunkHeader>(msg, line)?),
        Msg::Leave | Msg::Announce | Msg::Withdraw => {
            encode_reply(msg, &decode_reply::<Acknowledged>(msg, line)?)
        }
        Msg::Origin => encode_reply(msg, &decode_reply::<OriginGrant>(msg, line)?),
        Msg::Have => encode_reply(msg, &decode_reply::<HaveReply>(msg, line)?),
    })
}

/// How a receiver refuses a line it cannot read: the echoed msg and the refusal, or `None` if
/// the line decodes.
fn refuse_while_decoding(line: &[u8]) -> Option<(u64, Refusal)> {
    match decode_envelope(line) {
        Err(refused) => Some(refused),
        Ok((msg, _)) => reencode_request(msg, line).err().map(|r| (msg as u64, r)),
    }
}

fn all_messages() -> Vec<Msg> {
    (0..=255).filter_map(Msg::from_number).collect()
}

fn every_error_code() -> Vec<ErrorCode> {
    use ErrorCode::*;
    let all = vec![
        BadRequest,
        UnsupportedVersion,
        UnknownMsg,
        FrameTooLong,
        InvalidName,
        Unauthorized,
        UnknownPeer,
        Forbidden,
        UnknownFile,
        Conflict,
        OutOfRange,
        NotFound,
        Elsewhere,
        LimitReached,
        Busy,
        Internal,
    ];
    // Exhaustive on purpose: a new code does not compile here until it is listed (and documented).
    for code in &all {
        match code {
            BadRequest | UnsupportedVersion | UnknownMsg | FrameTooLong | InvalidName
            | Unauthorized | UnknownPeer | Forbidden | UnknownFile | Conflict | OutOfRange
            | NotFound | Elsewhere | LimitReached | Busy | Internal => {}
        }
    }
    all
}

fn locations_replies(doc: &Doc) -> Vec<(Example, LocationsReply)> {
    doc.examples_of(Kind::Reply)
        .into_iter()
        .filter_map(|ex| {
            let reply = decode_reply::<LocationsReply>(Msg::Locations, ex.text.as_bytes()).ok()?;
            Some((ex, reply))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Assertions.

/// The doc's frame and the crate's re-encoding of it agree: every field the doc writes comes
/// back unchanged (a renamed or retyped field does not), and the encoder adds only fields that
/// the doc left out at their empty default (`false`, `[]`).
fn assert_same_json(ex: &Example, encoded: &[u8]) {
    let doc = json(ex);
    let encoded: Value = serde_json::from_slice(encoded).unwrap();
    let (doc, encoded) = (doc.as_object().unwrap(), encoded.as_object().unwrap());
    for (key, value) in doc {
        match encoded.get(key) {
            None => panic!("{}: the code does not know field `{key}`", ex.at()),
            Some(back) => assert_eq!(back, value, "{}: field `{key}` changed", ex.at()),
        }
    }
    for (key, value) in encoded {
        let empty = value == &Value::Bool(false) || value == &Value::Array(vec![]);
        assert!(
            doc.contains_key(key) || empty,
            "{}: the code also sends `{key}`: {value}",
            ex.at()
        );
    }
}

fn assert_consistent(ex: &Example, info: &FileInfo, hashes: &HashList) {
    assert_eq!(
        hashes.0.len() as u64,
        info.chunks(),
        "{}: hashes for {}",
        ex.at(),
        info.name
    );
    assert_eq!(
        hashes.digest(),
        info.digest,
        "{}: digest of {}",
        ex.at(),
        info.name
    );
}

fn assert_fits(ex: &Example, have: &shoal::bitfield::WireBits, chunks: u64) {
    assert!(
        Bitfield::from_bytes(have.0.clone(), chunks as usize).is_some(),
        "{}: bitfield {have:?} does not fit {chunks} chunks",
        ex.at()
    );
}

// ---------------------------------------------------------------------------------------------
// Reading the document.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Request,
    Malformed,
    Reply,
    RawBody,
}

#[derive(Clone, Debug)]
struct Example {
    kind: Kind,
    text: String,
    line: usize,
    position: usize,
}

impl Example {
    fn at(&self) -> String {
        format!("docs/PROTOCOL.md line {}", self.line)
    }
}

struct Doc {
    text: String,
    examples: Vec<Example>,
}

impl Doc {
    fn load() -> Doc {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
        let text = std::fs::read_to_string(path).expect("docs/PROTOCOL.md is readable");
        let examples = fenced_examples(&text);
        Doc { text, examples }
    }

    fn examples_of(&self, kind: Kind) -> Vec<Example> {
        self.examples
            .iter()
            .filter(|e| e.kind == kind)
            .cloned()
            .collect()
    }

    fn next_example(&self, ex: &Example) -> Option<Example> {
        self.examples.get(ex.position + 1).cloned()
    }

    /// The text from a `## ` heading starting with `heading` to the next `## ` heading.
    fn section(&self, heading: &str) -> &str {
        let start = self
            .text
            .find(&format!("\n{heading}"))
            .unwrap_or_else(|| panic!("docs/PROTOCOL.md has no section {heading:?}"));
        let body = &self.text[start + 1..];
        let end = body[3..].find("\n## ").map_or(body.len(), |i| i + 3);
        &body[..end]
    }

    /// The line number of the heading `heading`.
    fn line_of(&self, heading: &str) -> usize {
        let index = self.text.lines().position(|l| l == heading);
        1 + index.unwrap_or_else(|| panic!("docs/PROTOCOL.md has no heading {heading:?}"))
    }

    fn message_section(&self, msg: Msg) -> &str {
        self.section(&format!("## Message {}:", msg as u8))
    }
}

/// Every fenced block whose info string marks it as an example; one frame per non-empty line
/// (a raw body block is one example).
fn fenced_examples(text: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut open: Option<Option<Kind>> = None;
    let mut body = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(info) = line.strip_prefix("```") else {
            if let Some(Some(_)) = open {
                body.push((i + 1, line));
            }
            continue;
        };
        match open.take() {
            None => {
                open = Some(match info.trim() {
                    "json request" => Some(Kind::Request),
                    "json malformed" => Some(Kind::Malformed),
                    "json reply" => Some(Kind::Reply),
                    "raw body" => Some(Kind::RawBody),
                    _ => None,
                });
            }
            Some(None) => {}
            Some(Some(Kind::RawBody)) => {
                let (line, _) = body[0];
                let text = body.iter().map(|(_, l)| *l).collect::<Vec<_>>().join(" ");
                examples.push(Example {
                    kind: Kind::RawBody,
                    text,
                    line,
                    position: 0,
                });
            }
            Some(Some(kind)) => {
                for &(line, text) in body.iter().filter(|(_, l)| !l.trim().is_empty()) {
                    let text = text.to_string();
                    examples.push(Example {
                        kind,
                        text,
                        line,
                        position: 0,
                    });
                }
            }
        }
        body.clear();
    }
    assert!(
        open.is_none(),
        "docs/PROTOCOL.md has an unclosed code block"
    );
    for (i, ex) in examples.iter_mut().enumerate() {
        ex.position = i;
    }
    examples
}

fn json(ex: &Example) -> Value {
    serde_json::from_str(&ex.text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", ex.at()))
}

/// Dotted paths of every field: `files`, `files[].name`, `file.digest`.
fn field_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let Some(object) = value.as_object() else {
        return;
    };
    for (key, inner) in object {
        let path = format!("{prefix}{key}");
        match inner {
            Value::Object(_) => field_paths(inner, &format!("{path}."), out),
            Value::Array(items) => {
                for item in items {
                    field_paths(item, &format!("{path}[]."), out);
                }
            }
            _ => {}
        }
        out.insert(path);
    }
}

/// The field names of a section's request (or reply) table: the first column of the table whose
/// header starts `| Request field` (or `| Reply field`).
fn field_table(section: &str, direction: Kind) -> BTreeSet<String> {
    let header = match direction {
        Kind::Request => "| Request field |",
        _ => "| Reply field |",
    };
    let Some(start) = section.find(header) else {
        return BTreeSet::new();
    };
    first_column(&section[start..])
}

/// The backticked first cells of the first table in `text`.
fn first_column(text: &str) -> BTreeSet<String> {
    table_rows(text)
        .into_iter()
        .filter_map(|row| backticked(&row[0]))
        .collect()
}

/// The body rows (after the header and the `|---|` line) of the first table in `text`.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells = l.trim().trim_matches('|').split(" | ");
            cells.map(|c| c.trim().to_string()).collect()
        })
        .collect()
}

/// The text inside the first pair of backticks.
fn backticked(cell: &str) -> Option<String> {
    let rest = cell.split_once('`')?.1;
    Some(rest.split_once('`')?.0.to_string())
}

fn hex_bytes(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("raw body bytes are hex pairs"))
        .collect()
}
