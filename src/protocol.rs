//! Wire messages between peers and the tracker, and between peers: serde types only, no I/O.
//! Every frame is one JSON object on one line carrying `"v"` (protocol version) and `"msg"`
//! (the message number). Replies echo `msg` and say `"ok"`; a failure carries an [`ErrorCode`].
//! `docs/PROTOCOL.md` is the human form of this file and must stay in step with it.

use crate::bitfield::WireBits;
use base64::Engine;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;

/// The protocol version this build speaks. A frame with another `v` gets `unsupported_version`.
pub const VERSION: u32 = 1;

/// Longest file name (a relative path), in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 1024;

/// Longest component of a file name (between two `/`), in bytes of UTF-8.
pub const MAX_COMPONENT_BYTES: usize = 255;

/// The message numbers. 1-4, 6, 8 and 9 go to the tracker; 5 goes to a peer; 7 is the lease
/// renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Msg {
    Register = 1,
    FileList = 2,
    Locations = 3,
    ChunkRegister = 4,
    ChunkRequest = 5,
    Leave = 6,
    Announce = 7,
    Withdraw = 8,
    Origin = 9,
    Have = 10,
}

impl Msg {
    pub fn from_number(n: u64) -> Option<Msg> {
        Some(match n {
            1 => Msg::Register,
            2 => Msg::FileList,
            3 => Msg::Locations,
            4 => Msg::ChunkRegister,
            5 => Msg::ChunkRequest,
            6 => Msg::Leave,
            7 => Msg::Announce,
            8 => Msg::Withdraw,
            9 => Msg::Origin,
            10 => Msg::Have,
            _ => return None,
        })
    }

    /// A short fixed label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Msg::Register => "register",
            Msg::FileList => "file_list",
            Msg::Locations => "locations",
            Msg::ChunkRegister => "chunk_register",
            Msg::ChunkRequest => "chunk_request",
            Msg::Leave => "leave",
            Msg::Announce => "announce",
            Msg::Withdraw => "withdraw",
            Msg::Origin => "origin",
            Msg::Have => "have",
        }
    }
}

/// Machine-readable failure reasons. The set is part of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing field or a field of the wrong type or range.
    BadRequest,
    /// `v` is not a version this side speaks.
    UnsupportedVersion,
    /// `msg` is not a message this side handles.
    UnknownMsg,
    /// The line exceeded the receiver's maximum frame size; the connection is closed.
    FrameTooLong,
    /// A file name that is not a safe relative path (see [`validate_name`]).
    InvalidName,
    /// Missing or wrong cluster secret.
    Unauthorized,
    /// `peer_id` unknown (never registered, left, or expired, or the tracker restarted): register again.
    UnknownPeer,
    /// `token` does not belong to `peer_id`.
    Forbidden,
    /// No such file in the swarm (tracker) or not shared by this peer (peer).
    UnknownFile,
    /// No longer sent: the same name with different content is a new version of that name.
    /// Kept so that a client written to the first revision still decodes every code.
    Conflict,
    /// A chunk index or a bitfield that does not fit the file.
    OutOfRange,
    /// The peer does not hold that chunk (yet).
    NotFound,
    /// The peer holds that chunk but sent it to another peer moments ago and still has chunks
    /// it never sent: fetch this one from the peers that have it (initial seeding).
    Elsewhere,
    /// A configured limit was reached (files per peer, chunks per file, peers, files).
    LimitReached,
    /// Too many connections; try again later. The connection is closed.
    Busy,
    /// The receiver failed (for example a disk error); the request may succeed elsewhere.
    Internal,
}

impl ErrorCode {
    /// Every code, so that counters labelled by code can show each one at zero from the start.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownMsg,
        ErrorCode::FrameTooLong,
        ErrorCode::InvalidName,
        ErrorCode::Unauthorized,
        ErrorCode::UnknownPeer,
        ErrorCode::Forbidden,
        ErrorCode::UnknownFile,
        ErrorCode::Conflict,
        ErrorCode::OutOfRange,
        ErrorCode::NotFound,
        ErrorCode::Elsewhere,
        ErrorCode::LimitReached,
        ErrorCode::Busy,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownMsg => "unknown_msg",
            ErrorCode::FrameTooLong => "frame_too_long",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownFile => "unknown_file",
            ErrorCode::Conflict => "conflict",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Elsewhere => "elsewhere",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A refusal: a code for programs and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", code.as_str())]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// A 32-byte BLAKE3 hash; hex on the wire. Ordered by its bytes, which is the order of its
/// lowercase hex form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Hash(out))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Hash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("hash must be 64 hex digits"))
    }
}

