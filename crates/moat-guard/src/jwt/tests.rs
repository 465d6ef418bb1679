//! Every refusal the issue lists, with real keys: RS256 (2048-bit fixture),
//! ES256, EdDSA, HS256.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use super::*;
use p256::ecdsa::signature::Signer as _;
use rsa::pkcs8::DecodePrivateKey as _;
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://issuer.test";

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn rsa_key(pem: &str) -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap()
}

fn rsa_pem() -> &'static str {
    include_str!("../../tests/fixtures/jwt-rsa-test.pem")
}

fn rsa_jwk(key: &rsa::RsaPrivateKey, kid: &str) -> Value {
    use rsa::traits::PublicKeyParts as _;
    let n = key.n().to_be_bytes();
    let e = key.e().to_be_bytes();
    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(strip_zeros(&n)), "e": b64(strip_zeros(&e))})
}

fn p256_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap()
}

fn p256_jwk(kid: &str) -> Value {
    let point = p256_key().verifying_key().to_sec1_point(false);
    let bytes = point.as_bytes();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&bytes[1..33]), "y": b64(&bytes[33..65])})
}

fn ed_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
}

fn ed_jwk(kid: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(ed_key().verifying_key().as_bytes())})
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": ["moat", "other"], "exp": NOW + 300, "iat": NOW - 10, "nbf": NOW - 10})
}

fn token(header: Value, claims: Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

fn rs256(kid: &str, claims: Value) -> String {
    let key = rsa::pkcs1v15::SigningKey::<Sha256>::new(rsa_key(rsa_pem()));
    token(json!({"alg": "RS256", "kid": kid, "typ": "JWT"}), claims, |m| {
        let s: rsa::pkcs1v15::Signature = key.sign(m);
        Box::<[u8]>::from(s).into_vec()
    })
}

fn hs256(secret: &[u8], kid: Option<&str>, claims: Value) -> String {
    let header = match kid {
        Some(k) => json!({"alg": "HS256", "kid": k}),
        None => json!({"alg": "HS256"}),
    };
    token(header, claims, |m| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(m);
        mac.finalize().into_bytes().to_vec()
    })
}

fn policy(algs: &[Algorithm]) -> IssuerPolicy {
    IssuerPolicy {
        issuer: ISS.into(),
        audiences: vec!["moat".into()],
        algorithms: algs.to_vec(),
        leeway: Duration::from_secs(30),
        max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
    }
}

fn verifier(algs: &[Algorithm]) -> Verifier {
    let jwks = json!({"keys": [
        rsa_jwk(&rsa_key(rsa_pem()), "rsa-1"),
        p256_jwk("ec-1"),
        ed_jwk("ed-1"),
        {"kty": "oct", "kid": "sym", "k": b64(b"jwks symmetric keys are ignored")},
    ]});
    let mut keys = Jwks::parse(jwks.to_string().as_bytes()).unwrap();
    keys.keys.push(Jwk {
        kid: Some("hs-1".into()),
        key: Key::Hmac(zeroize::Zeroizing::new(
            b"configured shared secret, 32+ bytes".to_vec(),
        )),
    });
    Verifier {
        issuers: vec![(policy(algs), keys)],
    }
}

const ALL: &[Algorithm] = &[
    Algorithm::Rs256,
    Algorithm::Es256,
    Algorithm::EdDsa,
    Algorithm::Hs256,
];

#[test]
fn each_algorithm_verifies() {
    let v = verifier(ALL);
    let ok = v.verify(&rs256("rsa-1", claims()), NOW).unwrap();
    assert_eq!((ok.issuer.as_str(), ok.subject.as_str()), (ISS, "alice"));

    let es = token(json!({"alg": "ES256", "kid": "ec-1"}), claims(), |m| {
        let s: p256::ecdsa::Signature = p256_key().sign(m);
        s.to_bytes().to_vec()
    });
    v.verify(&es, NOW).unwrap();

    let ed = token(json!({"alg": "EdDSA", "kid": "ed-1"}), claims(), |m| {
        use ed25519_dalek::Signer as _;
        ed_key().sign(m).to_bytes().to_vec()
    });
    v.verify(&ed, NOW).unwrap();

    v.verify(
        &hs256(b"configured shared secret, 32+ bytes", Some("hs-1"), claims()),
        NOW,
    )
    .unwrap();
}

