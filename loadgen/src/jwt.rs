//! JWT logins for load runs against a server that trusts an HS256 secret
//! (`ternd --jwt-hs256-secret-file`): with `--jwt-secret-file` the
//! load generator plays the operator's login system and mints each user's
//! token itself. Users are then set up without password hashing (the
//! server creates an account on its first JWT login), and `connect
//! --login jwt` measures what a JWT login costs the server.

use std::path::Path;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

/// How long a minted token is valid: longer than any run.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// Signs login tokens with the server's HS256 secret.
pub struct JwtMinter {
    key: EncodingKey,
    header: Header,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for JwtMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("JwtMinter")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

impl JwtMinter {
    /// Reads the secret as `ternd` does (a trailing line end is not part
    /// of it).
    pub fn from_file(
        path: &Path,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<JwtMinter, String> {
        let mut secret = std::fs::read(path)
            .map_err(|e| format!("cannot read --jwt-secret-file {}: {e}", path.display()))?;
        while secret.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
            secret.pop();
        }
        if secret.is_empty() {
            return Err(format!("--jwt-secret-file {} is empty", path.display()));
        }
        Ok(JwtMinter {
            key: EncodingKey::from_secret(&secret),
            header: Header::new(Algorithm::HS256),
            issuer,
            audience,
        })
    }

    /// A token naming `username`, issued now.
    pub fn mint(&self, username: &str) -> Result<String, String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: username,
            iat: now,
            exp: now + TOKEN_LIFETIME_SECS,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        encode(&self.header, &claims, &self.key).map_err(|e| format!("cannot sign a JWT: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_with_the_same_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        let minter = JwtMinter::from_file(&path, Some("login.example".into()), Some("tern".into())).unwrap();
        let token = minter.mint("lg_7").unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_issuer(&["login.example"]);
        validation.set_audience(&["tern"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "lg_7");
        std::fs::write(&path, "\n").unwrap();
        assert!(JwtMinter::from_file(&path, None, None).is_err());
    }
}
