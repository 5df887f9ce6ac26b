//! JWT logins: lets an operator's own login system front Tern. The
//! operator's system signs a JSON Web Token naming the user (`sub`); the
//! client presents it in `LoginJwt`; this module checks it and says who
//! it names and when it was issued, and the store
//! ([`tern_storage::Store::external_login`]) does the rest. It owns the
//! verification keys (an HS256 secret and Ed25519, RSA and P-256 public
//! keys, any of them), the accepted issuer and audience, the clock leeway,
//! and the policy on which accounts such a login may use. Verification is
//! pure computation (an HMAC or one signature check, microseconds to tens
//! of microseconds for RSA), run on the shard's blocking threads together
//! with the store work, never on the reactor.
//!
//! Four algorithms are accepted, HS256, EdDSA, RS256 and ES256, each with
//! its own key, chosen by the token's header: a token cannot pick a key of
//! another family (the classic "HS256 signed with the public key"
//! confusion) because each key is only ever used with its own algorithm
//! and the library refuses a key whose family does not match, and `none`
//! is never accepted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tern_proto::limits::check_username;
use tern_storage::ExternalPolicy;

/// Shortest HS256 secret accepted: RFC 7518 asks for a key at least as
/// long as the hash (32 bytes for SHA-256).
pub const HS256_SECRET_MIN_BYTES: usize = 32;

/// Largest key file read (a secret or a PEM public key is well under 1 KiB).
const KEY_FILE_MAX_BYTES: u64 = 64 * 1024;

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `sub` claim: a valid Tern username.
    pub username: String,
    /// The `iat` claim in Unix milliseconds less the leeway, if present:
    /// the earliest the token may have been issued by this server's clock,
    /// which is what a revocation is compared with.
    pub issued_at_ms: Option<u64>,
}

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtRefusal {
    /// In words fit for the client.
    pub why: &'static str,
    /// The signature verified: the refusal is about the claims (expired,
    /// wrong audience...). Such tokens come from the operator's login
    /// system, so they do not count as guesses for the login back-off;
    /// a client retrying a stale token must not lock out its address.
    pub signed: bool,
}

impl JwtRefusal {
    fn unsigned(why: &'static str) -> JwtRefusal {
        JwtRefusal { why, signed: false }
    }

    pub(crate) fn signed(why: &'static str) -> JwtRefusal {
        JwtRefusal { why, signed: true }
    }
}

/// The claims this module reads beyond those the library checks.
#[derive(serde::Deserialize)]
struct Claims {
    /// Optional here so that a token without it gets the library's
    /// missing-claim answer, not a parse failure.
    #[serde(default)]
    sub: Option<String>,
    /// RFC 7519 allows a fractional NumericDate.
    #[serde(default)]
    iat: Option<f64>,
    /// Present at all (and not null) is what matters when no audience
    /// is configured; the library only refuses an `aud` it can parse.
    #[serde(default)]
    aud: Option<serde::de::IgnoredAny>,
}

/// The server's JWT settings, ready to verify tokens.
pub struct JwtVerifier {
    /// One key per accepted algorithm, with the checks for that algorithm.
    keys: Vec<AlgorithmKey>,
    /// The keys of a JWK Set file, by key id, reread on demand.
    jwks: Option<Jwks>,
    /// What every token must satisfy: the claims `verify` checks itself,
    /// and those of the keys a reload brings. An `aud` claim is expected
    /// when an audience is configured (then the library checks it).
    checks: Checks,
    /// Which accounts a verified token may log into.
    pub policy: ExternalPolicy,
}

/// A JWK Set file (`jwt_jwks_file`) and the keys last read from it.
struct Jwks {
    path: PathBuf,
    /// Swapped whole by a reload; a verification holds its own `Arc`.
    keys: Mutex<Arc<Vec<SetKey>>>,
}

/// A key of a JWK Set.
struct SetKey {
    kid: Option<String>,
    key: AlgorithmKey,
}

/// The claim checks every key applies, from the settings.
#[derive(Debug, Clone)]
struct Checks {
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

impl Checks {
    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway_secs;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            v.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                v.set_audience(&[audience]);
                required.push("aud");
            }
            // A token with an `aud` is then refused (RFC 7519 4.1.3:
            // this server cannot be among its audience).
            None => v.aud = None,
        }
        v.set_required_spec_claims(&required);
        v
    }
}

