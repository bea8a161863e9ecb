//! What a `/v2/` path asks for: the API root, a blob or a manifest, by repository name and
//! digest or tag, with the checks the OCI distribution spec gives for names, tags and (sha256)
//! digests.

use hyper::StatusCode;

/// A sha256 content digest, `sha256:{64 lowercase hex}`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn parse(text: &str) -> Option<Digest> {
        let hex = text.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut bytes = [0; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// What a request asks for, as the metrics label it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Base,
    Blob,
    ManifestDigest,
    ManifestTag,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::Blob => "blob",
            Kind::ManifestDigest => "manifest_digest",
            Kind::ManifestTag => "manifest_tag",
        }
    }

    /// The OCI error code of an object upstream does not have.
    pub fn unknown(self) -> &'static str {
        match self {
            Kind::Blob => "BLOB_UNKNOWN",
            _ => "MANIFEST_UNKNOWN",
        }
    }
}

/// A parsed `/v2/...` path.
pub struct Target<'a> {
    pub kind: Kind,
    pub name: &'a str,
    pub reference: &'a str,
}

impl Target<'_> {
    /// The path of the same object at upstream.
    pub fn upstream_path(&self) -> String {
        match self.kind {
            Kind::Base => "/v2/".to_string(),
            Kind::Blob => format!("/v2/{}/blobs/{}", self.name, self.reference),
            _ => format!("/v2/{}/manifests/{}", self.name, self.reference),
        }
    }
}

/// Why a path is refused: the status, the OCI error code and a message.
pub type Refusal = (StatusCode, &'static str, String);

/// Reads `/v2/`, `/v2/{name}/blobs/{digest}` or `/v2/{name}/manifests/{reference}`.
pub fn parse(path: &str) -> Result<Target<'_>, Refusal> {
    let rest = path.strip_prefix("/v2").unwrap_or(path);
    if rest.is_empty() || rest == "/" {
        return Ok(Target {
            kind: Kind::Base,
            name: "",
            reference: "",
        });
    }
    let rest = rest.trim_start_matches('/');
    let mut parts = rest.rsplitn(3, '/');
    let (reference, what, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(r), Some(w), Some(n)) => (r, w, n),
        _ => return Err(no_endpoint()),
    };
    if !valid_name(name) {
        let why =
            format!("{name:?} is not a repository name (lowercase components separated by '/')");
        return Err((StatusCode::BAD_REQUEST, "NAME_INVALID", why));
    }
    let digest = Digest::parse(reference).is_some();
    let kind = match what {
        "blobs" if digest => Kind::Blob,
        "manifests" if digest => Kind::ManifestDigest,
        "manifests" if valid_tag(reference) => Kind::ManifestTag,
        "blobs" | "manifests" if reference.contains(':') => {
            let why = format!("{reference:?} is not a sha256 digest (sha256: and 64 lowercase hex digits); this mirror serves sha256 content only");
            return Err((StatusCode::BAD_REQUEST, "DIGEST_INVALID", why));
        }
        "manifests" => {
            let why = format!("{reference:?} is not a tag");
            return Err((StatusCode::BAD_REQUEST, "TAG_INVALID", why));
        }
        "blobs" => {
            let why = format!("{reference:?} is not a digest");
            return Err((StatusCode::BAD_REQUEST, "DIGEST_INVALID", why));
        }
        _ => return Err(no_endpoint()),
    };
    Ok(Target {
        kind,
        name,
        reference,
    })
}

fn no_endpoint() -> Refusal {
    let why = "this mirror serves GET /v2/, GET|HEAD /v2/{name}/blobs/{digest} and /v2/{name}/manifests/{reference} only";
    (StatusCode::NOT_FOUND, "UNSUPPORTED", why.to_string())
}

/// A repository name: components of lowercase letters and digits, separated inside by `.`,
/// `_` or `-`, joined by `/`.
fn valid_name(name: &str) -> bool {
    name.len() <= 255
        && name.split('/').all(|c| {
            let edges =
                |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            edges(c.bytes().next())
                && edges(c.bytes().last())
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    #[test]
    fn paths_name_the_repository_kind_and_reference() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let t = parse("/v2/team/app/api/blobs/DIGEST".replace("DIGEST", &d).leak())
            .ok()
            .unwrap();
        assert!(t.kind == Kind::Blob && t.name == "team/app/api" && t.reference == d);
        let t = parse("/v2/library/alpine/manifests/3.20").ok().unwrap();
        assert!(t.kind == Kind::ManifestTag && t.name == "library/alpine");
        assert!(parse("/v2/").ok().unwrap().kind == Kind::Base);
        let bad = |p: &str| parse(p).err().unwrap().0;
        assert_eq!(bad("/v2/Upper/blobs/x"), StatusCode::BAD_REQUEST);
        assert_eq!(bad("/v2/a/blobs/sha256:12"), StatusCode::BAD_REQUEST);
        assert_eq!(bad("/v2/a/blobs/latest"), StatusCode::BAD_REQUEST);
        assert_eq!(bad("/v2/a/tags/list"), StatusCode::NOT_FOUND);
        assert_eq!(bad("/v2/a/../b/manifests/x"), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn digests_are_sha256_in_lowercase_hex() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(d.bytes(), Sha256::digest([]).as_slice());
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert!(Digest::parse(&format!("sha256:{}", hex.to_uppercase())).is_none());
        assert!(Digest::parse(&format!("sha512:{hex}")).is_none());
    }
}