/// Every chunk's hash in order; on the wire, base64 of the concatenated 32-byte hashes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HashList(pub Vec<Hash>);

impl HashList {
    /// The file digest: BLAKE3 of the concatenated chunk hashes.
    pub fn digest(&self) -> Hash {
        let mut h = blake3::Hasher::new();
        for c in &self.0 {
            h.update(&c.0);
        }
        Hash(*h.finalize().as_bytes())
    }
}

impl Serialize for HashList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let flat: Vec<u8> = self.0.iter().flat_map(|h| h.0).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(flat))
    }
}

impl<'de> Deserialize<'de> for HashList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let flat = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| serde::de::Error::custom(format!("hashes are not base64: {e}")))?;
        if flat.len() % 32 != 0 {
            return Err(serde::de::Error::custom(
                "hashes length is not a multiple of 32 bytes",
            ));
        }
        let hashes = flat
            .chunks_exact(32)
            .map(|c| Hash(c.try_into().expect("32 bytes")))
            .collect();
        Ok(HashList(hashes))
    }
}

/// What identifies a file's content: name, size, chunking and the digest of its chunk hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub digest: Hash,
}

impl FileInfo {
    /// Number of chunks; the last one may be shorter. An empty file has none.
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// Byte offset and length of chunk `index` (which must be in range).
    pub fn chunk_span(&self, index: u32) -> (u64, u32) {
        chunk_span(self.size, self.chunk_size, index)
    }
}

/// Number of chunks of a file of `size` bytes cut every `chunk_size` bytes; the last one may be
/// shorter. An empty file has none.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    size.div_ceil(u64::from(chunk_size))
}

/// Byte offset and length of chunk `index` of a file of `size` bytes (empty past its end).
pub fn chunk_span(size: u64, chunk_size: u32, index: u32) -> (u64, u32) {
    let offset = u64::from(index) * u64::from(chunk_size);
    let len = size.saturating_sub(offset).min(u64::from(chunk_size));
    (offset, len as u32)
}

/// Checks that `name` is a safe relative path: `/`-separated components, each non-empty, not
/// starting with `.` (so no `.`, `..` or hidden names), free of `\` and control characters (NUL
/// included), and no longer than the limits. The reason for a refusal is a sentence.
pub fn validate_name(name: &str) -> Result<(), Refusal> {
    let bad = |why: String| {
        Err(Refusal::new(
            ErrorCode::InvalidName,
            format!("name {name:?} {why}"),
        ))
    };
    if name.is_empty() {
        return bad("is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(format!("is longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.starts_with('/') {
        return bad("is absolute (starts with '/'); names are relative paths".into());
    }
    for component in name.split('/') {
        if let Err(why) = check_component(component) {
            return bad(why);
        }
    }
    Ok(())
}

/// One path component of a name: the reason it is unsafe, if it is.
fn check_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err("has an empty component (a doubled or trailing '/')".into());
    }
    if component.len() > MAX_COMPONENT_BYTES {
        return Err(format!(
            "has a component longer than {MAX_COMPONENT_BYTES} bytes"
        ));
    }
    if component.starts_with('.') {
        return Err(format!(
            "has a component starting with '.' ({component:?}: hidden, '.' and '..' are refused)"
        ));
    }
    if let Some(c) = component.chars().find(|&c| c == '\\' || c.is_control()) {
        return Err(format!("contains {c:?}"));
    }
    Ok(())
}

/// The key that orders the versions of one name: the higher `published` stamp is newer, and
/// between equal stamps the higher digest. Every tracker and peer computes the same total order,
/// so the newest version survives a tracker restart once the peers have registered again.
pub fn version_key(published: u64, digest: Hash) -> (u64, Hash) {
    (published, digest)
}

/// Whether a presented secret (or token) matches the expected one; no expected secret admits
/// everyone. Compares in time independent of where the strings differ.
pub fn secret_matches(expected: Option<&str>, given: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let given = given.unwrap_or("");
    let diff = expected
        .bytes()
        .zip(given.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    diff == 0 && expected.len() == given.len()
}

// ---------------------------------------------------------------------------------------------
// Frames. A request is `{"v":1,"msg":N, ...fields}`; a reply is `{"v":1,"msg":N,"ok":true,
// ...fields}` or `{"v":1,"msg":N,"ok":false,"error":CODE,"message":TEXT}`.

/// The fields every frame has, read first to pick the body type (the version is checked then).
#[derive(Debug)]
pub struct Envelope {
    pub msg: u64,
    /// Present on replies only.
    pub ok: Option<bool>,
    pub error: Option<ErrorCode>,
    pub message: Option<String>,
}

/// The envelope as it is on the line. `v` and `msg` stay raw JSON until the version is checked:
/// a frame of another version may give them (or the other fields) another shape, and must still
/// get `unsupported_version`, never `bad_request`.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    v: Option<&'a RawValue>,
    #[serde(borrow, default)]
    msg: Option<&'a RawValue>,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default)]
    error: Option<ErrorCode>,
    #[serde(default)]
    message: Option<String>,
}

