//! JWT logins over real sockets and a real store: tokens signed with
//! HS256, EdDSA, RS256 and ES256 create passwordless accounts that chat with password
//! users and resume like any session; every refusal is an `AuthFailed`
//! that says why and leaves the connection open; password accounts stay
//! out of reach by default; `ternd admin revoke` retires older tokens; a
//! server without keys refuses `LoginJwt`, and one with `registration`
//! off refuses `Register`.

mod common;

use std::sync::Arc;

use common::{code_of, expect_message, TestServer, PASSWORD};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tern_client::{ClientError, ErrorCode};
use tern_engine::admin::{admin_request, serve_admin};
use tern_engine::jwt::{JwtSettings, JwtVerifier};
use tern_storage::ExternalPolicy;

const SECRET: &[u8] = b"a test secret of at least thirty-two bytes";

/// A test-only RSA key pair (tests/data/README.md): rcgen cannot make one.
const RS256_PRIVATE_PEM: &str = include_str!("data/jwt-rs256-private.pem");
const RS256_PUBLIC_PEM: &str = include_str!("data/jwt-rs256-public.pem");

struct Keys {
    ed25519_private_pem: String,
    es256_private_pem: String,
    settings: JwtSettings,
}

fn keys() -> Keys {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    Keys {
        ed25519_private_pem: pair.serialize_pem(),
        es256_private_pem: p256.serialize_pem(),
        settings: JwtSettings {
            hs256_secret: Some(SECRET.to_vec()),
            ed25519_public_key_pem: Some(pair.public_key_pem().into_bytes()),
            rs256_public_key_pem: Some(RS256_PUBLIC_PEM.as_bytes().to_vec()),
            es256_public_key_pem: Some(p256.public_key_pem().into_bytes()),
            jwks_file: None,
            issuer: Some("https://login.example".into()),
            audience: None,
            leeway_secs: 0,
            policy: ExternalPolicy {
                create_accounts: true,
                password_accounts: false,
            },
        },
    }
}

fn server_with(settings: &JwtSettings) -> TestServer {
    let verifier = Arc::new(JwtVerifier::new(settings).expect("jwt settings"));
    TestServer::start_with(move |config| config.jwt = Some(verifier))
}

fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "sub": sub,
        "iss": "https://login.example",
        "iat": now_secs(),
        "exp": now_secs() + 300,
    })
}

fn hs256(claims: &serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .expect("sign")
}

fn eddsa(keys: &Keys, claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_ed_pem(keys.ed25519_private_pem.as_bytes()).expect("ed25519 pem");
    encode(&Header::new(Algorithm::EdDSA), claims, &key).expect("sign")
}

fn rs256(claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_rsa_pem(RS256_PRIVATE_PEM.as_bytes()).expect("RSA pem");
    encode(&Header::new(Algorithm::RS256), claims, &key).expect("sign")
}

fn es256(keys: &Keys, claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_ec_pem(keys.es256_private_pem.as_bytes()).expect("P-256 pem");
    encode(&Header::new(Algorithm::ES256), claims, &key).expect("sign")
}

fn refusal(result: Result<tern_client::Session, ClientError>) -> String {
    match result {
        Err(ClientError::Server {
            code: ErrorCode::AuthFailed,
            message,
            ..
        }) => message,
        other => panic!("expected AuthFailed, got {other:?}"),
    }
}

#[test]
fn jwt_users_are_created_chat_with_password_users_and_resume() {
    let keys = keys();
    let server = server_with(&keys.settings);
    let mut setup = server.connect();
    setup.register("alice", PASSWORD).expect("register");
    let mut alice = server.login(&common::User {
        id: 1,
        name: "alice".into(),
    });

    let mut hana = server.connect();
    let session = hana.login_jwt(&hs256(&claims("hana"))).expect("HS256 login");
    assert_eq!(session.username, "hana");
    let mut ed = server.connect();
    let ed_session = ed
        .login_jwt(&eddsa(&keys, &claims("ed.user")))
        .expect("EdDSA login");
    assert_eq!(ed_session.username, "ed.user");
    assert_ne!(session.user, ed_session.user);
    // The algorithms of the usual identity providers.
    let rsa_session = server
        .connect()
        .login_jwt(&rs256(&claims("rsa.user")))
        .expect("RS256 login");
    assert_eq!(rsa_session.username, "rsa.user");
    let ec_session = server
        .connect()
        .login_jwt(&es256(&keys, &claims("ec.user")))
        .expect("ES256 login");
    assert_eq!(ec_session.username, "ec.user");
    // The same name by another algorithm is the same account.
    let hana_by_rsa = server
        .connect()
        .login_jwt(&rs256(&claims("hana")))
        .expect("RS256 login");
    assert_eq!(hana_by_rsa.user, session.user);

    // Both ways between a JWT account and a password account.
    alice.send_text(session.user, "hi hana").expect("send");
    assert_eq!(expect_message(&mut hana).content.body, b"hi hana");
    hana.send_text(1, "hi alice").expect("send");
    assert_eq!(expect_message(&mut alice).content.body, b"hi alice");

    // The same name again logs into the same account, and the session
    // token resumes like any other.
    let again = server
        .connect()
        .login_jwt(&eddsa(&keys, &claims("hana")))
        .expect("again");
    assert_eq!(again.user, session.user);
    let resumed = server.connect().login_token(&session.token).expect("resume");
    assert_eq!(resumed.user, session.user);

    // No password opens a JWT account.
    assert_eq!(
        code_of(server.connect().login("hana", PASSWORD)),
        ErrorCode::AuthFailed
    );
}

