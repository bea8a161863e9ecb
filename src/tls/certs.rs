//! Throwaway certificates for demos and tests (rcgen): a fresh CA and certificates it signs,
//! written as PEM files. Real clusters get theirs from their own CA (cert-manager in Kubernetes).

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::Path;

/// A certificate authority whose key lives only in memory.
pub struct Authority {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Authority> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM: what `SHOAL_TLS_CA` points at.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `names` (DNS names or IP addresses, as subject alternative names),
    /// good for both server and client authentication, with a fresh key.
    pub fn issue(&self, names: &[String]) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(names.to_vec())
            .with_context(|| format!("{names:?} are not DNS names or IP addresses"))?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes `STEM.pem` and `STEM.key` (the key readable by its owner only) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<()> {
        write(&dir.join(format!("{stem}.pem")), &self.cert, 0o644)?;
        write(&dir.join(format!("{stem}.key")), &self.key, 0o600)
    }
}

/// Writes `text` to `path` through a temporary name and a rename, so a program reloading the
/// file never reads half of it.
pub fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `gen-certs DIR STEM=NAME,NAME...`: a fresh CA in `DIR/ca.pem` and, per spec, `STEM.pem`
/// and `STEM.key` for those names. The CA's key is not kept: the set is for one demo.
pub fn generate(dir: &Path, specs: &[String]) -> anyhow::Result<()> {
    let mut parsed = Vec::new();
    for spec in specs {
        let (stem, names) = spec
            .split_once('=')
            .filter(|(stem, names)| !stem.is_empty() && !names.is_empty())
            .with_context(|| {
                format!("{spec:?} is not STEM=NAME[,NAME...], e.g. tracker=tracker,127.0.0.1")
            })?;
        anyhow::ensure!(
            stem.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{stem:?}: a file stem is letters, digits, '-' and '_'"
        );
        let names: Vec<String> = names.split(',').map(|n| n.trim().to_string()).collect();
        parsed.push((stem, names));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = Authority::new("Shoal throwaway CA")?;
    write(&dir.join("ca.pem"), ca.pem(), 0o644)?;
    for (stem, names) in parsed {
        ca.issue(&names)?.write(dir, stem)?;
    }
    Ok(())
}