/// Reads `T` from a JSON object and nothing else: serde also reads a struct from an array, by
/// position, which would make `[1,2]` a frame.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(PhantomData)).map(Object)
    }
}

#[derive(Serialize)]
struct Out<'a, T> {
    v: u32,
    msg: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    #[serde(flatten)]
    body: &'a T,
}

/// Encodes a request frame (without the newline).
pub fn encode_request<T: Serialize>(msg: Msg, body: &T) -> Vec<u8> {
    serde_json::to_vec(&Out {
        v: VERSION,
        msg: msg as u8,
        ok: None,
        body,
    })
    .expect("serialisable")
}

/// Encodes a successful reply frame (without the newline).
pub fn encode_reply<T: Serialize>(msg: Msg, body: &T) -> Vec<u8> {
    serde_json::to_vec(&Out {
        v: VERSION,
        msg: msg as u8,
        ok: Some(true),
        body,
    })
    .expect("serialisable")
}

/// Encodes a failure reply. `msg` is the number the request carried (0 if it had none).
pub fn encode_refusal(msg: u64, refusal: &Refusal) -> Vec<u8> {
    #[derive(Serialize)]
    struct Failed<'a> {
        v: u32,
        msg: u64,
        ok: bool,
        error: ErrorCode,
        message: &'a str,
    }
    let f = Failed {
        v: VERSION,
        msg,
        ok: false,
        error: refusal.code,
        message: &refusal.message,
    };
    serde_json::to_vec(&f).expect("serialisable")
}

/// Reads and checks the envelope of any frame, request or reply: a JSON object whose `v` is
/// 1 and whose `msg` is an integer. A refusal carries the number to echo: `msg` when it is an
/// integer, 0 otherwise.
pub fn read_envelope(line: &[u8]) -> Result<Envelope, (u64, Refusal)> {
    let bad = |n, why: String| Err((n, Refusal::new(ErrorCode::BadRequest, why)));
    let raw = match serde_json::from_slice::<Object<RawEnvelope>>(line) {
        Ok(Object(raw)) => raw,
        Err(e) => return bad(0, format!("not a valid frame: {e}")),
    };
    let msg = raw
        .msg
        .and_then(|m| serde_json::from_str::<u64>(m.get()).ok());
    let echo = msg.unwrap_or(0);
    match raw.v {
        None => return bad(echo, "the frame has no protocol version \"v\"".into()),
        Some(v) if v.get() != "1" => {
            let why = format!(
                "protocol version {} is not supported (this side speaks {VERSION})",
                shortened(v.get())
            );
            return Err((echo, Refusal::new(ErrorCode::UnsupportedVersion, why)));
        }
        Some(_) => {}
    }
    let Some(msg) = msg else {
        return bad(
            0,
            "\"msg\" must be a message number, an integer from 0".into(),
        );
    };
    Ok(Envelope {
        msg,
        ok: raw.ok,
        error: raw.error,
        message: raw.message,
    })
}

