//! Where audit lines go: a file with size-based rotation (the durable,
//! verifiable copy) and a writer such as stdout (for Filebeat / Fluent Bit).
//!
//! A sink receives whole batches of complete lines from the log's single
//! writer thread. Its contract is what keeps the chain honest: when
//! [`Sink::write_batch`] fails, none of the batch may count as written, so
//! the file sink cuts the file back to its length before the batch; the log
//! then chains the next record onto the last record that *was* written.
//!
//! # Rotation naming
//!
//! When the live file (say `audit.jsonl`) holds records and the next batch
//! would take it past `max_bytes`, it is fsynced and renamed to
//! `audit.jsonl.NNNNNN`, where `NNNNNN` is one more than the highest number
//! already beside it (zero-padded to six digits, so a shell glob lists them
//! oldest first), and a new empty `audit.jsonl` is created. Rotation happens
//! only between batches, so a batch never straddles two files (one batch
//! larger than `max_bytes` makes one larger file). The chain runs on: the
//! new file's first record's `prev` is the hash of the old file's last.
//!
//! With a maximum age ([`FileSink::with_max_age`], `[audit] rotate_every`),
//! a live file that has held records for that long is rotated the same way
//! before the next batch, so retention can work in whole days even on a
//! quiet server. The age counts from when the live file was created (its
//! birth time where the filesystem records one, else its first open by this
//! process), so a restart does not reset it.

use crate::keys::sync_parent;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The end of the chain a sink already holds, to continue from on open.
#[derive(Debug, Default)]
pub struct Tail {
    /// The last complete line (without `\n`), if any.
    pub last_line: Option<Vec<u8>>,
    /// Set when opening had to cut off an incomplete last line (a crash
    /// between write and fsync): what was cut. The log records it.
    pub repaired: Option<String>,
}

/// A destination for audit lines.
pub trait Sink: Send {
    /// A short name for errors and logs (a path, or `stdout`).
    fn name(&self) -> String;

    /// The last record already held, for the chain to continue from. Called
    /// once, before the first write.
    fn resume(&mut self) -> io::Result<Tail> {
        Ok(Tail::default())
    }

    /// Append `lines` (one or more complete lines, each ending in `\n`);
    /// with `durable`, they are on stable storage when this returns `Ok`.
    /// On `Err` none of `lines` may count as written: undo what can be undone.
    fn write_batch(&mut self, lines: &[u8], durable: bool) -> io::Result<()>;
}

/// An append-only file with size-based rotation; see the module comment.
/// Holds an exclusive lock on the live file so that two processes cannot
/// interleave two chains.
pub struct FileSink {
    path: PathBuf,
    max_bytes: Option<u64>,
    /// `None` after a rotation could not create the new file; the next
    /// batch tries again.
    file: Option<File>,
    /// Length of the live file up to its last written batch.
    len: u64,
    /// The live file may hold bytes past `len` (a failed batch that could
    /// not be cut off yet): cut before the next write.
    dirty: bool,
    next_index: u64,
    /// Rotate a live file with records once it is this old.
    max_age: Option<std::time::Duration>,
    /// When the live file was created (or first opened, where the
    /// filesystem keeps no birth time).
    born: std::time::SystemTime,
    /// Tests: make the next write put this many bytes in the file, then fail.
    #[cfg(test)]
    fail_next_write_after: Option<usize>,
}

