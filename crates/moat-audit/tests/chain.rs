//! The audit log end to end on real files: every tamper the issue names is
//! caught at the first bad record; concurrent appenders (threads and tokio
//! tasks) make one gapless chain; a failing sink fails every waiter, is
//! counted, and the chain continues correctly afterwards; rotation, reopen,
//! key rotation and drop keep the chain whole.

// Test fixtures: a failed setup step must abort the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use moat_audit::{
    AuditError, AuditKeys, AuditLog, AuditOptions, AuditRecord, FileSink, Outcome, Problem, Sink,
    VerifyError, VerifyOptions, action, rotated_name, verify, verify_with,
};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn keys() -> AuditKeys {
    AuditKeys::single(1, [9; 32]).unwrap()
}

fn record(i: usize) -> AuditRecord {
    let mut r = AuditRecord::new(action::INFERENCE_CHAT, Outcome::Allowed);
    r.request_id = Some(format!("req-{i}"));
    r.principal = Some("key-abc".into());
    r.resource = Some(format!("r{i}"));
    r.model = Some("r1-tiny".into());
    r.model_digest = Some("sha256:00ff".into());
    r.prompt_tokens = Some(12);
    r.completion_tokens = Some(34);
    r.client_addr = Some("127.0.0.1:5000".into());
    r.prompt_hmac = Some(keys().prompt_hmac("hello"));
    r
}

fn open_file_log(live: &Path, max_bytes: Option<u64>) -> AuditLog {
    let sink = FileSink::open(live, max_bytes).unwrap();
    AuditLog::open(vec![Box::new(sink)], keys(), AuditOptions::default()).unwrap()
}

/// `n` records appended one by one to `dir/audit.jsonl`; the files, oldest
/// first.
fn write_log(dir: &Path, n: usize, max_bytes: Option<u64>) -> Vec<PathBuf> {
    let live = dir.join("audit.jsonl");
    let log = open_file_log(&live, max_bytes);
    for i in 0..n {
        log.append(record(i)).unwrap();
    }
    log.close().unwrap();
    log_files(&live)
}

fn log_files(live: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = moat_audit::rotated_files(live)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push(live.to_owned());
    files
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// The first bad record, which verification must report.
fn broken(files: &[PathBuf]) -> moat_audit::ChainError {
    match verify(files, &keys()) {
        Err(VerifyError::Broken(e)) => e,
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[test]
fn an_untouched_log_verifies() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 30, None);
    let s = verify(&files, &keys()).unwrap();
    assert_eq!(s.records, 30);
    assert_eq!((s.first_seq, s.last_seq), (Some(1), Some(30)));
    assert!(s.first_time.is_some() && s.last_time >= s.first_time);
    assert_eq!(s.key_versions.into_iter().collect::<Vec<_>>(), [1]);
    // The prompt itself is never in the log.
    assert!(!fs::read_to_string(&files[0]).unwrap().contains("hello"));
}

#[test]
fn any_edited_byte_is_caught_at_that_record() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 12, None);
    let live = &files[0];
    let original = fs::read(live).unwrap();
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            original
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    // Every byte of record 7 (line 7), its newline included.
    for at in starts[6]..starts[7] {
        let mut bytes = original.clone();
        bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
        fs::write(live, &bytes).unwrap();
        let e = broken(&files);
        assert_eq!(e.line, 7, "byte {at}: {e}");
        assert!(
            matches!(
                e.problem,
                Problem::BadMac | Problem::NotRecord(_) | Problem::NoMac | Problem::UnknownKey(_)
            ),
            "byte {at}: {e}"
        );
    }
}

#[test]
fn a_deleted_record_is_caught_at_the_next() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 10, None);
    let mut l = lines(&files[0]);
    l.remove(4);
    write_lines(&files[0], &l);
    let e = broken(&files);
    assert_eq!((e.line, e.seq), (5, Some(6)), "{e}");
    assert_eq!(
        e.problem,
        Problem::Seq {
            expected: 5,
            found: 6
        }
    );
    assert!(
        e.to_string()
            .contains("audit.jsonl:5 (seq 6): seq 6 where 5 was expected"),
        "{e}"
    );
}