/// A verification key and the only algorithm it verifies.
struct AlgorithmKey {
    key: DecodingKey,
    validation: Validation,
}

impl AlgorithmKey {
    fn algorithm(&self) -> Algorithm {
        self.validation.algorithms[0]
    }
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys themselves.
        let algorithms: Vec<Algorithm> = self.keys.iter().map(AlgorithmKey::algorithm).collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algorithms)
            .field("jwks_file", &self.jwks.as_ref().map(|jwks| &jwks.path))
            .field("issuer", &self.checks.issuer)
            .field("audience", &self.checks.audience)
            .field("leeway_secs", &self.checks.leeway_secs)
            .field("policy", &self.policy)
            .finish()
    }
}

/// The parts of the JWT settings, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// The HS256 secret, read from a file (raw bytes; a trailing newline
    /// is not part of it).
    pub hs256_secret: Option<Vec<u8>>,
    /// An Ed25519 public key in PEM (`-----BEGIN PUBLIC KEY-----`), for
    /// EdDSA.
    pub ed25519_public_key_pem: Option<Vec<u8>>,
    /// An RSA public key in PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`), for
    /// RS256; 2048 bits or more (smaller ones verify nothing).
    pub rs256_public_key_pem: Option<Vec<u8>>,
    /// A P-256 public key in PEM (`PUBLIC KEY`), for ES256.
    pub es256_public_key_pem: Option<Vec<u8>>,
    /// A JWK Set file (RFC 7517, `{"keys": [...]}`, what a provider's
    /// `jwks_uri` serves): its RSA, P-256 and Ed25519 signing keys verify
    /// tokens whose header names their `kid`. Read at start and by
    /// [`JwtVerifier::reload_jwks`].
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's), if set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_secs: u64,
    pub policy: ExternalPolicy,
}

impl JwtVerifier {
    /// Builds a verifier; `Err` says what is wrong with the settings.
    pub fn new(settings: &JwtSettings) -> Result<JwtVerifier, String> {
        let hs256 = match &settings.hs256_secret {
            None => None,
            Some(secret) if secret.len() < HS256_SECRET_MIN_BYTES => {
                return Err(format!(
                    "the HS256 secret is {} bytes; at least {HS256_SECRET_MIN_BYTES} are needed",
                    secret.len()
                ))
            }
            // The public key given as the secret would let anyone who can
            // read it sign tokens.
            Some(secret) if secret.starts_with(b"-----BEGIN") => {
                return Err(
                    "the HS256 secret file holds a PEM block; it must hold the raw shared secret".into(),
                )
            }
            Some(secret) => Some(DecodingKey::from_secret(secret)),
        };
        let public =
            |pem: &Option<Vec<u8>>, parse: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>, what| {
                pem.as_deref()
                    .map(|pem| {
                        // The library would take an RSA private key as the
                        // public one; a private key has no place on this server.
                        if pem.windows(7).any(|w| w == b"PRIVATE") {
                            return Err(format!(
                                "{what} key file holds a private key; give the public key"
                            ));
                        }
                        parse(pem).map_err(|e| format!("not {what} public key in PEM: {e}"))
                    })
                    .transpose()
            };
        let ed25519 = public(
            &settings.ed25519_public_key_pem,
            DecodingKey::from_ed_pem,
            "an Ed25519",
        )?;
        let rs256 = public(
            &settings.rs256_public_key_pem,
            DecodingKey::from_rsa_pem,
            "an RSA",
        )?;
        let es256 = public(
            &settings.es256_public_key_pem,
            DecodingKey::from_ec_pem,
            "an EC (P-256)",
        )?;
        let checks = Checks {
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway_secs: settings.leeway_secs,
        };
        let keys: Vec<AlgorithmKey> = [
            (Algorithm::HS256, hs256),
            (Algorithm::EdDSA, ed25519),
            (Algorithm::RS256, rs256),
            (Algorithm::ES256, es256),
        ]
        .into_iter()
        .filter_map(|(alg, key)| {
            key.map(|key| AlgorithmKey {
                key,
                validation: checks.validation(alg),
            })
        })
        .collect();
        let jwks = match &settings.jwks_file {
            None => None,
            Some(path) => {
                let keys = read_jwks(path, &checks)?;
                Some(Jwks {
                    path: path.clone(),
                    keys: Mutex::new(Arc::new(keys)),
                })
            }
        };
        if keys.is_empty() && jwks.is_none() {
            return Err(
                "JWT logins need an HS256 secret, an Ed25519, RSA or P-256 public key, or a JWK Set".into(),
            );
        }
        Ok(JwtVerifier {
            keys,
            jwks,
            checks,
            policy: settings.policy,
        })
    }