impl FileSink {
    /// Open (or create, mode 0600, with missing parent folders) the live file
    /// at `path`. `max_bytes`: rotate before a batch would take the file past
    /// it (`None`: never rotate).
    pub fn open(path: impl Into<PathBuf>, max_bytes: Option<u64>) -> io::Result<Self> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let file = open_live(&path)?;
        let meta = file.metadata()?;
        let len = meta.len();
        let next_index = rotated_files(&path)?.last().map_or(1, |(n, _)| n + 1);
        Ok(Self {
            path,
            max_bytes: max_bytes.filter(|&m| m > 0),
            file: Some(file),
            len,
            dirty: false,
            next_index,
            max_age: None,
            born: meta.created().unwrap_or_else(|_| std::time::SystemTime::now()),
            #[cfg(test)]
            fail_next_write_after: None,
        })
    }

    /// Also rotate a live file that has held records for `max_age`
    /// (`None`: by size only).
    pub fn with_max_age(mut self, max_age: Option<std::time::Duration>) -> Self {
        self.max_age = max_age.filter(|d| !d.is_zero());
        self
    }

    fn too_old(&self) -> bool {
        self.max_age
            .is_some_and(|age| self.born.elapsed().is_ok_and(|lived| lived >= age))
    }

    /// The live file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(f) = &self.file {
            f.sync_all()?;
        }
        let rotated = rotated_name(&self.path, self.next_index);
        if rotated.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("cannot rotate: {} exists", rotated.display()),
            ));
        }
        fs::rename(&self.path, &rotated)?;
        self.next_index += 1;
        self.file = None;
        self.len = 0;
        self.born = std::time::SystemTime::now();
        sync_parent(&self.path)?;
        self.reopen()
    }

    fn reopen(&mut self) -> io::Result<()> {
        let f = open_live(&self.path)?;
        self.len = f.metadata()?.len();
        self.file = Some(f);
        Ok(())
    }

    /// Cut the live file back to `len` after a failed batch.
    fn cut_back(&mut self) -> io::Result<()> {
        if let Some(f) = &self.file {
            f.set_len(self.len)?;
        }
        self.dirty = false;
        Ok(())
    }

    fn write_all_synced(&mut self, lines: &[u8], durable: bool) -> io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the live audit file is not open"))?;
        #[cfg(test)]
        if let Some(n) = self.fail_next_write_after.take() {
            f.write_all(&lines[..n.min(lines.len())])?;
            return Err(io::Error::other("injected write failure"));
        }
        f.write_all(lines)?;
        if durable {
            // Appending changes the size, which fdatasync also makes durable.
            f.sync_data()?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn resume(&mut self) -> io::Result<Tail> {
        let mut tail = Tail::default();
        if let Some(f) = &mut self.file {
            let (last, complete_len) = last_line(f, self.len)?;
            if complete_len < self.len {
                let cut = self.len - complete_len;
                f.set_len(complete_len)?;
                f.sync_all()?;
                self.len = complete_len;
                tail.repaired = Some(format!(
                    "cut {cut} bytes of an incomplete last line from {} (a write not made durable before a crash)",
                    self.path.display()
                ));
            }
            tail.last_line = last;
        }
        if tail.last_line.is_none() {
            // A live file that is empty right after a rotation: the chain
            // ends in the newest rotated file.
            if let Some((_, newest)) = rotated_files(&self.path)?.pop() {
                let mut f = File::open(&newest)?;
                let len = f.metadata()?.len();
                tail.last_line = last_line(&mut f, len)?.0;
            }
        }
        Ok(tail)
    }

    fn write_batch(&mut self, lines: &[u8], durable: bool) -> io::Result<()> {
        if self.file.is_none() {
            self.reopen()?;
        }
        if self.dirty {
            self.cut_back()?;
        }
        let too_big = self
            .max_bytes
            .is_some_and(|max| self.len + lines.len() as u64 > max);
        if self.len > 0 && (too_big || self.too_old()) {
            self.rotate()?;
        }
        match self.write_all_synced(lines, durable) {
            Ok(()) => {
                self.len += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Whatever reached the file is not part of the log: cut it
                // off now, or before the next write if even that fails.
                self.dirty = true;
                if self.cut_back().is_ok()
                    && let Some(f) = &self.file
                {
                    let _ = f.sync_all();
                }
                Err(e)
            }
        }
    }
}

fn open_live(path: &Path) -> io::Result<File> {
    let existed = path.exists();
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another process", path.display()),
            ));
        }
        Err(fs::TryLockError::Error(e)) => return Err(e),
    }
    if !existed {
        sync_parent(path)?;
    }
    Ok(f)
}

/// `audit.jsonl` → `audit.jsonl.000042`.
pub fn rotated_name(live: &Path, index: u64) -> PathBuf {
    let mut name = live.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{index:06}"));
    live.with_file_name(name)
}