#[test]
fn swapped_records_are_caught_at_the_first() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 10, None);
    let mut l = lines(&files[0]);
    l.swap(3, 4);
    write_lines(&files[0], &l);
    let e = broken(&files);
    assert_eq!((e.line, e.seq), (4, Some(5)), "{e}");
    assert_eq!(
        e.problem,
        Problem::Seq {
            expected: 4,
            found: 5
        }
    );
}

#[test]
fn a_truncated_file_is_caught() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 10, None);
    let len = fs::metadata(&files[0]).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(len - 20)
        .unwrap();
    let e = broken(&files);
    assert_eq!((e.line, e.problem.clone()), (10, Problem::PartialLine), "{e}");
}

#[test]
fn rotation_keeps_one_chain_across_files_in_any_order() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 40, Some(2_000));
    assert!(files.len() >= 4, "{files:?}");
    assert!(files[0].ends_with("audit.jsonl.000001"));
    for f in &files[..files.len() - 1] {
        assert!(fs::metadata(f).unwrap().len() <= 2_000, "{}", f.display());
    }
    let in_order = verify(&files, &keys()).unwrap();
    assert_eq!((in_order.records, in_order.last_seq), (40, Some(40)));
    let mut shuffled = files.clone();
    shuffled.reverse();
    shuffled.swap(0, 1);
    assert_eq!(verify(&shuffled, &keys()).unwrap().files, in_order.files);
}

#[test]
fn a_dropped_rotated_file_is_caught() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 40, Some(2_000));
    // A middle file: the gap shows at the first record of the next one.
    let mut without = files.clone();
    without.remove(1);
    let e = broken(&without);
    assert_eq!((e.file.clone(), e.line), (files[2].clone(), 1), "{e}");
    assert!(matches!(e.problem, Problem::Seq { .. }), "{e}");
    // The oldest file: the chain no longer starts at seq 1.
    let e = broken(&files[1..]);
    assert_eq!((e.file.clone(), e.line), (files[1].clone(), 1), "{e}");
    assert!(matches!(e.problem, Problem::Start(_)), "{e}");
    // … which retention does on purpose, and --partial accepts.
    let opts = VerifyOptions {
        allow_partial_start: true,
    };
    assert!(verify_with(&files[1..], &keys(), &opts).is_ok());
    // The tail of a rotated file cut at a line boundary: the gap shows in
    // the next file.
    let mut l = lines(&files[0]);
    l.pop();
    write_lines(&files[0], &l);
    let e = broken(&files);
    assert_eq!((e.file.clone(), e.line), (files[1].clone(), 1), "{e}");
}

#[test]
fn reopening_continues_the_chain_and_repairs_a_cut_write() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    write_log(t.path(), 5, None);
    write_log(t.path(), 5, None);
    // A crash between write and fsync leaves an incomplete line.
    let mut f = fs::OpenOptions::new().append(true).open(&live).unwrap();
    io::Write::write_all(&mut f, b"{\"seq\":11,\"ti").unwrap();
    drop(f);
    let files = write_log(t.path(), 1, None);
    let s = verify(&files, &keys()).unwrap();
    assert_eq!((s.records, s.last_seq), (12, Some(12)));
    let l = lines(&live);
    let repair: AuditRecord = serde_json::from_str(&l[10]).unwrap();
    assert_eq!((repair.seq, repair.action.as_str()), (11, action::AUDIT_REPAIR));
    assert!(repair.reason.unwrap().contains("cut 13 bytes"));
}

#[test]
fn reopening_after_a_rotation_continues_from_the_newest_rotated_file() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    write_log(t.path(), 10, None);
    fs::rename(&live, rotated_name(&live, 1)).unwrap();
    let files = write_log(t.path(), 3, None);
    assert_eq!(files.len(), 2);
    let s = verify(&files, &keys()).unwrap();
    assert_eq!((s.records, s.last_seq), (13, Some(13)));
}