    /// Checks `token` (compact form) and returns what it says, or why it
    /// is refused, in words fit for the client.
    pub fn verify(&self, token: &str) -> Result<Verified, JwtRefusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtRefusal::unsigned(MALFORMED))?;
        let set = self.jwks.as_ref().map(Jwks::current);
        let key = self.key_for(
            header.alg,
            header.kid.as_deref(),
            set.as_deref().map(Vec::as_slice),
        )?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| refusal(e.kind()))?;
        let Claims { sub, iat, aud } = data.claims;
        let sub = sub.ok_or(JwtRefusal::signed(MISSING_CLAIM))?;
        if check_username(&sub).is_err() {
            return Err(JwtRefusal::signed("JWT sub is not a valid username"));
        }
        if aud.is_some() && self.checks.audience.is_none() {
            return Err(JwtRefusal::signed(AUDIENCE));
        }
        let issued_at_ms = match iat {
            None => None,
            Some(secs) if !(secs >= 0.0 && secs.is_finite()) => return Err(JwtRefusal::signed(MALFORMED)),
            Some(secs) => {
                let now = jsonwebtoken::get_current_timestamp();
                let leeway_secs = self.checks.leeway_secs;
                if secs > now.saturating_add(leeway_secs) as f64 {
                    // Would escape every revocation until it expires.
                    return Err(JwtRefusal::signed("JWT issued in the future (iat)"));
                }
                // Float to int `as` saturates; the value is finite and >= 0.
                let ms = (secs * 1000.0) as u64;
                Some(ms.saturating_sub(leeway_secs.saturating_mul(1000)))
            }
        };
        Ok(Verified {
            username: sub,
            issued_at_ms,
        })
    }

    /// The key that checks a token of algorithm `alg` naming key `kid`:
    /// the JWK Set's key of that id (of that algorithm, or the token is
    /// refused), else the configured key of the algorithm, else the set's
    /// only key of the algorithm when the token names none.
    fn key_for<'a>(
        &'a self,
        alg: Algorithm,
        kid: Option<&str>,
        set: Option<&'a [SetKey]>,
    ) -> Result<&'a AlgorithmKey, JwtRefusal> {
        let set = set.unwrap_or_default();
        if let Some(kid) = kid {
            // A set may list one kid under several algorithms.
            let mut named = set.iter().filter(|k| k.kid.as_deref() == Some(kid)).peekable();
            if named.peek().is_some() {
                return named
                    .find(|k| k.key.algorithm() == alg)
                    .map(|k| &k.key)
                    .ok_or(JwtRefusal::unsigned(ALGORITHM));
            }
        }
        if let Some(key) = self.keys.iter().find(|key| key.algorithm() == alg) {
            return Ok(key);
        }
        let mut of_alg = set.iter().filter(|k| k.key.algorithm() == alg);
        match (kid, of_alg.next(), of_alg.next()) {
            (None, Some(only), None) => Ok(&only.key),
            (None, Some(_), Some(_)) => Err(JwtRefusal::unsigned(KID_REQUIRED)),
            (Some(_), _, _) if !set.is_empty() => Err(JwtRefusal::unsigned(KEY_ID)),
            _ => Err(JwtRefusal::unsigned(ALGORITHM)),
        }
    }

    /// Reads the JWK Set file again (SIGHUP in `ternd`): `Ok(Some(n))`
    /// with the number of keys now used, `Ok(None)` without a set. A file
    /// that cannot be read or holds no usable key keeps the keys in use.
    pub fn reload_jwks(&self) -> Result<Option<usize>, String> {
        let Some(jwks) = &self.jwks else {
            return Ok(None);
        };
        let keys = read_jwks(&jwks.path, &self.checks)?;
        let count = keys.len();
        *jwks
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        Ok(Some(count))
    }
}

