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
