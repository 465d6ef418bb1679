//! Pickle analysis: a symbolic VM ([`vm`]) judged by an allowlist ([`policy`]).
//!
//! Loading a pickle *is* running a program: every import and call in it
//! happens at `pickle.load`. So the question is not "does it look like
//! malware" but "does it do anything beyond rebuilding tensors and arrays",
//! and that is answered by walking the program without running it.

pub mod policy;
pub mod vm;

use crate::report::{Finding, Severity};

pub use vm::{Options, Walk};

/// Stable rule ids.
pub mod rule {
    /// An import known to reach code execution (os.system, builtins.eval...).
    pub const IMPORT_CRITICAL: &str = "pickle.import.critical";
    /// An import that is not on the allowlist.
    pub const IMPORT_UNSAFE: &str = "pickle.import.unsafe";
    /// A call (REDUCE, OBJ, NEWOBJ, BUILD, container methods) of a
    /// non-allowlisted or computed callee.
    pub const CALL_UNSAFE: &str = "pickle.call.unsafe";
    /// STACK_GLOBAL with operands that are not constant strings.
    pub const IMPORT_DYNAMIC: &str = "pickle.import.dynamic";
    /// EXT1/EXT2/EXT4: imports through the extension registry.
    pub const EXT: &str = "pickle.ext";
    /// The stream does not parse (truncated, unknown opcode, underflow...).
    pub const MALFORMED: &str = "pickle.malformed";
    /// A scanner limit was reached.
    pub const LIMIT: &str = "pickle.limit";
}

/// At most this many findings of one rule are kept; the rest are counted in
/// one closing finding, so a hostile file cannot produce a huge report.
pub const MAX_PER_RULE: usize = 20;

/// Collects findings with a per-rule cap.
#[derive(Debug, Default)]
pub struct Sink {
    findings: Vec<Finding>,
    /// (rule, findings seen, worst severity of the dropped ones)
    counts: Vec<(String, usize, Severity)>,
}

impl Sink {
    pub fn new() -> Self {
        Sink::default()
    }

    pub fn push(&mut self, finding: Finding) {
        let slot = match self.counts.iter().position(|(r, _, _)| *r == finding.rule) {
            Some(i) => i,
            None => {
                self.counts.push((finding.rule.clone(), 0, Severity::Low));
                self.counts.len() - 1
            }
        };
        let Some((_, seen, worst)) = self.counts.get_mut(slot) else {
            return;
        };
        *seen += 1;
        if *seen <= MAX_PER_RULE {
            self.findings.push(finding);
        } else {
            *worst = (*worst).max(finding.severity);
        }
    }

    pub fn extend(&mut self, findings: impl IntoIterator<Item = Finding>) {
        for f in findings {
            self.push(f);
        }
    }

    /// Whether any finding so far makes the file unsafe.
    pub fn is_blocking(&self) -> bool {
        self.findings.iter().any(|f| f.severity.is_blocking())
    }

    /// The kept findings, then one summary per rule that overflowed.
    pub fn finish(self) -> Vec<Finding> {
        let mut out = self.findings;
        for (rule, seen, worst) in self.counts {
            if seen > MAX_PER_RULE {
                out.push(Finding::new(
                    rule.clone(),
                    worst,
                    format!(
                        "{} more findings of rule {rule} were not listed",
                        seen - MAX_PER_RULE
                    ),
                    "",
                ));
            }
        }
        out
    }
}

/// Scans a byte string holding one or more pickles.
pub fn scan(data: &[u8], member: &str) -> Vec<Finding> {
    let mut sink = Sink::new();
    vm::walk(data, member, Options::default(), &mut sink);
    sink.finish()
}

/// Entry point for cargo-fuzz: must never panic or hang on any input.
pub fn fuzz_pickle_vm(data: &[u8]) {
    let _ = scan(data, "");
    let mut sink = Sink::new();
    vm::walk(
        data,
        "m",
        Options {
            max_pickles: Some(5),
            joblib: true,
        },
        &mut sink,
    );
    let _ = sink.finish();
}

#[cfg(test)]
mod tests;