/// The rotated files beside `live` (`live` + `.` + digits), oldest first,
/// with their numbers.
pub fn rotated_files(live: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let Some(base) = live.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match live.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(base))
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        if !rest.is_empty()
            && rest.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = rest.parse::<u64>()
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The last complete line of the first `len` bytes of `f` (without `\n`),
/// and the length up to and including its `\n` (the part of the file made
/// of complete lines). Reads backwards in blocks, so a long log costs only
/// its tail.
fn last_line(f: &mut File, len: u64) -> io::Result<(Option<Vec<u8>>, u64)> {
    const BLOCK: u64 = 8192;
    // The bytes from `pos` to `len`, read so far.
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = len;
    loop {
        if let Some(last) = buf.iter().rposition(|&b| b == b'\n') {
            let end = pos + last as u64 + 1;
            if let Some(before) = buf[..last].iter().rposition(|&b| b == b'\n') {
                return Ok((Some(buf[before + 1..last].to_vec()), end));
            }
            if pos == 0 {
                return Ok((Some(buf[..last].to_vec()), end));
            }
        } else if pos == 0 {
            return Ok((None, 0));
        }
        let step = BLOCK.min(pos);
        pos -= step;
        let mut block = vec![0u8; step as usize];
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut block)?;
        block.extend_from_slice(&buf);
        buf = block;
    }
}

/// Lines to any writer (stdout for a log shipper, or a test buffer). A
/// writer cannot be cut back, so a failed write may leave a partial line in
/// the stream; the log still never chains onto a batch that failed.
pub struct WriterSink<W: Write + Send> {
    name: String,
    out: W,
}

impl<W: Write + Send> WriterSink<W> {
    pub fn new(name: impl Into<String>, out: W) -> Self {
        Self {
            name: name.into(),
            out,
        }
    }
}

impl WriterSink<io::Stdout> {
    /// JSON lines on stdout. "Durable" here means flushed to the pipe; the
    /// shipper at the other end owns the rest.
    pub fn stdout() -> Self {
        Self::new("stdout", io::stdout())
    }
}