#[test]
fn eight_threads_make_one_gapless_chain() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    let log = Arc::new(open_file_log(&live, Some(20_000)));
    let threads: Vec<_> = (0..8)
        .map(|th| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    log.append(record(th * 1000 + i)).unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let stats = log.stats();
    log.close().unwrap();
    assert_eq!((stats.written, stats.failures, stats.last_seq), (800, 0, 800));
    assert!(stats.batches <= 800);
    let files = log_files(&live);
    let s = verify(&files, &keys()).unwrap();
    assert_eq!((s.records, s.first_seq, s.last_seq), (800, Some(1), Some(800)));
    let mut seen: Vec<String> = files
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| serde_json::from_str::<AuditRecord>(&l).unwrap().resource.unwrap())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 800);
}

#[test]
fn tokio_tasks_make_one_gapless_chain() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    let log = Arc::new(open_file_log(&live, None));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|task| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..25 {
                        log.append_async(record(task * 100 + i)).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    log.close().unwrap();
    let s = verify(&[live], &keys()).unwrap();
    assert_eq!((s.records, s.last_seq), (800, Some(800)));
}

/// A file sink that can be switched to fail every write.
struct Flaky {
    inner: FileSink,
    fail: Arc<AtomicBool>,
}

impl Sink for Flaky {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn resume(&mut self) -> io::Result<moat_audit::Tail> {
        self.inner.resume()
    }
    fn write_batch(&mut self, lines: &[u8], durable: bool) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device",
            ));
        }
        self.inner.write_batch(lines, durable)
    }
}

#[test]
fn a_failing_sink_fails_every_waiter_and_the_chain_resumes_after() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    let fail = Arc::new(AtomicBool::new(false));
    let sink = Flaky {
        inner: FileSink::open(&live, None).unwrap(),
        fail: fail.clone(),
    };
    let log = Arc::new(AuditLog::open(vec![Box::new(sink)], keys(), AuditOptions::default()).unwrap());
    for i in 0..5 {
        log.append(record(i)).unwrap();
    }
    fail.store(true, Ordering::SeqCst);
    let threads: Vec<_> = (0..8)
        .map(|th| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| log.append(record(100 * th + i)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for th in threads {
        for r in th.join().unwrap() {
            let e = r.unwrap_err();
            assert!(
                matches!(e, AuditError::Write { .. }) && e.is_write_failure(),
                "{e}"
            );
            assert!(e.to_string().contains("no space left"), "{e}");
        }
    }
    assert_eq!(log.failures(), 80);
    assert_eq!(log.stats().last_seq, 5);
    fail.store(false, Ordering::SeqCst);
    for i in 0..5 {
        log.append(record(1000 + i)).unwrap();
    }
    log.close().unwrap();
    let s = verify(std::slice::from_ref(&live), &keys()).unwrap();
    // 5 before, one record of the failure, 5 after; no seq skipped.
    assert_eq!((s.records, s.last_seq), (11, Some(11)));
    let note: AuditRecord = serde_json::from_str(&lines(&live)[5]).unwrap();
    assert_eq!(
        (note.action.as_str(), note.outcome),
        (action::AUDIT_WRITE_FAILED, Outcome::Error)
    );
    assert!(
        note.reason
            .unwrap()
            .starts_with("80 audit record(s) could not be written")
    );
}

#[test]
fn an_unwritable_file_fails_every_waiter() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("audit.jsonl");
    fs::write(&path, b"").unwrap();
    // Opened read-only, as if made read-only under us: every write fails.
    let sink = moat_audit::WriterSink::new("ro", fs::File::open(&path).unwrap());
    let log = Arc::new(AuditLog::open(vec![Box::new(sink)], keys(), AuditOptions::default()).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let results = rt.block_on(async {
        let futs: Vec<_> = (0..8).map(|i| log.append_async(record(i))).collect();
        let mut out = Vec::new();
        for f in futs {
            out.push(f.await);
        }
        out
    });
    assert!(
        results.iter().all(|r| matches!(r, Err(AuditError::Write { .. }))),
        "{results:?}"
    );
    assert_eq!(log.failures(), 8);
}

#[test]
fn drop_writes_everything_queued() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    let log = open_file_log(&live, None);
    for i in 0..500 {
        log.submit(record(i)).unwrap();
    }
    drop(log);
    let s = verify(&[live], &keys()).unwrap();
    assert_eq!(s.records, 500);
}

