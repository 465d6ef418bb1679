//! GCRA shared between replicas through Redis.
//!
//! Each check is one `EVALSHA` of a Lua script that reads the key's TAT,
//! applies the same arithmetic as [`super::gcra`] and writes the new TAT
//! with an expiry, atomically (Redis runs a script without interleaving).
//! The clock is Redis's own `TIME`, so replicas with skewed clocks still
//! share one timeline. Times are microseconds: Lua numbers are doubles, and
//! microseconds since 1970 stay exact in 53 bits for another 200 years.
//!
//! The client speaks RESP2 over a small pool of TCP connections, with a
//! timeout on every call; a timeout or any error is returned to the caller,
//! which applies the configured fail-open or fail-closed policy. A
//! connection that saw an error is dropped, never reused mid-reply.
//!
//! Concurrency is shared the same way, as leases: a principal's slots are a
//! sorted set of lease id → expiry (Redis time, milliseconds). Acquiring is
//! one script that first prunes expired leases, so the slots of a replica
//! that crashed mid-request come back after the lease TTL instead of
//! leaking forever; the holder renews its lease while the request runs and
//! removes it when the request ends.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::{Decision, Quota};

const CHECK_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, string.format('%.0f', allow_at - now)}
end
local ttl = math.ceil((new_tat - now) / 1000)
if ttl < 1 then ttl = 1 end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
return {1, string.format('%.0f', math.floor((now + interval * burst - new_tat) / interval))}
"#;

const REFUND_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local new_tat = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if new_tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
end
return 1
"#;

const ACQUIRE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= max then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = 0
  if first[2] then wait = tonumber(first[2]) - now end
  return {0, string.format('%.0f', wait)}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, string.format('%.0f', max - held - 1)}
"#;

const RENEW_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not exp or tonumber(exp) <= now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#;

/// The outcome of [`RedisLimiter::acquire_lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseDecision {
    /// The lease is held; `remaining` more slots are free right now.
    Acquired { remaining: u64 },
    /// Every slot is held; the oldest-expiring lease lapses after
    /// `expires_in` unless renewed (an upper bound on how long a crashed
    /// holder can block, not a promise that a slot frees by then).
    Full { expires_in: Duration },
}