impl<W: Write + Send> Sink for WriterSink<W> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn write_batch(&mut self, lines: &[u8], _durable: bool) -> io::Result<()> {
        self.out.write_all(lines)?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File, u64) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        fs::write(&p, bytes).unwrap();
        let f = File::open(&p).unwrap();
        (t, f, bytes.len() as u64)
    }

    #[test]
    fn last_line_finds_the_last_complete_line() {
        for (bytes, want, complete) in [
            (&b""[..], None, 0),
            (b"abc", None, 0),
            (b"abc\n", Some(&b"abc"[..]), 4),
            (b"a\nbc\n", Some(b"bc"), 5),
            (b"a\nbc\npartial", Some(b"bc"), 5),
            (b"a\n\n", Some(b""), 3),
        ] {
            let (_t, mut f, len) = file_with(bytes);
            let (got, n) = last_line(&mut f, len).unwrap();
            assert_eq!(got.as_deref(), want, "{bytes:?}");
            assert_eq!(n, complete, "{bytes:?}");
        }
        // Lines longer than a block.
        let long = "x".repeat(20_000);
        let text = format!("{long}\n{long}y\n{long}");
        let (_t, mut f, len) = file_with(text.as_bytes());
        let (got, n) = last_line(&mut f, len).unwrap();
        assert_eq!(got.unwrap(), format!("{long}y").into_bytes());
        assert_eq!(n, 2 * 20_001 + 1);
    }

    #[test]
    fn rotated_names_sort_oldest_first() {
        let t = tempfile::tempdir().unwrap();
        let live = t.path().join("audit.jsonl");
        for n in [2, 10, 1] {
            fs::write(rotated_name(&live, n), b"").unwrap();
        }
        fs::write(t.path().join("audit.jsonl.bak"), b"").unwrap();
        fs::write(t.path().join("audit.jsonl.1x"), b"").unwrap();
        let got: Vec<u64> = rotated_files(&live)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, [1, 2, 10]);
        assert!(rotated_name(&live, 7).ends_with("audit.jsonl.000007"));
    }

    #[test]
    fn a_failed_batch_is_cut_off_the_file() {
        let t = tempfile::tempdir().unwrap();
        let live = t.path().join("audit.jsonl");
        let mut sink = FileSink::open(&live, None).unwrap();
        sink.write_batch(b"one\n", true).unwrap();
        sink.fail_next_write_after = Some(5);
        assert!(sink.write_batch(b"two\nthree\n", true).is_err());
        assert_eq!(fs::read(&live).unwrap(), b"one\n");
        sink.write_batch(b"four\n", true).unwrap();
        assert_eq!(fs::read(&live).unwrap(), b"one\nfour\n");
    }

    #[test]
    fn rotates_between_batches_and_resumes_from_the_newest_file() {
        let t = tempfile::tempdir().unwrap();
        let live = t.path().join("audit.jsonl");
        let mut sink = FileSink::open(&live, Some(10)).unwrap();
        sink.write_batch(b"aaaa\n", true).unwrap();
        sink.write_batch(b"bbbb\n", true).unwrap(); // exactly 10: no rotation
        sink.write_batch(b"cccccccccccc\n", true).unwrap(); // rotates first, then one big file
        sink.write_batch(b"d\n", true).unwrap(); // rotates again
        assert_eq!(fs::read(rotated_name(&live, 1)).unwrap(), b"aaaa\nbbbb\n");
        assert_eq!(fs::read(rotated_name(&live, 2)).unwrap(), b"cccccccccccc\n");
        assert_eq!(fs::read(&live).unwrap(), b"d\n");
        drop(sink);
        // A live file left empty by a rotation: the tail is in the newest
        // rotated file.
        fs::rename(&live, rotated_name(&live, 3)).unwrap();
        let mut sink = FileSink::open(&live, Some(10)).unwrap();
        let tail = sink.resume().unwrap();
        assert_eq!(tail.last_line.as_deref(), Some(&b"d"[..]));
        assert!(tail.repaired.is_none());
        sink.write_batch(b"e\n", true).unwrap();
        drop(sink);
        // An incomplete last line is cut off on open, and said so.
        fs::write(&live, b"e\npart").unwrap();
        let mut sink = FileSink::open(&live, Some(10)).unwrap();
        let tail = sink.resume().unwrap();
        assert_eq!(tail.last_line.as_deref(), Some(&b"e"[..]));
        assert!(tail.repaired.unwrap().contains("cut 4 bytes"));
        assert_eq!(fs::read(&live).unwrap(), b"e\n");
    }

    #[test]
    fn rotates_a_live_file_older_than_max_age() {
        let t = tempfile::tempdir().unwrap();
        let live = t.path().join("audit.jsonl");
        let age = std::time::Duration::from_millis(300);
        let mut sink = FileSink::open(&live, None).unwrap().with_max_age(Some(age));
        sink.write_batch(b"a\n", true).unwrap();
        sink.write_batch(b"b\n", true).unwrap(); // young: same file
        assert!(!rotated_name(&live, 1).exists());
        std::thread::sleep(age + std::time::Duration::from_millis(50));
        sink.write_batch(b"c\n", true).unwrap(); // old: rotated first
        assert_eq!(fs::read(rotated_name(&live, 1)).unwrap(), b"a\nb\n");
        assert_eq!(fs::read(&live).unwrap(), b"c\n");
        // The new live file's age starts at the rotation.
        sink.write_batch(b"d\n", true).unwrap();
        assert!(!rotated_name(&live, 2).exists());
        assert_eq!(fs::read(&live).unwrap(), b"c\nd\n");
        // An empty live file is never rotated, however old.
        drop(sink);
        fs::write(&live, b"").unwrap();
        let mut sink = FileSink::open(&live, None).unwrap().with_max_age(Some(age));
        std::thread::sleep(age + std::time::Duration::from_millis(50));
        sink.write_batch(b"e\n", true).unwrap();
        assert!(!rotated_name(&live, 2).exists());
    }

    #[test]
    fn a_second_process_cannot_open_the_live_file() {
        let t = tempfile::tempdir().unwrap();
        let live = t.path().join("audit.jsonl");
        let _first = FileSink::open(&live, None).unwrap();
        let e = FileSink::open(&live, None).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
    }
}