impl Jwks {
    fn current(&self) -> Arc<Vec<SetKey>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The usable keys of the JWK Set in `path`: signing keys of the three
/// public-key algorithms accepted here. Other keys (encryption keys,
/// other algorithms or curves, shared secrets, entries that do not parse)
/// are skipped, so a provider's set that also lists them still loads; a
/// set with no usable key is an error.
fn read_jwks(path: &Path, checks: &Checks) -> Result<Vec<SetKey>, String> {
    let bytes = read_key_file(path, "jwt_jwks_file")?;
    let what = || format!("jwt_jwks_file {}", path.display());
    let set: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{} is not JSON: {e}", what()))?;
    let entries = set
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| format!("{} has no \"keys\" array (RFC 7517)", what()))?;
    let keys: Vec<SetKey> = entries
        .iter()
        .take(MAX_JWKS_KEYS)
        .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
        .filter_map(|jwk| {
            let alg = signing_algorithm(&jwk)?;
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some(SetKey {
                kid: jwk.common.key_id.clone(),
                key: AlgorithmKey {
                    key,
                    validation: checks.validation(alg),
                },
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(format!(
            "{} holds no RSA, P-256 or Ed25519 signing key (of its first {MAX_JWKS_KEYS})",
            what()
        ));
    }
    Ok(keys)
}

/// Most keys read from a JWK Set (providers publish two or three).
const MAX_JWKS_KEYS: usize = 64;

/// The algorithm a JWK verifies here, if it is one of ours: its `alg` if
/// given, else the one its key type implies.
fn signing_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    // Lengths of base64url without padding: a modulus of at least 2048
    // bits (ring verifies nothing smaller), P-256 coordinates of 32 bytes.
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) if rsa.n.trim_end_matches('=').len() >= 342 => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec)
            if ec.curve == EllipticCurve::P256
                && ec.x.trim_end_matches('=').len() == 43
                && ec.y.trim_end_matches('=').len() == 43 =>
        {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(implied),
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Some(implied),
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Some(implied),
        Some(KeyAlgorithm::EdDSA) if implied == Algorithm::EdDSA => Some(implied),
        Some(_) => None,
    }
}

const KEY_ID: &str = "JWT key id (kid) not known to this server";
const KID_REQUIRED: &str = "JWT names no key id (kid), and this server has several keys of its algorithm";
const MISSING_CLAIM: &str = "JWT lacks a required claim (exp, sub, and iss or aud where configured)";
const MALFORMED: &str = "malformed JWT";
const ALGORITHM: &str = "JWT algorithm not accepted by this server";
const AUDIENCE: &str = "JWT audience not accepted";

/// The library's error as a refusal. It checks the signature before the
/// claims, so the claim errors come only from signed tokens.
fn refusal(kind: &ErrorKind) -> JwtRefusal {
    match kind {
        ErrorKind::ExpiredSignature => JwtRefusal::signed("JWT has expired"),
        ErrorKind::ImmatureSignature => JwtRefusal::signed("JWT is not valid yet (nbf)"),
        ErrorKind::InvalidIssuer => JwtRefusal::signed("JWT issuer not accepted"),
        ErrorKind::InvalidAudience => JwtRefusal::signed(AUDIENCE),
        ErrorKind::MissingRequiredClaim(_) => JwtRefusal::signed(MISSING_CLAIM),
        ErrorKind::InvalidSignature => JwtRefusal::unsigned("JWT signature does not verify"),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => JwtRefusal::unsigned(ALGORITHM),
        // Within `decode` only the claims are parsed as JSON after the
        // signature verified (the header parsed already, in `verify`): a
        // claim of the wrong type (`"sub": 5`) is the provider's doing.
        ErrorKind::Json(_) => JwtRefusal::signed("JWT claims are malformed (a claim of the wrong type)"),
        _ => JwtRefusal::unsigned(MALFORMED),
    }
}

