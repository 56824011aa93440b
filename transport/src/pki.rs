use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;

const NODE_SUFFIX: &str = ".node.ferry";
const ADMIN_NAME: &str = "admin.client.ferry";
const CA_COMMON_NAME: &str = "ferry cluster CA";
/// Serials are this long so that formatting a peer's serial can restore the
/// leading zero bytes DER drops, making `PeerCert::serial == new_serial()`.
const SERIAL_BYTES: usize = 16;
/// RFC 5280 caps serials at 20 octets.
const MAX_SERIAL_BYTES: usize = 20;
const TEN_YEARS: Duration = Duration::from_secs(3653 * 24 * 3600);
/// Tolerates clocks of freshly issued peers running a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "invalid node name {name:?}: {why}; use 1 to 63 characters of a-z, 0-9 and '-', \
         not starting or ending with '-'"
    )]
    InvalidNodeName { name: String, why: &'static str },
    #[error(
        "invalid certificate serial {serial:?}: {why}; generate serials with pki::new_serial()"
    )]
    InvalidSerial { serial: String, why: &'static str },
    #[error("could not {action}: {source}")]
    Rcgen {
        action: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("could not parse the {what}: {detail}; check that it is an unmodified PEM file")]
    BadPem { what: &'static str, detail: String },
    #[error(
        "the CA key does not belong to the CA certificate; \
         restore the matching ca.key and ca.crt pair"
    )]
    CaKeyMismatch,
    #[error("the CA certificate is not a CA (no basicConstraints CA flag); restore the cluster CA certificate")]
    NotCa,
    #[error("the system clock reads before 1970; fix the clock before issuing certificates")]
    Clock,
}

fn rcgen_err(action: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { action, source }
}

/// Who a certificate speaks for. The name is carried as a SAN DNS name so
/// standard TLS name checks pin a connection to one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Node(String),
    Admin,
}

impl Identity {
    /// The certificate SAN DNS name for this identity.
    pub fn dns_name(&self) -> Result<String, PkiError> {
        match self {
            Identity::Node(name) => {
                validate_node_name(name)?;
                Ok(format!("{name}{NODE_SUFFIX}"))
            }
            Identity::Admin => Ok(ADMIN_NAME.to_string()),
        }
    }

    /// Inverse of `dns_name`; `None` for names ferry never issues.
    pub fn from_dns_name(dns: &str) -> Option<Identity> {
        if dns == ADMIN_NAME {
            return Some(Identity::Admin);
        }
        let name = dns.strip_suffix(NODE_SUFFIX)?;
        validate_node_name(name).ok()?;
        Some(Identity::Node(name.to_string()))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(name) => write!(f, "node {name}"),
            Identity::Admin => f.write_str("admin"),
        }
    }
}

/// Node names end up in DNS SANs and file names, hence the narrow alphabet.
pub fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let bad = |why| {
        Err(PkiError::InvalidNodeName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("it contains a character other than a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it starts or ends with '-'");
    }
    Ok(())
}

/// A certificate, its private key and the CA that signed it, all PEM.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

/// The cluster certificate authority: signs every node and admin certificate.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    fingerprint: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA, valid for ten years.
    pub fn generate() -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate the CA key pair"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&serial_bytes()));
        set_validity(&mut params)?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign the CA certificate"))?;
        ClusterCa::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Load a CA saved with `cert_pem()` and `key_pem()`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let der = cert_der_from_pem(cert_pem, "CA certificate")?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadPem {
            what: "CA private key",
            detail: e.to_string(),
        })?;
        {
            let (_, cert) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::BadPem {
                    what: "CA certificate",
                    detail: e.to_string(),
                })?;
            if !cert.is_ca() {
                return Err(PkiError::NotCa);
            }
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(PkiError::CaKeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(rcgen_err("use the CA certificate as issuer"))?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            fingerprint: sha256_hex(&der),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Hex SHA-256 of the CA certificate DER; what join tokens carry.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// New key pair + certificate for `identity`, with the given hex serial
    /// (see `new_serial()`).
    pub fn issue(&self, identity: &Identity, serial: &str) -> Result<Credentials, PkiError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate a key pair"))?;
        let params = leaf_params(identity, serial)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("sign the certificate"))?;
        Ok(Credentials {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Sign a CSR (PEM) from a joiner. The certificate's names come from
    /// `identity`, not from the CSR: only the CSR's public key is used, so a
    /// joiner cannot ask for a name or usage it was not granted.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        serial: &str,
    ) -> Result<String, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadPem {
                what: "certificate signing request",
                detail: e.to_string(),
            })?;
        let params = leaf_params(identity, serial)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rcgen_err("sign the certificate request"))?;
        Ok(cert.pem())
    }
}

