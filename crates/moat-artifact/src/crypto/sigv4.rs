//! AWS Signature Version 4 for the request shapes moat sends: KMS's JSON
//! POST to the root path, and S3's GETs (an already URI-encoded path, a
//! canonical query string, `UNSIGNED-PAYLOAD` or the body's hash). Written
//! here (HMAC-SHA256 from RustCrypto) instead of pulling the AWS SDK; checked
//! against AWS's published SigV4 test-suite vectors in the tests below.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// One request to sign. `headers` are (name, value) with lower-case names;
/// every header given is signed, so it must be sent exactly as given.
pub(crate) struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub payload: &'a [u8],
    /// `YYYYMMDD'T'HHMMSS'Z'`, the same value as the `x-amz-date` header.
    pub amz_date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Header values are trimmed and inner runs of spaces collapsed to one.
fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn canonical_request(req: &Request<'_>, query: &str, payload_hash: &str) -> (String, String) {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), canonical_value(v)))
        .collect();
    headers.sort();
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut creq = format!("{}\n{}\n{query}\n", req.method, req.path);
    for (k, v) in &headers {
        creq.push_str(k);
        creq.push(':');
        creq.push_str(v);
        creq.push('\n');
    }
    creq.push('\n');
    creq.push_str(&signed);
    creq.push('\n');
    creq.push_str(payload_hash);
    (creq, signed)
}

/// The `Authorization` header value for `req` (no query string, the payload
/// hashed).
pub(crate) fn authorization(access_key_id: &str, secret_access_key: &str, req: &Request<'_>) -> String {
    let payload_hash = hex::encode(Sha256::digest(req.payload));
    authorization_with(access_key_id, secret_access_key, req, "", &payload_hash)
}

/// The `Authorization` header value for `req` with a canonical query string
/// (`a=1&b=2`, keys sorted, already URI-encoded) and the payload hash as sent
/// in `x-amz-content-sha256` (S3 accepts `UNSIGNED-PAYLOAD`). `req.path`
/// must already be URI-encoded exactly as it goes on the wire.
pub(crate) fn authorization_with(
    access_key_id: &str,
    secret_access_key: &str,
    req: &Request<'_>,
    query: &str,
    payload_hash: &str,
) -> String {
    let date = req.amz_date.get(..8).unwrap_or(req.amz_date);
    let scope = format!("{date}/{}/{}/aws4_request", req.region, req.service);
    let (creq, signed_headers) = canonical_request(req, query, payload_hash);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        req.amz_date,
        hex::encode(Sha256::digest(creq.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret_access_key}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, req.region.as_bytes());
    let k_service = hmac(&k_region, req.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
}

/// `YYYYMMDD'T'HHMMSS'Z'` for a Unix time (UTC).
pub(crate) fn amz_date(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    // AWS SigV4 test suite (2015-08-30): credentials, date, region, service.
    const KEY: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const DATE: &str = "20150830T123600Z";

    fn sign(headers: &[(&str, &str)], payload: &[u8]) -> String {
        authorization(
            KEY,
            SECRET,
            &Request {
                method: "POST",
                path: "/",
                headers,
                payload,
                amz_date: DATE,
                region: "us-east-1",
                service: "service",
            },
        )
    }

    #[test]
    fn post_vanilla() {
        assert_eq!(
            sign(&[("host", "example.amazonaws.com"), ("x-amz-date", DATE)], b""),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
    }

    #[test]
    fn post_x_www_form_urlencoded_signs_the_body_and_sorts_headers() {
        // Given out of order and with extra spaces: canonicalisation must
        // sort names and trim values.
        assert_eq!(
            sign(
                &[
                    ("x-amz-date", DATE),
                    ("host", "  example.amazonaws.com "),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                ],
                b"Param1=value1"
            ),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
        );
    }

    #[test]
    fn kms_request_shape_matches_botocore() {
        // The exact headers KmsClient sends (port in host, session token);
        // expected value from botocore 1.44.5's SigV4Auth on the same input.
        let date = "20261123T001500Z";
        let auth = authorization(
            "AKIDX",
            "sec/ret+key",
            &Request {
                method: "POST",
                path: "/",
                headers: &[
                    ("content-type", "application/x-amz-json-1.1"),
                    ("host", "127.0.0.1:4566"),
                    ("x-amz-date", date),
                    ("x-amz-target", "TrentService.GenerateDataKey"),
                    ("x-amz-security-token", "tok/en+=="),
                ],
                payload: br#"{"KeyId":"k","KeySpec":"AES_256"}"#,
                amz_date: date,
                region: "eu-west-1",
                service: "kms",
            },
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDX/20261123/eu-west-1/kms/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, \
             Signature=cec0f9a5803d9b691828d841d0822d2444d6e1ae8b0643af8162f3ac02a791bd"
        );
    }

    #[test]
    fn s3_get_with_range_matches_aws_documentation() {
        // "Example: GET Object" from the S3 SigV4 header-based auth docs.
        let date = "20130524T000000Z";
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let auth = authorization_with(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            &Request {
                method: "GET",
                path: "/test.txt",
                headers: &[
                    ("host", "examplebucket.s3.amazonaws.com"),
                    ("range", "bytes=0-9"),
                    ("x-amz-content-sha256", empty),
                    ("x-amz-date", date),
                ],
                payload: b"",
                amz_date: date,
                region: "us-east-1",
                service: "s3",
            },
            "",
            empty,
        );
        assert!(
            auth.ends_with("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
            "{auth}"
        );
    }

    #[test]
    fn s3_list_objects_query_matches_aws_documentation() {
        // "Example: GET Bucket (List Objects)" from the same page.
        let date = "20130524T000000Z";
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let auth = authorization_with(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            &Request {
                method: "GET",
                path: "/",
                headers: &[
                    ("host", "examplebucket.s3.amazonaws.com"),
                    ("x-amz-content-sha256", empty),
                    ("x-amz-date", date),
                ],
                payload: b"",
                amz_date: date,
                region: "us-east-1",
                service: "s3",
            },
            "max-keys=2&prefix=J",
            empty,
        );
        assert!(
            auth.ends_with("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
            "{auth}"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(amz_date(1_440_938_160), DATE);
        assert_eq!(amz_date(0), "19700101T000000Z");
        assert_eq!(amz_date(951_782_400), "20000229T000000Z");
        assert_eq!(amz_date(4_102_444_799), "20991231T235959Z");
    }
}
