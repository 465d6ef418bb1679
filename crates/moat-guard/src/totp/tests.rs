//! RFC 6238 Appendix B vectors, base32 round trips, skew, replay.

#![allow(clippy::unwrap_used, reason = "tests")]

use super::*;

const RFC_SECRET: &[u8] = b"12345678901234567890";

#[test]
fn rfc6238_sha1_vectors() {
    // Appendix B, SHA-1 column, 8 digits.
    for (t, want) in [
        (59u64, "94287082"),
        (1111111109, "07081804"),
        (1111111111, "14050471"),
        (1234567890, "89005924"),
        (2000000000, "69279037"),
        (20000000000, "65353130"),
    ] {
        assert_eq!(hotp(RFC_SECRET, t / STEP_SECS, 8), want, "t={t}");
    }
}

#[test]
fn rfc4226_hotp_vectors() {
    // RFC 4226 Appendix D, 6 digits.
    let want = ["755224", "287082", "359152", "969429", "338314"];
    for (counter, w) in want.iter().enumerate() {
        assert_eq!(hotp(RFC_SECRET, counter as u64, 6), *w);
    }
}

#[test]
fn base32_round_trip_and_known_value() {
    assert_eq!(base32_encode(b"foobar"), "MZXW6YTBOI");
    assert_eq!(base32_decode("mzxw6ytboi======").unwrap(), b"foobar");
    for n in 0..40 {
        let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(base32_decode(&base32_encode(&data)).unwrap(), data);
    }
    assert!(base32_decode("not base32!").is_none());
}

#[test]
fn accepts_one_step_of_skew_and_nothing_more() {
    let now = 1_700_000_000;
    let prev = code_at(RFC_SECRET, now - STEP_SECS);
    let next = code_at(RFC_SECRET, now + STEP_SECS);
    let far = code_at(RFC_SECRET, now - 3 * STEP_SECS);
    assert!(check(RFC_SECRET, &prev, now, None).is_ok());
    assert!(check(RFC_SECRET, &next, now, None).is_ok());
    if far != prev && far != code_at(RFC_SECRET, now) && far != next {
        assert_eq!(check(RFC_SECRET, &far, now, None), Err(TotpError::Wrong));
    }
    assert_eq!(check(RFC_SECRET, "", now, None), Err(TotpError::Missing));
    assert_eq!(check(RFC_SECRET, "12345", now, None), Err(TotpError::Wrong));
}

#[test]
fn a_code_is_never_accepted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = TotpStore::load(&dir.path().join("totp.json")).unwrap();
    let secret = store.enroll("admin-1", 1).unwrap();
    let now = 1_700_000_010;
    let code = code_at(&secret, now);
    store.verify("admin-1", Some(&code), now).unwrap();
    assert_eq!(
        store.verify("admin-1", Some(&code), now + 1),
        Err(TotpError::Replayed)
    );
    // The previous step's code is older than the one used: also refused.
    let older = code_at(&secret, now - STEP_SECS);
    assert_eq!(
        store.verify("admin-1", Some(&older), now),
        Err(TotpError::Replayed)
    );
    // The next step's code works once.
    let newer = code_at(&secret, now + STEP_SECS);
    store.verify("admin-1", Some(&newer), now + STEP_SECS).unwrap();
    assert_eq!(store.verify("admin-1", None, now), Err(TotpError::Missing));
    assert!(matches!(
        store.verify("other", Some(&code), now),
        Err(TotpError::NotEnrolled(_))
    ));
}

#[test]
fn enrolment_persists_privately_and_reloads() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("totp.json");
    let mut store = TotpStore::load(&path).unwrap();
    let secret = store.enroll("ops", 5).unwrap();
    assert_eq!(secret.len(), SECRET_LEN);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = TotpStore::load(&path).unwrap();
    assert!(again.is_enrolled("ops"));
    let now = 1_800_000_000;
    again.verify("ops", Some(&code_at(&secret, now)), now).unwrap();
    let mut again = again;
    assert!(again.remove("ops", 6).unwrap());
    assert!(!TotpStore::load(&path).unwrap().is_enrolled("ops"));
}

#[test]
fn corrupt_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("totp.json");
    std::fs::write(&path, b"{not json").unwrap();
    let err = TotpStore::load(&path).unwrap_err().to_string();
    assert!(err.contains("totp.json"), "{err}");
}

#[test]
fn uri_and_qr() {
    let uri = otpauth_uri("moat", "admin 1", b"12345678901234567890");
    assert_eq!(
        uri,
        "otpauth://totp/moat:admin%201?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=moat&algorithm=SHA1&digits=6&period=30"
    );
    let qr = qr_for_terminal(&uri).unwrap();
    assert!(qr.lines().count() > 10);
}

#[test]
fn wrong_codes_lock_the_principal_out_for_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = TotpStore::load(&dir.path().join("totp.json")).unwrap();
    let secret = store.enroll("k", 0).unwrap();
    store.enroll("other", 0).unwrap();
    let now = 1_000_000;
    let good = code_at(&secret, now);
    let wrong = if good == "000000" { "111111" } else { "000000" };
    for _ in 0..MAX_FAILURES {
        assert_eq!(store.verify("k", Some(wrong), now), Err(TotpError::Wrong));
    }
    // Locked: even the right code is refused, with the time left.
    assert_eq!(
        store.verify("k", Some(&good), now + 10),
        Err(TotpError::Locked(LOCKOUT_SECS - 10))
    );
    // Other principals are not affected.
    assert_eq!(store.verify("other", Some(wrong), now), Err(TotpError::Wrong));
    // After the window, a fresh code works and the count starts over.
    let later = now + LOCKOUT_SECS;
    assert_eq!(store.verify("k", Some(&code_at(&secret, later)), later), Ok(()));
    assert_eq!(store.verify("k", Some(wrong), later + 30), Err(TotpError::Wrong));
    assert_eq!(
        store.verify("k", Some(&code_at(&secret, later + 30)), later + 30),
        Ok(())
    );
}