fn leaf_params(identity: &Identity, serial: &str) -> Result<CertificateParams, PkiError> {
    let dns = identity.dns_name()?;
    let serial = parse_serial(serial)?;
    let mut params = CertificateParams::new(vec![dns.clone()])
        .map_err(rcgen_err("build certificate parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, dns);
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity {
        Identity::Node(_) => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Identity::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params)?;
    Ok(params)
}

/// Sets now-1h .. now+10y. Takes the params because rcgen's time type is
/// not re-exported and naming it would need a direct `time` dependency.
fn set_validity(params: &mut CertificateParams) -> Result<(), PkiError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::Clock)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + TEN_YEARS;
    Ok(())
}

/// The serial as bytes, enforcing the canonical text form so that the serial
/// recorded at issue time is exactly what `peer_cert` reports later
/// (revocation compares these strings).
fn parse_serial(serial: &str) -> Result<Vec<u8>, PkiError> {
    let bad = |why| {
        Err(PkiError::InvalidSerial {
            serial: serial.to_string(),
            why,
        })
    };
    let Ok(bytes) = hex::decode(serial) else {
        return bad("it is not an even number of hex digits");
    };
    if bytes.len() > MAX_SERIAL_BYTES {
        return bad("it is longer than 20 bytes");
    }
    if bytes.iter().all(|&b| b == 0) {
        return bad("it is zero");
    }
    if format_serial(&bytes) != serial {
        return bad("it is not in canonical form (lowercase, 16 bytes unless longer)");
    }
    Ok(bytes)
}

/// Lowercase hex without DER's sign/leading zero bytes, left-padded to
/// `SERIAL_BYTES` so values from `new_serial()` round-trip unchanged.
fn format_serial(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    let significant = &raw[start..];
    let mut padded = vec![0u8; SERIAL_BYTES.saturating_sub(significant.len())];
    padded.extend_from_slice(significant);
    hex::encode(padded)
}

fn fill_random(buf: &mut [u8]) {
    // Without an OS random source no key or token can be made safely, and
    // there is no way to continue; this is not input-dependent.
    #[allow(clippy::expect_used)]
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the operating system's random number generator failed");
}

fn serial_bytes() -> [u8; SERIAL_BYTES] {
    loop {
        let mut bytes = [0u8; SERIAL_BYTES];
        fill_random(&mut bytes);
        // A positive INTEGER in DER; the all-zero serial is not allowed.
        bytes[0] &= 0x7f;
        if bytes.iter().any(|&b| b != 0) {
            return bytes;
        }
    }
}

/// A random 16-byte hex serial, high bit cleared so it is a positive integer.
pub fn new_serial() -> String {
    format_serial(&serial_bytes())
}

/// A key pair and a CSR for `identity`, for a joiner to send to a member.
pub fn generate_csr(identity: &Identity) -> Result<(String, String), PkiError> {
    let dns = identity.dns_name()?;
    let key = KeyPair::generate().map_err(rcgen_err("generate a key pair"))?;
    let mut params =
        CertificateParams::new(vec![dns.clone()]).map_err(rcgen_err("build CSR parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, dns);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(rcgen_err("create the certificate signing request"))?;
    let csr_pem = csr.pem().map_err(rcgen_err("encode the CSR as PEM"))?;
    Ok((csr_pem, key.serialize_pem()))
}

/// Hex SHA-256 of the DER of the first certificate in `cert_pem`.
pub fn fingerprint_of_pem(cert_pem: &str) -> Result<String, PkiError> {
    Ok(sha256_hex(&cert_der_from_pem(cert_pem, "certificate")?))
}

/// The serial of the first certificate in `cert_pem`, as [`PeerCert`]
/// reports it.
pub fn serial_of_pem(cert_pem: &str) -> Result<String, PkiError> {
    let der = cert_der_from_pem(cert_pem, "certificate")?;
    PeerCert::from_der(&der)
        .map(|c| c.serial)
        .ok_or_else(|| PkiError::BadPem {
            what: "certificate",
            detail: "no ferry identity in it".into(),
        })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// 64 bits of OS randomness (request ids).
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    fill_random(&mut buf);
    u64::from_le_bytes(buf)
}

/// `n_bytes` of OS randomness as lowercase hex (tokens, nonces).
pub fn random_hex(n_bytes: usize) -> String {
    let mut buf = vec![0u8; n_bytes];
    fill_random(&mut buf);
    hex::encode(buf)
}

pub(crate) fn cert_der_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem {
        what,
        detail: e.to_string(),
    })
}