#[test]
fn each_refused_jwt_says_why_and_the_connection_stays_open() {
    let keys = keys();
    let server = server_with(&keys.settings);
    let mut client = server.connect();
    let mut expired = claims("ivan");
    expired["exp"] = (now_secs() - 60).into();
    let mut wrong_issuer = claims("ivan");
    wrong_issuer["iss"] = "https://evil.example".into();
    let other_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims("ivan"),
        &EncodingKey::from_secret(b"not the server's secret, but long enough"),
    )
    .expect("sign");
    let cases = [
        (hs256(&expired), "JWT has expired"),
        (hs256(&wrong_issuer), "JWT issuer not accepted"),
        (other_secret, "JWT signature does not verify"),
        (hs256(&claims("Not-A-Name")), "JWT sub is not a valid username"),
        ("definitely.not.a-jwt".to_owned(), "malformed JWT"),
    ];
    for (token, why) in cases {
        assert_eq!(refusal(client.login_jwt(&token)), why);
    }
    // Over-long tokens are refused before any work, the connection kept.
    assert_eq!(
        code_of(client.login_jwt(&"a".repeat(5000))),
        ErrorCode::InvalidArgument
    );
    // Still the same connection: a good token logs it in.
    client
        .login_jwt(&hs256(&claims("ivan")))
        .expect("login after refusals");
    assert_eq!(
        code_of(client.login_jwt(&hs256(&claims("ivan")))),
        ErrorCode::InvalidState
    );
}

#[test]
fn password_accounts_stay_out_of_reach_and_revocation_retires_older_tokens() {
    let keys = keys();
    let server = server_with(&keys.settings);
    let mut setup = server.connect();
    setup.register("judy", PASSWORD).expect("register");
    assert!(refusal(server.connect().login_jwt(&hs256(&claims("judy")))).contains("password account"));

    let issued_before = hs256(&claims("kate"));
    let session = server.connect().login_jwt(&issued_before).expect("login");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let admin =
        serve_admin(&socket_dir.path().join("admin.sock"), server.admin_context()).expect("admin socket");
    let answer = admin_request(admin.path(), "revoke kate").expect("revoke");
    assert!(answer.contains("revoked"), "{answer}");

    assert!(refusal(server.connect().login_jwt(&issued_before)).contains("revoked"));
    assert_eq!(
        code_of(server.connect().login_token(&session.token)),
        ErrorCode::AuthFailed
    );
    // A token the provider issues after the revocation, in a later second
    // (whole seconds, and this server's leeway is 0), logs in.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let later = claims("kate");
    let back = server
        .connect()
        .login_jwt(&hs256(&later))
        .expect("login after revoke");
    assert_eq!(back.user, session.user);
}

#[test]
fn without_keys_jwt_logins_are_refused_and_registration_can_be_closed() {
    let server = TestServer::start_with(|config| config.registration = false);
    let token = hs256(&claims("leo"));
    assert_eq!(
        refusal(server.connect().login_jwt(&token)),
        "this server does not accept JWT logins"
    );
    let mut client = server.connect();
    assert_eq!(code_of(client.register("leo", PASSWORD)), ErrorCode::Forbidden);
    // Nothing was created by either.
    let keys = keys();
    let strict = JwtSettings {
        policy: ExternalPolicy {
            create_accounts: false,
            password_accounts: false,
        },
        ..keys.settings.clone()
    };
    let dir = server.shutdown();
    let server = TestServer::start_in(dir, {
        let verifier = Arc::new(JwtVerifier::new(&strict).expect("jwt settings"));
        move |config| config.jwt = Some(verifier)
    });
    assert_eq!(
        refusal(server.connect().login_jwt(&token)),
        "no account has the JWT's sub"
    );
}

#[test]
fn only_unverifiable_tokens_count_toward_the_login_back_off() {
    let keys = keys();
    let verifier = Arc::new(JwtVerifier::new(&keys.settings).expect("jwt settings"));
    let server = TestServer::start_with(move |config| {
        config.jwt = Some(verifier);
        config.limits.limits_exempt.clear();
        config.limits.login_failures_per_ip = 2;
        config.limits.login_failures_per_account = 0;
    });
    let mut client = server.connect();
    // A client retrying a stale token the provider signed: refused, never
    // backed off.
    let mut expired = claims("mona");
    expired["exp"] = (now_secs() - 60).into();
    for _ in 0..4 {
        assert_eq!(refusal(client.login_jwt(&hs256(&expired))), "JWT has expired");
    }
    // Tokens nobody could verify are guesses: past the limit, backed off.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims("mona"),
        &EncodingKey::from_secret(b"a forger's secret, thirty-two bytes long"),
    )
    .expect("sign");
    for _ in 0..2 {
        assert_eq!(
            refusal(client.login_jwt(&forged)),
            "JWT signature does not verify"
        );
    }
    assert_eq!(code_of(client.login_jwt(&forged)), ErrorCode::RateLimited);
}