/// Most idle connections kept.
const POOL_SIZE: usize = 16;
/// Longest reply line or bulk string accepted from Redis.
const MAX_REPLY: usize = 64 * 1024;

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis at {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("redis at {addr}: no reply within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("redis at {addr}: {message}")]
    Reply { addr: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

type Conn = BufReader<TcpStream>;

/// A rate limiter whose state lives in Redis.
#[derive(Debug)]
pub struct RedisLimiter {
    addr: String,
    prefix: String,
    timeout: Duration,
    pool: Mutex<Vec<Conn>>,
    check_sha: String,
    refund_sha: String,
    acquire_sha: String,
    renew_sha: String,
}

fn sha1_hex(script: &str) -> String {
    use sha1::Digest as _;
    hex::encode(sha1::Sha1::digest(script.as_bytes()))
}

impl RedisLimiter {
    /// `addr` is `host:port`; keys are `prefix` + the caller's key; every
    /// call (connect included) is bounded by `timeout`.
    pub fn new(addr: impl Into<String>, prefix: impl Into<String>, timeout: Duration) -> Self {
        RedisLimiter {
            addr: addr.into(),
            prefix: prefix.into(),
            timeout,
            pool: Mutex::new(Vec::new()),
            check_sha: sha1_hex(CHECK_SCRIPT),
            refund_sha: sha1_hex(REFUND_SCRIPT),
            acquire_sha: sha1_hex(ACQUIRE_SCRIPT),
            renew_sha: sha1_hex(RENEW_SCRIPT),
        }
    }

    /// Charges `cost` units to `key`, atomically across all replicas.
    pub async fn check(&self, key: &str, quota: &Quota, cost: u64) -> Result<Decision, RedisError> {
        let interval = micros(quota);
        let args = [interval.to_string(), quota.burst.to_string(), cost.to_string()];
        let reply = self.eval(CHECK_SCRIPT, &self.check_sha, key, &args).await?;
        let bad = || RedisError::Reply {
            addr: self.addr.clone(),
            message: format!("unexpected script reply {reply:?}"),
        };
        let Reply::Array(items) = &reply else {
            return Err(bad());
        };
        let (Some(flag), Some(value)) = (items.first(), items.get(1)) else {
            return Err(bad());
        };
        let value: u64 = match value {
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
            Reply::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
        .ok_or_else(bad)?;
        match flag {
            Reply::Int(1) => Ok(Decision::Allowed { remaining: value }),
            Reply::Int(0) => Ok(Decision::Limited {
                retry_after: Duration::from_micros(value),
            }),
            _ => Err(bad()),
        }
    }

    /// Gives back `units` charged earlier (unused reserved tokens).
    pub async fn refund(&self, key: &str, quota: &Quota, units: u64) -> Result<(), RedisError> {
        let args = [micros(quota).to_string(), units.to_string()];
        self.eval(REFUND_SCRIPT, &self.refund_sha, key, &args)
            .await
            .map(drop)
    }

    /// Takes one of `max` concurrency slots of `key` as lease `lease_id`
    /// (unique per request), expiring `ttl` from now unless renewed.
    /// Expired leases of `key` are dropped first, in the same script.
    pub async fn acquire_lease(
        &self,
        key: &str,
        lease_id: &str,
        max: u64,
        ttl: Duration,
    ) -> Result<LeaseDecision, RedisError> {
        let args = [lease_id.to_owned(), max.to_string(), millis(ttl).to_string()];
        let reply = self.eval(ACQUIRE_SCRIPT, &self.acquire_sha, key, &args).await?;
        let (flag, value) = self.pair(&reply)?;
        match flag {
            1 => Ok(LeaseDecision::Acquired { remaining: value }),
            0 => Ok(LeaseDecision::Full {
                expires_in: Duration::from_millis(value),
            }),
            _ => Err(self.unexpected(&reply)),
        }
    }

    /// Pushes lease `lease_id`'s expiry to `ttl` from now. `Ok(false)`
    /// when the lease is gone (it lapsed, e.g. Redis was unreachable for a
    /// whole TTL): it is not taken again, since its slot may be someone
    /// else's by now.
    pub async fn renew_lease(&self, key: &str, lease_id: &str, ttl: Duration) -> Result<bool, RedisError> {
        let args = [lease_id.to_owned(), millis(ttl).to_string()];
        match self.eval(RENEW_SCRIPT, &self.renew_sha, key, &args).await? {
            Reply::Int(1) => Ok(true),
            Reply::Int(0) => Ok(false),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Frees lease `lease_id` (one `ZREM`; a lease already gone is fine).
    pub async fn release_lease(&self, key: &str, lease_id: &str) -> Result<(), RedisError> {
        let full_key = format!("{}{}", self.prefix, key);
        match self
            .call(&[b"ZREM", full_key.as_bytes(), lease_id.as_bytes()])
            .await?
        {
            Reply::Int(_) => Ok(()),
            Reply::Error(e) => Err(self.reply_error(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// A script's `{flag, number}` reply.
    fn pair(&self, reply: &Reply) -> Result<(i64, u64), RedisError> {
        let Reply::Array(items) = reply else {
            return Err(self.unexpected(reply));
        };
        let (Some(Reply::Int(flag)), Some(value)) = (items.first(), items.get(1)) else {
            return Err(self.unexpected(reply));
        };
        let value = match value {
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
            Reply::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
        .ok_or_else(|| self.unexpected(reply))?;
        Ok((*flag, value))
    }

    fn unexpected(&self, reply: &Reply) -> RedisError {
        RedisError::Reply {
            addr: self.addr.clone(),
            message: format!("unexpected script reply {reply:?}"),
        }
    }

    async fn eval(&self, script: &str, sha: &str, key: &str, args: &[String]) -> Result<Reply, RedisError> {
        let full_key = format!("{}{}", self.prefix, key);
        let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"1", full_key.as_bytes()];
        cmd.extend(args.iter().map(|a| a.as_bytes()));
        let reply = self.call(&cmd).await?;
        match reply {
            // The script cache is empty after a Redis restart: load it once.
            Reply::Error(e) if e.starts_with("NOSCRIPT") => {
                let mut cmd: Vec<&[u8]> = vec![b"EVAL", script.as_bytes(), b"1", full_key.as_bytes()];
                cmd.extend(args.iter().map(|a| a.as_bytes()));
                match self.call(&cmd).await? {
                    Reply::Error(e) => Err(self.reply_error(e)),
                    r => Ok(r),
                }
            }
            Reply::Error(e) => Err(self.reply_error(e)),
            r => Ok(r),
        }
    }

    fn reply_error(&self, message: String) -> RedisError {
        RedisError::Reply {
            addr: self.addr.clone(),
            message,
        }
    }

    async fn call(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let pooled = self.pool.lock().await.pop();
        let work = async {
            let mut conn = match pooled {
                Some(c) => c,
                None => BufReader::new(TcpStream::connect(&self.addr).await?),
            };
            let mut out = Vec::with_capacity(64 + args.iter().map(|a| a.len() + 16).sum::<usize>());
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
            conn.get_mut().write_all(&out).await?;
            let reply = read_reply(&mut conn, 0).await?;
            Ok::<_, std::io::Error>((conn, reply))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok((conn, reply))) => {
                let mut pool = self.pool.lock().await;
                if pool.len() < POOL_SIZE {
                    pool.push(conn);
                }
                Ok(reply)
            }
            Ok(Err(source)) => Err(RedisError::Io {
                addr: self.addr.clone(),
                source,
            }),
            Err(_) => Err(RedisError::Timeout {
                addr: self.addr.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

fn micros(quota: &Quota) -> u64 {
    (quota.interval_nanos() / 1000).max(1)
}

/// Whole milliseconds, at least 1 (a zero `PEXPIRE` would delete the key
/// at once).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn protocol(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

async fn read_line(conn: &mut Conn) -> std::io::Result<String> {
    let mut line = Vec::new();
    let n = (&mut *conn)
        .take(MAX_REPLY as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\r\n") {
        return Err(protocol("reply line too long or not CRLF-terminated"));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| protocol("reply line is not UTF-8"))
}

fn read_reply(
    conn: &mut Conn,
    depth: usize,
) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<Reply>> + Send + '_>> {
    Box::pin(async move {
        if depth > 4 {
            return Err(protocol("reply nested too deeply"));
        }
        let line = read_line(conn).await?;
        let (kind, rest) = line
            .split_at_checked(1)
            .ok_or_else(|| protocol("empty reply line"))?;
        let int = |s: &str| s.parse::<i64>().map_err(|_| protocol("bad integer in reply"));
        match kind {
            "+" => Ok(Reply::Simple(rest.to_owned())),
            "-" => Ok(Reply::Error(rest.to_owned())),
            ":" => Ok(Reply::Int(int(rest)?)),
            "$" => {
                let len = int(rest)?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let len = usize::try_from(len).map_err(|_| protocol("bad bulk length"))?;
                if len > MAX_REPLY {
                    return Err(protocol("bulk reply too large"));
                }
                let mut buf = vec![0u8; len + 2];
                conn.read_exact(&mut buf).await?;
                buf.truncate(len);
                Ok(Reply::Bulk(Some(buf)))
            }
            "*" => {
                let n = int(rest)?;
                if n < 0 {
                    return Ok(Reply::Array(Vec::new()));
                }
                let n = usize::try_from(n).map_err(|_| protocol("bad array length"))?;
                if n > 64 {
                    return Err(protocol("array reply too long"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(read_reply(conn, depth + 1).await?);
                }
                Ok(Reply::Array(items))
            }
            _ => Err(protocol("unknown reply type")),
        }
    })
}