/// A piece of a frame to quote in a refusal, cut to a readable length.
fn shortened(text: &str) -> String {
    const MAX_CHARS: usize = 32;
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// Parses a request line into its message and its envelope; the body is read next with
/// [`decode_body`]. Refusals carry the number to echo (see [`read_envelope`]).
pub fn decode_envelope(line: &[u8]) -> Result<(Msg, Envelope), (u64, Refusal)> {
    let env = read_envelope(line)?;
    match Msg::from_number(env.msg) {
        Some(m) => Ok((m, env)),
        None => Err((
            env.msg,
            Refusal::new(
                ErrorCode::UnknownMsg,
                format!("unknown message {}", env.msg),
            ),
        )),
    }
}

/// Parses the body of a frame whose envelope was already read.
pub fn decode_body<T: DeserializeOwned>(line: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(line)
        .map_err(|e| Refusal::new(ErrorCode::BadRequest, format!("bad fields: {e}")))
}

/// Parses a reply line: the body on success, the refusal otherwise.
pub fn decode_reply<T: DeserializeOwned>(expect: Msg, line: &[u8]) -> Result<T, Refusal> {
    let env = read_envelope(line).map_err(|(_, refusal)| refusal)?;
    // A refusal counts whatever number it echoes: `busy` and `frame_too_long` carry 0 because
    // they are sent before (or instead of) reading the request.
    if env.ok != Some(true) {
        return Err(Refusal::new(
            env.error.unwrap_or(ErrorCode::Internal),
            env.message
                .unwrap_or_else(|| "refused without a message".into()),
        ));
    }
    if env.msg != expect as u64 {
        let why = format!(
            "reply is for message {}, expected {}",
            env.msg, expect as u8
        );
        return Err(Refusal::new(ErrorCode::BadRequest, why));
    }
    decode_body(line)
}

// ---------------------------------------------------------------------------------------------
// Bodies.

/// 1 register: a peer announces its address, its files, and optionally its identity (to add
/// files to an existing registration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub name: String,
    /// `ip:port` others should dial. An unspecified ip (`0.0.0.0`, `::`) means "the address you
    /// see me connecting from".
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Both set: add `files` to this existing registration and renew its lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default)]
    pub files: Vec<FileOffer>,
}

/// One file in a registration: its identity, every chunk hash, and which chunks the peer holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    #[serde(flatten)]
    pub info: FileInfo,
    /// The publisher's version stamp, milliseconds since the Unix epoch (a seeder uses the
    /// file's mtime; a follower keeps the stamp of the version it downloaded). Absent means 0,
    /// older than any stamped version.
    #[serde(default)]
    pub published: u64,
    pub hashes: HashList,
    /// Chunks held; absent means all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub have: Option<WireBits>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub peer_id: u64,
    pub token: String,
    /// How often to send 7 announce, in milliseconds; a peer silent for about three intervals
    /// is forgotten.
    pub announce_interval_ms: u64,
    /// The address the tracker will give out for this peer.
    pub addr: String,
    pub files: Vec<FileVerdict>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVerdict {
    pub name: String,
    pub accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// 2 file list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    /// The cluster secret, when the tracker has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// List every version of every name (newest first within a name) instead of only the
    /// newest version of each name.
    #[serde(default, skip_serializing_if = "is_false")]
    pub versions: bool,
}

/// Lets a `false` flag stay off the wire, so a request without it reads as before.
fn is_false(flag: &bool) -> bool {
    !flag
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListReply {
    pub files: Vec<FileSummary>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    #[serde(flatten)]
    pub info: FileInfo,
    pub chunks: u64,
    /// Peers holding at least one chunk.
    pub peers: u64,
    /// Peers holding every chunk.
    pub seeders: u64,
    /// The version's stamp (see [`FileOffer::published`]).
    #[serde(default)]
    pub published: u64,
    /// Whether this is the newest version of its name (see [`version_key`]).
    #[serde(default)]
    pub latest: bool,
}

/// 3 file locations: who holds which chunks of `file`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locations {
    pub file: String,
    /// The version wanted; absent means the newest version of `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Hash>,
    /// Also send the chunk hash list (needed once per download).
    #[serde(default)]
    pub hashes: bool,
    /// Leave this peer out of the answer (the asker itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<u64>,
    /// At most this many holders (the tracker also applies its own cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub want: Option<u32>,
    /// The cluster secret, when the tracker has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationsReply {
    /// The version answered: its digest is the one asked for, or the newest one's.
    pub file: FileInfo,
    /// That version's stamp.
    #[serde(default)]
    pub published: u64,
    pub chunks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<HashList>,
    /// How many peers hold any chunk (the sample below may be smaller).
    pub total_peers: u64,
    pub peers: Vec<Holder>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub addr: String,
    pub name: String,
    pub have: WireBits,
}

/// 4 chunk register: the peer now holds (verified) these chunks of `file`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRegister {
    pub peer_id: u64,
    pub token: String,
    pub file: String,
    /// The version the chunks belong to; absent means the newest version of `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Hash>,
    pub chunks: Vec<u32>,
}

/// Reply to 4: how many of the chunks were new to the tracker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunksRecorded {
    pub recorded: u64,
}

/// 5 chunk request (peer to peer). The reply is a [`ChunkHeader`] line then `length` raw bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub file: String,
    pub index: u32,
    /// The version wanted; absent means the version this peer offers under `file`. A peer
    /// holding another version answers `unknown_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Hash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The requester's own peer id, so that an origin in initial seeding can serve a chunk
    /// again to the peer it sent it to (which lost it) and refer others elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<u64>,
}

