//! JWS algorithms (RFC 7518) as Portcullis accepts them: which public-key family verifies
//! each, and the allow-list's grammar. HMAC is never accepted. Configuration validates
//! issuers' `algorithms` with it and identity matches keys to algorithms with it, so it
//! sits below both.

use jsonwebtoken::Algorithm;
use std::fmt;

/// The key type and curve an algorithm needs (RFC 7518 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl fmt::Display for KeyFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyFamily::Rsa => "RSA",
            KeyFamily::EcP256 => "EC P-256",
            KeyFamily::EcP384 => "EC P-384",
            KeyFamily::Ed25519 => "OKP Ed25519",
        })
    }
}

/// The family of key that verifies `alg`; `None` for HMAC, which Portcullis never accepts.
pub fn family_of(alg: Algorithm) -> Option<KeyFamily> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(KeyFamily::Rsa),
        Algorithm::ES256 => Some(KeyFamily::EcP256),
        Algorithm::ES384 => Some(KeyFamily::EcP384),
        Algorithm::EdDSA => Some(KeyFamily::Ed25519),
        // HMAC, and any algorithm added to the library later, verify with nothing here.
        _ => None,
    }
}

/// Parses an algorithm name for an issuer's allow-list; `none` and HS* are refused.
pub fn parse_allowed_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = name
        .parse()
        .map_err(|_| format!("\"{name}\" is not a supported JWS algorithm"))?;
    match family_of(alg) {
        Some(_) => Ok(alg),
        // SECURITY: a symmetric algorithm next to public keys is the classic key-confusion
        // hole (RFC 8725 §2.1); Portcullis verifies with public keys only.
        None => Err(format!(
            "\"{name}\" is a shared-secret algorithm; only public-key algorithms are accepted"
        )),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_refuses_none_and_hmac() {
        assert!(parse_allowed_algorithm("RS256").is_ok());
        assert!(parse_allowed_algorithm("EdDSA").is_ok());
        assert!(parse_allowed_algorithm("none").is_err());
        assert!(
            parse_allowed_algorithm("HS256")
                .unwrap_err()
                .contains("shared-secret")
        );
        assert!(parse_allowed_algorithm("rs256").is_err());
    }
}