/// Reads a key file, refusing anything too large to be a key.
pub fn read_key_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    match tern_net::files::read_at_most(path, KEY_FILE_MAX_BYTES) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(format!(
            "the {what} {} is over {KEY_FILE_MAX_BYTES} bytes, more than any key file",
            path.display()
        )),
        Err(e) => Err(format!("cannot read the {what} {}: {e}", path.display())),
    }
}

/// A secret file's bytes without the line end an editor adds.
pub fn trim_secret(mut secret: Vec<u8>) -> Vec<u8> {
    while secret.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        secret.pop();
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn settings() -> JwtSettings {
        JwtSettings {
            hs256_secret: Some(SECRET.to_vec()),
            ed25519_public_key_pem: None,
            rs256_public_key_pem: None,
            es256_public_key_pem: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 0,
            policy: ExternalPolicy {
                create_accounts: true,
                password_accounts: false,
            },
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs256(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn a_good_token_names_its_user_and_issue_time() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let token = hs256(serde_json::json!({"sub": "alice", "exp": now() + 60, "iat": 1_700_000_000}));
        assert_eq!(
            v.verify(&token).unwrap(),
            Verified {
                username: "alice".into(),
                issued_at_ms: Some(1_700_000_000_000)
            }
        );
    }

    #[test]
    fn each_refusal_says_why() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let exp = now() + 60;
        let cases = [
            (
                serde_json::json!({"sub": "alice", "exp": now() - 10}),
                "JWT has expired",
            ),
            (
                serde_json::json!({"sub": "alice"}),
                "JWT lacks a required claim (exp, sub, and iss or aud where configured)",
            ),
            (
                serde_json::json!({"exp": exp}),
                "JWT lacks a required claim (exp, sub, and iss or aud where configured)",
            ),
            (
                serde_json::json!({"sub": "alice", "exp": exp, "nbf": now() + 30}),
                "JWT is not valid yet (nbf)",
            ),
            (
                serde_json::json!({"sub": "Alice!", "exp": exp}),
                "JWT sub is not a valid username",
            ),
            (
                serde_json::json!({"sub": "alice", "exp": exp, "aud": "other"}),
                "JWT audience not accepted",
            ),
        ];
        for (claims, why) in cases {
            // Signed by the right key: a claim refusal, not a guess.
            assert_eq!(
                v.verify(&hs256(claims.clone())),
                Err(JwtRefusal::signed(why)),
                "{claims}"
            );
        }
        // Any `aud` at all is refused when no audience is configured,
        // also one the library cannot parse.
        for aud in [serde_json::json!(["other-app", 5]), serde_json::json!(7)] {
            let token = hs256(serde_json::json!({"sub": "alice", "exp": exp, "aud": aud}));
            assert_eq!(
                v.verify(&token).map_err(|r| r.why),
                Err("JWT audience not accepted")
            );
        }
        // An issue time in the future would escape revocations.
        let future = hs256(serde_json::json!({"sub": "alice", "exp": exp, "iat": now() + 120}));
        assert_eq!(
            v.verify(&future).map_err(|r| r.why),
            Err("JWT issued in the future (iat)")
        );
        for iat in [serde_json::json!(-1), serde_json::json!("yesterday")] {
            let token = hs256(serde_json::json!({"sub": "alice", "exp": exp, "iat": iat}));
            // Signed by the provider, so not a guess for the back-off.
            assert_eq!(v.verify(&token).map_err(|r| r.signed), Err(true), "{iat}");
        }
        let numeric_sub = hs256(serde_json::json!({"sub": 5, "exp": exp}));
        assert_eq!(v.verify(&numeric_sub).map_err(|r| r.signed), Err(true));
        let other_key = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "alice", "exp": exp}),
            &EncodingKey::from_secret(b"another secret of thirty-two bytes!"),
        )
        .unwrap();
        assert_eq!(
            v.verify(&other_key),
            Err(JwtRefusal::unsigned("JWT signature does not verify"))
        );
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"sub": "alice", "exp": exp}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(v.verify(&hs384), Err(JwtRefusal::unsigned(ALGORITHM)));
        for garbage in [
            "",
            "a.b.c",
            "not a jwt",
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
        ] {
            assert_eq!(v.verify(garbage).map_err(|r| r.signed), Err(false), "{garbage:?}");
        }
    }

    #[test]
    fn fractional_issue_times_count_and_the_leeway_moves_them_earlier() {
        let mut s = settings();
        s.leeway_secs = 30;
        let v = JwtVerifier::new(&s).unwrap();
        let token = hs256(serde_json::json!({"sub": "alice", "exp": now() + 60, "iat": 1_700_000_000.25}));
        // 30 s earlier than it says: a provider clock up to the leeway
        // fast cannot slip a token past a revocation.
        assert_eq!(
            v.verify(&token).unwrap().issued_at_ms,
            Some(1_700_000_000_250 - 30_000)
        );
        // Up to the leeway in the future is clock skew, not refused.
        let ahead = hs256(serde_json::json!({"sub": "alice", "exp": now() + 60, "iat": now() + 20}));
        assert!(v.verify(&ahead).is_ok());
    }

    #[test]
    fn issuer_and_audience_are_required_once_configured() {
        let mut s = settings();
        s.issuer = Some("https://login.example".into());
        s.audience = Some("tern".into());
        let v = JwtVerifier::new(&s).unwrap();
        let exp = now() + 60;
        let good = hs256(
            serde_json::json!({"sub": "bob", "exp": exp, "iss": "https://login.example", "aud": ["x", "tern"]}),
        );
        assert_eq!(v.verify(&good).unwrap().username, "bob");
        let wrong_iss = hs256(
            serde_json::json!({"sub": "bob", "exp": exp, "iss": "https://evil.example", "aud": "tern"}),
        );
        assert_eq!(
            v.verify(&wrong_iss).map_err(|r| r.why),
            Err("JWT issuer not accepted")
        );
        let no_aud = hs256(serde_json::json!({"sub": "bob", "exp": exp, "iss": "https://login.example"}));
        assert!(v.verify(&no_aud).is_err());
    }

    const RS256_PRIVATE_PEM: &str = include_str!("../tests/data/jwt-rs256-private.pem");
    const RS256_PUBLIC_PEM: &str = include_str!("../tests/data/jwt-rs256-public.pem");

    #[test]
    fn each_public_key_verifies_its_own_algorithm_only() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut s = settings();
        s.hs256_secret = None;
        s.rs256_public_key_pem = Some(RS256_PUBLIC_PEM.as_bytes().to_vec());
        s.es256_public_key_pem = Some(p256.public_key_pem().into_bytes());
        let v = JwtVerifier::new(&s).unwrap();
        let claims = serde_json::json!({"sub": "alice", "exp": now() + 60});
        let rsa = EncodingKey::from_rsa_pem(RS256_PRIVATE_PEM.as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(p256.serialize_pem().as_bytes()).unwrap();
        let rs256 = encode(&Header::new(Algorithm::RS256), &claims, &rsa).unwrap();
        let es256 = encode(&Header::new(Algorithm::ES256), &claims, &ec).unwrap();
        assert_eq!(v.verify(&rs256).unwrap().username, "alice");
        assert_eq!(v.verify(&es256).unwrap().username, "alice");
        // The RSA key signing as another RSA algorithm, and a token that
        // names HS256 signed with the public key's PEM as the secret (the
        // classic confusion): neither has a key here.
        let rs512 = encode(&Header::new(Algorithm::RS512), &claims, &rsa).unwrap();
        assert_eq!(v.verify(&rs512), Err(JwtRefusal::unsigned(ALGORITHM)));
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(RS256_PUBLIC_PEM.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&confused), Err(JwtRefusal::unsigned(ALGORITHM)));
        // A token whose header names ES256 but is signed by the RSA key.
        let mut forged = es256.split('.').take(2).collect::<Vec<_>>().join(".");
        let rsa_signature = rs256.rsplit('.').next().unwrap();
        forged = format!("{forged}.{rsa_signature}");
        assert_eq!(v.verify(&forged).map_err(|r| r.signed), Err(false));
        // Keys that are not what their setting says stop startup.
        let mut wrong = settings();
        wrong.rs256_public_key_pem = Some(p256.public_key_pem().into_bytes());
        assert!(
            JwtVerifier::new(&wrong).unwrap_err().contains("RSA"),
            "a P-256 key as RSA"
        );
        let mut wrong = settings();
        wrong.es256_public_key_pem =
            Some(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec());
        assert!(JwtVerifier::new(&wrong).unwrap_err().contains("P-256"));
    }

    const ES256_PRIVATE_PEM: &str = include_str!("../tests/data/jwt-es256-private.pem");
    const JWKS: &str = include_str!("../tests/data/jwt.jwks.json");

    fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(
            &header,
            &serde_json::json!({"sub": "alice", "exp": now() + 60}),
            key,
        )
        .unwrap()
    }

    fn with_jwks(dir: &tempfile::TempDir, jwks: &str) -> JwtSettings {
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks).unwrap();
        let mut s = settings();
        s.hs256_secret = None;
        s.jwks_file = Some(path);
        s
    }

    #[test]
    fn a_jwk_set_verifies_by_key_id_and_skips_keys_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let v = JwtVerifier::new(&with_jwks(&dir, JWKS)).unwrap();
        let rsa = EncodingKey::from_rsa_pem(RS256_PRIVATE_PEM.as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(ES256_PRIVATE_PEM.as_bytes()).unwrap();
        let ok = |token: &str| v.verify(token).map(|verified| verified.username);
        assert_eq!(
            ok(&signed(Algorithm::RS256, Some("test-rsa-1"), &rsa)),
            Ok("alice".into())
        );
        assert_eq!(
            ok(&signed(Algorithm::ES256, Some("test-ec-1"), &ec)),
            Ok("alice".into())
        );
        // Without a kid, the set's only key of the algorithm.
        assert_eq!(ok(&signed(Algorithm::RS256, None, &rsa)), Ok("alice".into()));
        // An unknown kid; a kid of another algorithm's key; the skipped
        // encryption key and shared secret.
        let refused = |token: &str| v.verify(token).map_err(|r| r.why);
        assert_eq!(
            refused(&signed(Algorithm::RS256, Some("test-rsa-2"), &rsa)),
            Err(KEY_ID)
        );
        assert_eq!(
            refused(&signed(Algorithm::RS256, Some("test-ec-1"), &rsa)),
            Err(ALGORITHM)
        );
        assert_eq!(
            refused(&signed(Algorithm::RS256, Some("test-enc"), &rsa)),
            Err(KEY_ID)
        );
        let secret = EncodingKey::from_secret(b"a shared secret has no place in a JWKS");
        assert_eq!(
            refused(&signed(Algorithm::HS256, Some("test-secret"), &secret)),
            Err(KEY_ID)
        );
        assert_eq!(refused(&signed(Algorithm::HS256, None, &secret)), Err(ALGORITHM));
        // The right kid on a signature by another key.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
        let forged = signed(Algorithm::ES256, Some("test-ec-1"), &other);
        assert_eq!(v.verify(&forged).map_err(|r| r.signed), Err(false));
    }

    /// A verifier of a JWK Set holding `keys`.
    fn verifier_of(dir: &tempfile::TempDir, keys: [serde_json::Value; 2]) -> Result<JwtVerifier, String> {
        JwtVerifier::new(&with_jwks(dir, &serde_json::json!({ "keys": keys }).to_string()))
    }

    #[test]
    fn key_ids_shared_or_missing_and_keys_too_weak_to_use() {
        let dir = tempfile::tempdir().unwrap();
        let set: serde_json::Value = serde_json::from_str(JWKS).unwrap();
        let rsa_jwk = set["keys"][0].clone();
        let ec_jwk = set["keys"][1].clone();
        let rsa = EncodingKey::from_rsa_pem(RS256_PRIVATE_PEM.as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(ES256_PRIVATE_PEM.as_bytes()).unwrap();
        // One kid under two algorithms: each token finds its own.
        let mut shared = ec_jwk.clone();
        shared["kid"] = "test-rsa-1".into();
        let v = verifier_of(&dir, [rsa_jwk.clone(), shared]).unwrap();
        assert!(v
            .verify(&signed(Algorithm::RS256, Some("test-rsa-1"), &rsa))
            .is_ok());
        assert!(v
            .verify(&signed(Algorithm::ES256, Some("test-rsa-1"), &ec))
            .is_ok());
        // Two keys of one algorithm: a token must say which.
        let mut second = rsa_jwk.clone();
        second["kid"] = "test-rsa-2".into();
        let v = verifier_of(&dir, [rsa_jwk.clone(), second]).unwrap();
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, None, &rsa)).map_err(|r| r.why),
            Err(KID_REQUIRED)
        );
        assert!(v
            .verify(&signed(Algorithm::RS256, Some("test-rsa-2"), &rsa))
            .is_ok());
        // A modulus under 2048 bits and a point off P-256's size are
        // skipped (ring would verify nothing with them).
        let mut short = rsa_jwk.clone();
        short["n"] = serde_json::Value::String(rsa_jwk["n"].as_str().unwrap()[..171].to_owned());
        let mut off = ec_jwk.clone();
        off["x"] = serde_json::Value::String(format!("{}AAAA", ec_jwk["x"].as_str().unwrap()));
        let err = verifier_of(&dir, [short, off]).err().unwrap();
        assert!(err.contains("no RSA, P-256 or Ed25519 signing key"), "{err}");
        // A private key where the public one belongs stops startup.
        let mut s = settings();
        s.rs256_public_key_pem = Some(RS256_PRIVATE_PEM.as_bytes().to_vec());
        assert!(JwtVerifier::new(&s).err().unwrap().contains("private key"));
        // Key files are read with a bound, whatever their reported size.
        let err = read_key_file(Path::new("/dev/zero"), "key file").unwrap_err();
        assert!(err.contains("more than any key file"), "{err}");
    }

    #[test]
    fn a_jwk_set_reload_swaps_the_keys_and_a_bad_file_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let settings = with_jwks(&dir, JWKS);
        let path = settings.jwks_file.clone().unwrap();
        let v = JwtVerifier::new(&settings).unwrap();
        let rsa = EncodingKey::from_rsa_pem(RS256_PRIVATE_PEM.as_bytes()).unwrap();
        let token = signed(Algorithm::RS256, Some("test-rsa-1"), &rsa);
        let renamed = signed(Algorithm::RS256, Some("rotated"), &rsa);
        assert!(v.verify(&token).is_ok());
        // The provider rotates: the key now has a new kid.
        std::fs::write(&path, JWKS.replace("test-rsa-1", "rotated")).unwrap();
        assert_eq!(v.reload_jwks(), Ok(Some(2)));
        assert!(v.verify(&renamed).is_ok());
        assert_eq!(v.verify(&token).map_err(|r| r.why), Err(KEY_ID));
        // A broken download keeps the keys in use.
        for broken in ["", "{\"keys\": []}", "<html>rate limited</html>"] {
            std::fs::write(&path, broken).unwrap();
            assert!(v.reload_jwks().is_err(), "{broken:?}");
            assert!(v.verify(&renamed).is_ok(), "after {broken:?}");
        }
        // And a set that cannot be used stops startup.
        assert!(JwtVerifier::new(&with_jwks(
            &dir,
            "{\"keys\": [{\"kty\": \"oct\", \"k\": \"AAAA\"}]}"
        ))
        .unwrap_err()
        .contains("no RSA, P-256 or Ed25519 signing key"));
        // Without a set there is nothing to reload.
        assert_eq!(
            JwtVerifier::new(&settings_plain()).unwrap().reload_jwks(),
            Ok(None)
        );
    }

    fn settings_plain() -> JwtSettings {
        settings()
    }

    #[test]
    fn settings_are_checked() {
        let mut s = settings();
        s.hs256_secret = Some(b"short".to_vec());
        assert!(JwtVerifier::new(&s).unwrap_err().contains("at least 32"));
        s.hs256_secret =
            Some(b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAexample-public-key-text\n".to_vec());
        assert!(JwtVerifier::new(&s).unwrap_err().contains("PEM"));
        s.hs256_secret = None;
        assert!(JwtVerifier::new(&s).is_err());
        s.ed25519_public_key_pem =
            Some(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec());
        assert!(JwtVerifier::new(&s).is_err());
        assert_eq!(trim_secret(b"secret\r\n".to_vec()), b"secret");
    }
}
