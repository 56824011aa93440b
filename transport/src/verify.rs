//! Client-side verification of the server certificate for each `Expect`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use crate::pki::{dns_names, sha256_hex, Identity};

#[derive(Debug)]
pub(crate) enum Mode {
    /// Exactly this SAN DNS name, chained to the roots, and with a serial
    /// given, exactly that certificate.
    Name(Arc<WebPkiServerVerifier>, String, Option<String>),
    /// Any node name, chained to the roots.
    AnyNode(Arc<WebPkiServerVerifier>),
    /// The chain must carry a CA with this SHA-256 (lowercase hex); that CA
    /// then acts as the only root.
    CaFingerprint(String),
}

#[derive(Debug)]
pub(crate) struct FerryServerVerifier {
    mode: Mode,
    provider: Arc<CryptoProvider>,
}

impl FerryServerVerifier {
    pub(crate) fn new(mode: Mode, provider: Arc<CryptoProvider>) -> FerryServerVerifier {
        FerryServerVerifier { mode, provider }
    }

    fn webpki(&self, roots: RootCertStore) -> Result<Arc<WebPkiServerVerifier>, Error> {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Error::General(format!("could not build the certificate verifier: {e}")))
    }
}

/// The node DNS name in a certificate, so the standard name check can be
/// reused for "any node" (it still rejects admin and foreign names).
fn node_dns_name(end_entity: &CertificateDer<'_>) -> Result<String, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let name = dns_names(&cert)
        .find(|dns| matches!(Identity::from_dns_name(dns), Some(Identity::Node(_))))
        .map(str::to_string);
    name.ok_or(Error::InvalidCertificate(CertificateError::NotValidForName))
}

/// The server's certificate must be the one recorded for the member: a
/// certificate the CA signed later for the same name (a member gone rogue)
/// is refused.
fn check_serial(end_entity: &CertificateDer<'_>, serial: &str, dns: &str) -> Result<(), Error> {
    let got = crate::pki::PeerCert::from_der(end_entity)
        .map(|c| c.serial)
        .ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if got == serial {
        Ok(())
    } else {
        Err(Error::General(format!(
            "the server's certificate {got} is not the one recorded for {dns} ({serial})"
        )))
    }
}

fn server_name(dns: String) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(dns)
        .map_err(|_| Error::InvalidCertificate(CertificateError::NotValidForName))
}

impl ServerCertVerifier for FerryServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The name the caller passed to connect is ignored: the mode is the
        // single source of what this connection must reach.
        let (inner, expected) = match &self.mode {
            Mode::Name(inner, dns, serial) => {
                if let Some(serial) = serial {
                    check_serial(end_entity, serial, dns)?;
                }
                (inner.clone(), dns.clone())
            }
            Mode::AnyNode(inner) => (inner.clone(), node_dns_name(end_entity)?),
            Mode::CaFingerprint(fingerprint) => {
                let ca = intermediates
                    .iter()
                    .find(|cert| sha256_hex(cert) == *fingerprint)
                    .ok_or_else(|| {
                        Error::General(format!(
                            "the server's certificate chain has no CA with fingerprint \
                             {fingerprint}; the address is not a member of the cluster \
                             the join token was made for"
                        ))
                    })?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                (self.webpki(roots)?, node_dns_name(end_entity)?)
            }
        };
        inner.verify_server_cert(
            end_entity,
            intermediates,
            &server_name(expected)?,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