#[test]
fn alg_none_is_refused() {
    let v = verifier(ALL);
    let t = format!(
        "{}.{}.",
        b64(json!({"alg": "none"}).to_string().as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    assert_eq!(v.verify(&t, NOW), Err(JwtError::AlgNone));
    let t = format!(
        "{}.{}.",
        b64(json!({"alg": "NoNe"}).to_string().as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    assert_eq!(v.verify(&t, NOW), Err(JwtError::AlgNone));
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic confusion: HMAC keyed with the issuer's public key bytes.
    use rsa::pkcs8::EncodePublicKey as _;
    let public_pem = rsa_key(rsa_pem())
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let forged = hs256(public_pem.as_bytes(), Some("rsa-1"), claims());
    // Allowed algorithms RS256 only: refused on the algorithm.
    assert!(matches!(
        verifier(&[Algorithm::Rs256]).verify(&forged, NOW),
        Err(JwtError::AlgNotAllowed { .. })
    ));
    // Even where HS256 is allowed, the RSA key is never an HMAC candidate.
    assert_eq!(
        verifier(ALL).verify(&forged, NOW),
        Err(JwtError::UnknownKid("rsa-1".into()))
    );
    let forged_no_kid = hs256(public_pem.as_bytes(), None, claims());
    assert_eq!(
        verifier(ALL).verify(&forged_no_kid, NOW),
        Err(JwtError::BadSignature)
    );
}

#[test]
fn time_claims() {
    let v = verifier(ALL);
    let mut c = claims();
    c["exp"] = json!(NOW - 31);
    assert!(matches!(
        v.verify(&rs256("rsa-1", c), NOW),
        Err(JwtError::Expired { .. })
    ));
    let mut c = claims();
    c["exp"] = json!(NOW - 29); // inside the leeway
    v.verify(&rs256("rsa-1", c), NOW).unwrap();
    let mut c = claims();
    c["nbf"] = json!(NOW + 60);
    assert!(matches!(
        v.verify(&rs256("rsa-1", c), NOW),
        Err(JwtError::NotYetValid { .. })
    ));
    let mut c = claims();
    c["iat"] = json!(NOW + 60);
    assert!(matches!(
        v.verify(&rs256("rsa-1", c), NOW),
        Err(JwtError::IssuedInFuture { .. })
    ));
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        v.verify(&rs256("rsa-1", c), NOW),
        Err(JwtError::MissingClaim("exp"))
    );
}

#[test]
fn issuer_and_audience() {
    let v = verifier(ALL);
    let mut c = claims();
    c["iss"] = json!("https://evil.test");
    assert_eq!(
        v.verify(&rs256("rsa-1", c), NOW),
        Err(JwtError::UnknownIssuer("https://evil.test".into()))
    );
    let mut c = claims();
    c["aud"] = json!("someone-else");
    assert!(matches!(
        v.verify(&rs256("rsa-1", c), NOW),
        Err(JwtError::WrongAudience(_))
    ));
    let mut c = claims();
    c["aud"] = json!("moat");
    v.verify(&rs256("rsa-1", c), NOW).unwrap();
}

#[test]
fn unknown_kid_and_tampering() {
    let v = verifier(ALL);
    assert_eq!(
        v.verify(&rs256("rotated-away", claims()), NOW),
        Err(JwtError::UnknownKid("rotated-away".into()))
    );
    let good = rs256("rsa-1", claims());
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut c = claims();
    c["sub"] = json!("admin");
    parts[1] = b64(c.to_string().as_bytes());
    assert_eq!(v.verify(&parts.join("."), NOW), Err(JwtError::BadSignature));
    // Flip one bit of the signature itself.
    let mut sig = URL_SAFE_NO_PAD.decode(good.rsplit('.').next().unwrap()).unwrap();
    sig[10] ^= 1;
    let (input, _) = good.rsplit_once('.').unwrap();
    assert_eq!(
        v.verify(&format!("{input}.{}", b64(&sig)), NOW),
        Err(JwtError::BadSignature)
    );
}

#[test]
fn oversized_and_malformed() {
    let v = verifier(ALL);
    let mut c = claims();
    c["pad"] = json!("x".repeat(10_000));
    assert!(matches!(
        v.verify(&rs256("rsa-1", c), NOW),
        Err(JwtError::Oversized { .. })
    ));
    assert!(matches!(v.verify("a.b", NOW), Err(JwtError::Malformed(_))));
    assert!(matches!(v.verify("a.b.c.d", NOW), Err(JwtError::Malformed(_))));
    assert!(matches!(v.verify("!!.??.**", NOW), Err(JwtError::Malformed(_))));
}

#[test]
fn weak_rsa_keys_and_bad_points_are_refused_in_jwks() {
    let weak = rsa_key(include_str!("../../tests/fixtures/jwt-rsa-1024-test.pem"));
    let doc = json!({"keys": [rsa_jwk(&weak, "weak")]});
    let err = Jwks::parse(doc.to_string().as_bytes()).unwrap_err().to_string();
    assert!(err.contains("1024 bits"), "{err}");
    let doc = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(&[1u8; 32]), "y": b64(&[2u8; 32])}]});
    assert!(Jwks::parse(doc.to_string().as_bytes()).is_err());
    assert_eq!(Jwks::parse(b"[]").unwrap_err(), JwksError::Shape);
    // Unknown key types and encryption keys are skipped, not fatal.
    let doc =
        json!({"keys": [{"kty": "EC", "crv": "P-384", "x": "", "y": ""}, {"kty": "RSA", "use": "enc"}]});
    assert!(Jwks::parse(doc.to_string().as_bytes()).unwrap().keys.is_empty());
}