/// 10 have (peer to peer): "answer once you hold more than `held` chunks of this version, or
/// after `wait_ms`". The reply is a [`HaveReply`]. A downloader sends it to a holder it has
/// nothing left to ask, instead of polling the tracker for that holder's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveRequest {
    pub file: String,
    pub digest: Hash,
    /// How many chunks the requester knows this holder holds.
    pub held: u64,
    /// How long the holder may wait for more, in milliseconds (it caps this at
    /// [`MAX_HAVE_WAIT_MS`]); 0 answers at once.
    pub wait_ms: u64,
    /// The chunks the requester lacks and does not know this holder holds: with it, the holder
    /// answers once it holds one of them, not once it holds more than `held`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub want: Option<WireBits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Longest wait a holder grants a message 10, in milliseconds.
pub const MAX_HAVE_WAIT_MS: u64 = 10_000;

/// Reply to 10: every chunk of the version the holder holds now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveReply {
    pub file: String,
    pub held: u64,
    pub have: WireBits,
}

impl HaveReply {
    /// Bytes of the bitfield of a file of `chunks` chunks in a reply line (base64).
    pub fn bitfield_bytes(chunks: u64) -> usize {
        (chunks.div_ceil(8).div_ceil(3) * 4) as usize
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    pub file: String,
    pub index: u32,
    pub length: u32,
    pub hash: Hash,
}

/// 6 leave and 7 announce: the peer's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuth {
    pub peer_id: u64,
    pub token: String,
}

/// 8 withdraw: this peer no longer holds this version of `file`. A version no peer holds
/// leaves the index. The reply is [`Acknowledged`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdraw {
    pub peer_id: u64,
    pub token: String,
    pub file: String,
    pub digest: Hash,
}

/// 9 origin: a file fetched from an HTTP origin, before its digest is known. It is identified
/// by its name, size and origin `validator` (ETag or Last-Modified). The peer publishes the
/// hash of each chunk it fetched from the origin, renews its claims, and asks for up to `want`
/// more chunks to fetch. The reply is [`OriginGrant`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginClaim {
    pub peer_id: u64,
    pub token: String,
    pub file: String,
    pub size: u64,
    pub validator: String,
    /// The chunk size this peer would cut the file into; the first claim of a file sets it.
    pub chunk_size: u32,
    /// The version stamp the file gets once complete (see [`FileOffer::published`]): the
    /// origin's Last-Modified, else the time of the claim. The first claim of a file sets it.
    #[serde(default)]
    pub published: u64,
    /// Chunks this peer fetched from the origin and now holds, with their hashes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hashes: Vec<ChunkHash>,
    /// How many more chunks this peer would fetch from the origin now.
    #[serde(default)]
    pub want: u32,
    /// How many chunks this peer would fetch from other peers now (chunks whose hash is known
    /// and that another peer holds); the reply's `sources` say which and where.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fetch: u32,
    /// This peer gives the file up (its pull failed): its claims end, and the chunks only it
    /// published lose their hash and are granted again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub abandon: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHash {
    pub index: u32,
    pub hash: Hash,
}

/// A chunk of an origin file to fetch from another peer (message 5 without `digest`), and the
/// hash it must have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSource {
    pub index: u32,
    pub hash: Hash,
    pub addr: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Reply to 9. Once every chunk hash is known, `digest` is set: the file is then an ordinary
/// version (name, digest) and is fetched like any other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginGrant {
    /// The chunk size of the file (set by its first claim); use this one.
    pub chunk_size: u32,
    pub chunks: u64,
    /// Chunks whose hash is known.
    pub known: u64,
    /// Chunks this peer may now fetch from the origin, and must publish within `claim_ms`.
    #[serde(default)]
    pub granted: Vec<u32>,
    /// Published chunks whose hash differs from the one published first: not recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<u32>,
    /// Chunks to fetch from other peers while the origin transfer runs (see
    /// [`OriginClaim::fetch`]), in index order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<ChunkSource>,
    /// How long a claim lasts unless renewed by another message 9 of its holder.
    pub claim_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Hash>,
}

