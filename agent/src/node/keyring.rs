//! The cluster CA as this member holds it: the certificate always, the
//! signing key only while this member is a voter (see ARCHITECTURE.md,
//! "Trust"). The key is installed and dropped at run time as the Raft
//! membership changes.

use std::sync::{Arc, RwLock};

use ferry_transport::pki::{self, ClusterCa, PkiError};

pub struct Keyring {
    cert_pem: String,
    fingerprint: String,
    signer: RwLock<Option<Arc<ClusterCa>>>,
}

impl Keyring {
    /// The CA certificate, and its key when this member holds it.
    pub fn new(cert_pem: &str, key_pem: Option<&str>) -> Result<Keyring, PkiError> {
        let signer = key_pem
            .map(|key| ClusterCa::from_pem(cert_pem, key).map(Arc::new))
            .transpose()?;
        Ok(Keyring {
            cert_pem: cert_pem.to_string(),
            fingerprint: pki::fingerprint_of_pem(cert_pem)?,
            signer: RwLock::new(signer),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Hex SHA-256 of the CA certificate; what join tokens carry.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The CA with its key, if this member holds it.
    pub fn signer(&self) -> Option<Arc<ClusterCa>> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn holds_key(&self) -> bool {
        self.signer().is_some()
    }

    /// Take `key_pem` as the CA key; refused unless it matches the CA
    /// certificate.
    pub fn install(&self, key_pem: &str) -> Result<(), PkiError> {
        let ca = ClusterCa::from_pem(&self.cert_pem, key_pem)?;
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ca));
        Ok(())
    }

    pub fn forget(&self) {
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_installed_only_when_it_matches_the_certificate() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let ring = Keyring::new(ca.cert_pem(), None).unwrap();
        assert!(!ring.holds_key());
        assert!(ring.install(other.key_pem()).is_err());
        assert!(!ring.holds_key(), "a foreign key is not taken");
        ring.install(ca.key_pem()).unwrap();
        assert!(ring.holds_key());
        assert_eq!(ring.fingerprint(), ca.fingerprint());
        ring.forget();
        assert!(!ring.holds_key());
    }
}