/// What a verified peer certificate says: who it is and which serial (for
/// revocation checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    pub identity: Identity,
    pub serial: String,
}

impl PeerCert {
    /// `None` when the certificate does not parse or names no ferry identity.
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let identity = dns_names(&cert).find_map(Identity::from_dns_name)?;
        Some(PeerCert {
            identity,
            serial: format_serial(cert.raw_serial()),
        })
    }
}

/// SAN DNS names of a parsed certificate.
pub(crate) fn dns_names<'a>(
    cert: &'a x509_parser::certificate::X509Certificate<'a>,
) -> impl Iterator<Item = &'a str> + 'a {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_der(pem: &str) -> CertificateDer<'static> {
        cert_der_from_pem(pem, "test certificate").unwrap()
    }

    #[test]
    fn node_names_are_validated() {
        for ok in ["a", "node-1", "0", &"a".repeat(63)] {
            assert!(validate_node_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "ä", &"a".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_serial_is_positive_16_bytes_and_canonical() {
        for _ in 0..64 {
            let serial = new_serial();
            assert_eq!(serial.len(), 32);
            let bytes = hex::decode(&serial).unwrap();
            assert!(bytes[0] < 0x80);
            assert_eq!(parse_serial(&serial).unwrap(), bytes);
        }
        assert!(parse_serial("ABCD").is_err());
        assert!(parse_serial("00").is_err());
        assert!(parse_serial("xyz").is_err());
    }

    #[test]
    fn serial_with_leading_zero_bytes_round_trips_through_a_certificate() {
        let ca = ClusterCa::generate().unwrap();
        let serial = format!("0000{}", "ab".repeat(14));
        let creds = ca.issue(&Identity::Node("a".into()), &serial).unwrap();
        let peer = PeerCert::from_der(&leaf_der(&creds.cert_pem)).unwrap();
        assert_eq!(peer.serial, serial);
    }

    #[test]
    fn peer_cert_reports_identity_and_issued_serial() {
        let ca = ClusterCa::generate().unwrap();
        let serial = new_serial();
        let node = ca.issue(&Identity::Node("alpha".into()), &serial).unwrap();
        let peer = PeerCert::from_der(&leaf_der(&node.cert_pem)).unwrap();
        assert_eq!(peer.identity, Identity::Node("alpha".into()));
        assert_eq!(peer.serial, serial);

        let admin_serial = new_serial();
        let admin = ca.issue(&Identity::Admin, &admin_serial).unwrap();
        let peer = PeerCert::from_der(&leaf_der(&admin.cert_pem)).unwrap();
        assert_eq!(peer.identity, Identity::Admin);
        assert_eq!(peer.serial, admin_serial);
    }

    #[test]
    fn sign_csr_ignores_names_in_the_csr() {
        let ca = ClusterCa::generate().unwrap();
        let (csr, _key) = generate_csr(&Identity::Admin).unwrap();
        let serial = new_serial();
        let cert = ca
            .sign_csr(&csr, &Identity::Node("joiner".into()), &serial)
            .unwrap();
        let der = leaf_der(&cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names: Vec<&str> = dns_names(&parsed).collect();
        assert_eq!(names, vec!["joiner.node.ferry"]);
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    }

    #[test]
    fn sign_csr_rejects_garbage() {
        let ca = ClusterCa::generate().unwrap();
        let err = ca
            .sign_csr("not a csr", &Identity::Node("a".into()), &new_serial())
            .unwrap_err();
        assert!(matches!(err, PkiError::BadPem { .. }), "{err}");
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_fingerprint() {
        let ca = ClusterCa::generate().unwrap();
        let again = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(fingerprint_of_pem(ca.cert_pem()).unwrap(), ca.fingerprint());
        let other = ClusterCa::generate().unwrap();
        assert!(matches!(
            ClusterCa::from_pem(ca.cert_pem(), other.key_pem()),
            Err(PkiError::CaKeyMismatch)
        ));
    }

    #[test]
    fn admin_certificate_is_client_auth_only() {
        let ca = ClusterCa::generate().unwrap();
        let admin = ca.issue(&Identity::Admin, &new_serial()).unwrap();
        let der = leaf_der(&admin.cert_pem);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!format!("{admin:?}").contains("PRIVATE KEY"));
    }
}