/// Reply to 6, 7 and 8.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledged {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_interval_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info() -> FileInfo {
        FileInfo {
            name: "movie.bin".into(),
            size: 2_500_000,
            chunk_size: 1 << 20,
            digest: Hash([7; 32]),
        }
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(msg: Msg, body: T) {
        let line = encode_request(msg, &body);
        let (m, _) = decode_envelope(&line).unwrap();
        assert_eq!(m, msg);
        assert_eq!(decode_body::<T>(&line).unwrap(), body);
        let reply = encode_reply(msg, &body);
        assert_eq!(decode_reply::<T>(msg, &reply).unwrap(), body);
    }

    #[test]
    fn every_message_round_trips() {
        let offer = FileOffer {
            info: info(),
            published: 1_700_000_000_000,
            hashes: HashList(vec![Hash([1; 32]); 3]),
            have: Some(WireBits(vec![0xa0])),
        };
        let register = Register {
            name: "p1".into(),
            addr: "0.0.0.0:7401".into(),
            secret: Some("s".into()),
            peer_id: None,
            token: None,
            files: vec![offer],
        };
        round_trip(Msg::Register, register);
        round_trip(
            Msg::FileList,
            FileList {
                secret: Some("s".into()),
                versions: true,
            },
        );
        round_trip(
            Msg::Locations,
            Locations {
                file: "a".into(),
                digest: Some(Hash([4; 32])),
                hashes: true,
                peer_id: Some(3),
                want: Some(5),
                secret: None,
            },
        );
        round_trip(
            Msg::ChunkRegister,
            ChunkRegister {
                peer_id: 1,
                token: "t".into(),
                file: "a".into(),
                digest: Some(Hash([4; 32])),
                chunks: vec![0, 2],
            },
        );
        round_trip(
            Msg::ChunkRequest,
            ChunkRequest {
                file: "a".into(),
                index: 4,
                digest: Some(Hash([4; 32])),
                secret: None,
                peer_id: Some(2),
            },
        );
        round_trip(
            Msg::Leave,
            PeerAuth {
                peer_id: 9,
                token: "t".into(),
            },
        );
        round_trip(
            Msg::Locations,
            LocationsReply {
                file: info(),
                published: 1_700_000_000_000,
                chunks: 3,
                hashes: None,
                total_peers: 1,
                peers: vec![Holder {
                    addr: "10.0.0.1:7401".into(),
                    name: "p".into(),
                    have: WireBits(vec![0xe0]),
                }],
            },
        );
        round_trip(
            Msg::FileList,
            FileListReply {
                files: vec![FileSummary {
                    info: info(),
                    chunks: 3,
                    peers: 2,
                    seeders: 1,
                    published: 1_700_000_000_000,
                    latest: true,
                }],
            },
        );
        round_trip(
            Msg::Withdraw,
            Withdraw {
                peer_id: 9,
                token: "t".into(),
                file: "models/a.bin".into(),
                digest: Hash([4; 32]),
            },
        );
        round_trip(
            Msg::Origin,
            OriginClaim {
                peer_id: 9,
                token: "t".into(),
                file: "models/a.bin".into(),
                size: 3 << 20,
                validator: "\"abc\"".into(),
                chunk_size: 1 << 20,
                published: 1_700_000_000_000,
                hashes: vec![ChunkHash {
                    index: 1,
                    hash: Hash([3; 32]),
                }],
                want: 4,
                fetch: 2,
                abandon: true,
            },
        );
        round_trip(
            Msg::Origin,
            OriginGrant {
                chunk_size: 1 << 20,
                chunks: 3,
                known: 1,
                granted: vec![0, 2],
                refused: vec![],
                sources: vec![ChunkSource {
                    index: 1,
                    hash: Hash([3; 32]),
                    addr: "10.0.0.2:7401".into(),
                }],
                claim_ms: 3000,
                digest: Some(Hash([5; 32])),
            },
        );
        round_trip(
            Msg::Have,
            HaveRequest {
                file: "models/a.bin".into(),
                digest: Hash([4; 32]),
                held: 3,
                wait_ms: 1000,
                want: Some(WireBits(vec![0x0f])),
                secret: None,
            },
        );
        round_trip(
            Msg::Have,
            HaveReply {
                file: "models/a.bin".into(),
                held: 4,
                have: WireBits(vec![0xf0]),
            },
        );
        round_trip(
            Msg::ChunkRequest,
            ChunkHeader {
                file: "a".into(),
                index: 1,
                length: 10,
                hash: Hash([2; 32]),
            },
        );
    }

    #[test]
    fn refusal_round_trips_with_code() {
        let r = Refusal::new(ErrorCode::Conflict, "different content");
        let line = encode_refusal(1, &r);
        assert_eq!(decode_reply::<Registered>(Msg::Register, &line), Err(r));
        let text = String::from_utf8(line).unwrap();
        assert!(text.contains(r#""error":"conflict""#), "{text}");
    }

    #[test]
    fn refusals_sent_before_reading_the_request_keep_their_code() {
        let busy = encode_refusal(0, &Refusal::new(ErrorCode::Busy, "full"));
        let got = decode_reply::<FileListReply>(Msg::FileList, &busy).unwrap_err();
        assert_eq!(got.code, ErrorCode::Busy);
    }

    #[test]
    fn hex_hashes_are_exactly_64_hex_digits() {
        let plus = format!("+a{}", "0".repeat(62));
        assert_eq!(Hash::from_hex(&plus), None);
        assert_eq!(Hash::from_hex(&"AB".repeat(32)), Some(Hash([0xab; 32])));
        assert_eq!(Hash::from_hex(&"g0".repeat(32)), None);
    }

    #[test]
    fn envelope_refuses_garbage_versions_and_unknown_messages() {
        assert_eq!(
            decode_envelope(b"hello").unwrap_err().1.code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            decode_envelope(br#"{"v":1}"#).unwrap_err().1.code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            decode_envelope(br#"{"v":2,"msg":1}"#).unwrap_err().1.code,
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            decode_envelope(br#"{"v":1,"msg":99}"#).unwrap_err(),
            (
                99,
                Refusal::new(ErrorCode::UnknownMsg, "unknown message 99")
            )
        );
        assert_eq!(
            decode_envelope(br#"{"v":1,"msg":-1}"#).unwrap_err().1.code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn json_that_is_not_an_object_is_not_a_frame() {
        for line in ["[1,2,3]", "[1,1]", "7", "\"v\"", "null", "true", "[]"] {
            let (n, refusal) = decode_envelope(line.as_bytes()).unwrap_err();
            assert_eq!((n, refusal.code), (0, ErrorCode::BadRequest), "{line}");
            let reply = decode_reply::<Acknowledged>(Msg::Leave, line.as_bytes()).unwrap_err();
            assert_eq!(reply.code, ErrorCode::BadRequest, "{line}");
        }
        let (_, refusal) = decode_envelope(b"[1,2,3]").unwrap_err();
        assert!(
            refusal.message.contains("expected a JSON object"),
            "{refusal}"
        );
    }

    #[test]
    fn any_version_but_1_is_unsupported_and_a_missing_one_is_malformed() {
        for v in [
            "2", "-1", "0", "1.5", "1.0", "1e0", "\"1\"", "[1]", "{}", "true",
        ] {
            let line = format!(r#"{{"v":{v},"msg":2}}"#);
            let (n, refusal) = decode_envelope(line.as_bytes()).unwrap_err();
            assert_eq!((n, refusal.code), (2, ErrorCode::UnsupportedVersion), "{v}");
        }
        // The version is checked before anything else of the envelope.
        let (n, refusal) = decode_envelope(br#"{"v":-1,"msg":"two"}"#).unwrap_err();
        assert_eq!((n, refusal.code), (0, ErrorCode::UnsupportedVersion));
        let long = format!(r#"{{"v":"{}","msg":3}}"#, "x".repeat(1000));
        let (_, refusal) = decode_envelope(long.as_bytes()).unwrap_err();
        assert!(refusal.message.len() < 120, "{refusal}");
        for line in [r#"{"msg":2}"#, r#"{"v":null,"msg":2}"#] {
            let (n, refusal) = decode_envelope(line.as_bytes()).unwrap_err();
            assert_eq!((n, refusal.code), (2, ErrorCode::BadRequest), "{line}");
        }
        let reply = br#"{"v":2,"msg":7,"ok":true,"announce_interval_ms":5}"#;
        let refused = decode_reply::<Acknowledged>(Msg::Announce, reply).unwrap_err();
        assert_eq!(refused.code, ErrorCode::UnsupportedVersion);
    }

    #[test]
    fn bodies_refuse_wrong_types_and_negative_numbers() {
        let bad = br#"{"v":1,"msg":5,"file":"a","index":-3}"#;
        assert_eq!(
            decode_body::<ChunkRequest>(bad).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let huge = br#"{"v":1,"msg":5,"file":"a","index":99999999999999999999}"#;
        assert_eq!(
            decode_body::<ChunkRequest>(huge).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let wrong = br#"{"v":1,"msg":5,"file":7,"index":1}"#;
        assert_eq!(
            decode_body::<ChunkRequest>(wrong).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    fn refused_because(name: &str) -> String {
        match validate_name(name) {
            Err(r) => {
                assert_eq!(r.code, ErrorCode::InvalidName, "{name:?}");
                r.message
            }
            Ok(()) => panic!("{name:?} accepted"),
        }
    }

    #[test]
    fn names_are_relative_paths_of_safe_components() {
        for good in [
            "movie.bin",
            "a b",
            "été.txt",
            "models/llama-3/shard-00001.safetensors",
            "a/b..c",
        ] {
            assert!(validate_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn names_refuse_empty_and_absolute_paths() {
        assert!(refused_because("").contains("empty"));
        assert!(refused_because("/etc/passwd").contains("absolute"));
    }

    #[test]
    fn names_refuse_empty_components() {
        for bad in ["a//b", "a/", "a/b/"] {
            assert!(refused_because(bad).contains("empty component"), "{bad:?}");
        }
    }

    #[test]
    fn names_refuse_dot_components() {
        for bad in [
            "..", ".", ".hidden", "../x", "a/../b", "a/./b", "a/.b", "a/..",
        ] {
            assert!(
                refused_because(bad).contains("starting with '.'"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_refuse_backslashes_and_control_characters() {
        for bad in [
            "a\\b",
            "x\\..",
            "nul\0",
            "a/nul\0b",
            "tab\t",
            "line\nbreak",
            "del\u{7f}",
        ] {
            assert!(refused_because(bad).contains("contains"), "{bad:?}");
        }
    }

    #[test]
    fn names_and_components_are_bounded() {
        let component = "x".repeat(MAX_COMPONENT_BYTES);
        assert!(validate_name(&component).is_ok());
        assert!(refused_because(&format!("{component}x")).contains("component longer"));
        let path = [component.as_str(); 4].join("/");
        assert_eq!(path.len(), MAX_NAME_BYTES - 4 + 3);
        assert!(validate_name(&path).is_ok());
        let long = format!("{path}/abcdefg");
        assert!(long.len() > MAX_NAME_BYTES);
        assert!(refused_because(&long).contains("longer than 1024"));
    }

    #[test]
    fn newer_versions_have_higher_stamps_then_higher_digests() {
        let old = version_key(1_000, Hash([9; 32]));
        let new = version_key(2_000, Hash([1; 32]));
        assert!(new > old, "a later stamp wins over a higher digest");
        let low = version_key(5, Hash([1; 32]));
        let high = version_key(5, Hash([2; 32]));
        assert!(high > low, "equal stamps: the higher digest wins");
        let a = Hash::from_hex(&format!("0f{}", "0".repeat(62))).unwrap();
        let b = Hash::from_hex(&format!("a0{}", "0".repeat(62))).unwrap();
        assert_eq!(a < b, a.to_hex() < b.to_hex(), "digest order is hex order");
    }

    #[test]
    fn fields_added_in_revision_two_are_optional_on_the_wire() {
        let old_list = br#"{"v":1,"msg":2}"#;
        assert!(!decode_body::<FileList>(old_list).unwrap().versions);
        let old_locate = br#"{"v":1,"msg":3,"file":"a"}"#;
        assert_eq!(decode_body::<Locations>(old_locate).unwrap().digest, None);
        let old_request = br#"{"v":1,"msg":5,"file":"a","index":0}"#;
        assert_eq!(
            decode_body::<ChunkRequest>(old_request).unwrap().digest,
            None
        );
        let unflagged = encode_request(Msg::FileList, &FileList::default());
        assert_eq!(unflagged, br#"{"v":1,"msg":2}"#.to_vec());
    }

    #[test]
    fn chunk_spans_cover_the_file() {
        let f = info();
        assert_eq!(f.chunks(), 3);
        assert_eq!(f.chunk_span(0), (0, 1 << 20));
        assert_eq!(f.chunk_span(2), (2 << 20, 2_500_000 - (2 << 20)));
    }

    #[test]
    fn error_code_names_match_their_wire_form() {
        use ErrorCode::*;
        let all = [
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
        for code in all {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    proptest! {
        #[test]
        fn hash_hex_round_trips(bytes in any::<[u8; 32]>()) {
            let h = Hash(bytes);
            prop_assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        }

        #[test]
        fn decoders_never_panic(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_envelope(&line);
            let _ = decode_body::<Register>(&line);
            let _ = decode_body::<Withdraw>(&line);
            let _ = decode_reply::<LocationsReply>(Msg::Locations, &line);
        }

        #[test]
        fn chunk_register_round_trips(id in any::<u64>(), chunks in proptest::collection::vec(any::<u32>(), 0..50)) {
            let body = ChunkRegister { peer_id: id, token: "t".into(), file: "f".into(), digest: None, chunks };
            let line = encode_request(Msg::ChunkRegister, &body);
            prop_assert_eq!(decode_body::<ChunkRegister>(&line).unwrap(), body);
        }
    }
}