#[test]
fn key_rotation_keeps_old_records_verifiable() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    let v1 = keys();
    let v2 = v1.rotated().unwrap();
    let log = open_file_log(&live, None);
    log.append(record(0)).unwrap();
    log.set_keys(v2.clone());
    log.append(record(1)).unwrap();
    log.close().unwrap();
    let files = vec![live];
    let s = verify(&files, &v2).unwrap();
    assert_eq!(s.key_versions.into_iter().collect::<Vec<_>>(), [1, 2]);
    // Without version 1, the first record cannot be checked.
    let only_v2 = AuditKeys::single(2, *v2.get(2).unwrap()).unwrap();
    let Err(VerifyError::Broken(e)) = verify(&files, &only_v2) else {
        panic!()
    };
    assert_eq!((e.line, e.problem), (1, Problem::UnknownKey(1)));
    // Another key under the same version number: every MAC fails.
    let other = AuditKeys::single(1, [8; 32]).unwrap();
    let Err(VerifyError::Broken(e)) = verify(&files, &other) else {
        panic!()
    };
    assert_eq!((e.line, e.problem), (1, Problem::BadMac));
}

#[test]
fn a_mirror_gets_the_same_lines() {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    let buf = Buf::default();
    let log = AuditLog::open(
        vec![
            Box::new(FileSink::open(&live, None).unwrap()),
            Box::new(moat_audit::WriterSink::new("mirror", buf.clone())),
        ],
        keys(),
        AuditOptions::default(),
    )
    .unwrap();
    for i in 0..10 {
        log.append(record(i)).unwrap();
    }
    log.close().unwrap();
    assert_eq!(*buf.0.lock().unwrap(), fs::read(&live).unwrap());
}

#[test]
fn the_same_file_twice_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let files = write_log(t.path(), 3, None);
    let e = broken(&[files[0].clone(), files[0].clone()]);
    assert!(matches!(e.problem, Problem::DuplicateStart(_)), "{e}");
}

#[test]
fn checkpoints_are_on_the_chain_and_checked() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    let sink = FileSink::open(&live, None).unwrap();
    let options = AuditOptions {
        checkpoint_every: 4,
        ..AuditOptions::default()
    };
    let log = AuditLog::open(vec![Box::new(sink)], keys(), options).unwrap();
    for i in 0..10 {
        log.append(record(i)).unwrap();
    }
    log.close().unwrap();
    let s = verify(std::slice::from_ref(&live), &keys()).unwrap();
    assert_eq!((s.records, s.checkpoints), (12, 2));
    let cp: AuditRecord = serde_json::from_str(&lines(&live)[4]).unwrap();
    assert_eq!(cp.action, action::CHECKPOINT);
    assert_eq!(cp.checkpoint.unwrap().records, 4);
}

#[test]
fn a_log_whose_last_line_is_not_a_record_is_not_continued() {
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("audit.jsonl");
    fs::write(&live, b"{\"not\":\"a record\"}\n").unwrap();
    let sink = FileSink::open(&live, None).unwrap();
    let e = AuditLog::open(vec![Box::new(sink)], keys(), AuditOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, AuditError::Resume { .. }), "{e}");
    assert!(e.to_string().contains("moat audit verify"), "{e}");
}

/// A full disk, for real: `/dev/full` takes no bytes (ENOSPC). The file
/// sink opens it like a log file, and every append fails and is counted.
#[test]
fn a_full_device_fails_every_append() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let sink = FileSink::open(full, None).unwrap();
    let log = AuditLog::open(vec![Box::new(sink)], keys(), AuditOptions::default()).unwrap();
    for i in 0..3 {
        let e = log.append(record(i)).unwrap_err();
        assert!(e.is_write_failure(), "{e}");
    }
    assert_eq!((log.failures(), log.stats().last_seq), (3, 0));
}
