//! Join tokens as the operator handles them: one opaque string carrying
//! the member name, the secret, the CA fingerprint (so the joiner can
//! verify the cluster before it sends the secret) and where to reach it.

use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "ferry1-";
/// A token longer than this is refused before decoding.
const MAX_TOKEN_LEN: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub name: String,
    pub secret: String,
    pub ca_fingerprint: String,
    pub addrs: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the join token is not a ferry token (it should start with '{PREFIX}'); copy it again from 'ferry cluster token create'")]
    BadPrefix,
    #[error("the join token is damaged ({0}); copy it again from 'ferry cluster token create'")]
    Damaged(String),
}

impl JoinToken {
    pub fn encode(&self) -> String {
        // serde_json of our own struct cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    pub fn decode(text: &str) -> Result<JoinToken, TokenError> {
        let text = text.trim();
        let body = text.strip_prefix(PREFIX).ok_or(TokenError::BadPrefix)?;
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Damaged("too long".into()));
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Damaged(e.to_string()))?;
        let token: JoinToken =
            serde_json::from_slice(&json).map_err(|e| TokenError::Damaged(e.to_string()))?;
        if token.secret.is_empty() || token.ca_fingerprint.is_empty() || token.addrs.is_empty() {
            return Err(TokenError::Damaged("missing fields".into()));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            name: "n4".into(),
            secret: "abc".into(),
            ca_fingerprint: "ff".into(),
            addrs: vec!["127.0.0.1:7000".into()],
        }
    }

    #[test]
    fn token_round_trips() {
        let t = sample();
        assert_eq!(JoinToken::decode(&t.encode()), Ok(t));
    }

    #[test]
    fn garbage_token_is_rejected_with_a_reason() {
        assert_eq!(JoinToken::decode("hello"), Err(TokenError::BadPrefix));
        assert!(matches!(
            JoinToken::decode("ferry1-!!!"),
            Err(TokenError::Damaged(_))
        ));
        let mut t = sample();
        t.addrs.clear();
        assert!(matches!(
            JoinToken::decode(&t.encode()),
            Err(TokenError::Damaged(_))
        ));
    }
}
