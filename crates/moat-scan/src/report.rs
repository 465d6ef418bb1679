//! The scan report: what was scanned, what was found, and the verdict per file.
//!
//! The JSON shape is a public contract (`moat scan --format json`, and `moat
//! pull` refusals are built from it), so the field names and enum spellings
//! here must not change without a major version.

use serde::{Deserialize, Serialize};

use crate::sniff::Format;

/// How bad a finding is. High and critical make a file unsafe; low and medium
/// are informational.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// Whether a finding of this severity makes its file unsafe.
    pub fn is_blocking(self) -> bool {
        self >= Severity::High
    }
}

/// The outcome for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Nothing high or critical was found.
    Clean,
    /// At least one high or critical finding.
    Unsafe,
    /// The file could not be read or analysed, so nothing is known about it.
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::Unsafe => "unsafe",
            Verdict::Error => "error",
        }
    }
}

/// One rule that fired on one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Stable rule id, e.g. `safetensors.offsets` or `hf.remote-code`.
    pub rule: String,
    pub severity: Severity,
    pub message: String,
    /// Where in the file: "header", "offset 8", "key auto_map"; "" when the
    /// finding is about the file as a whole.
    pub location: String,
}

impl Finding {
    pub fn new(
        rule: impl Into<String>,
        severity: Severity,
        message: impl Into<String>,
        location: impl Into<String>,
    ) -> Self {
        Finding {
            rule: rule.into(),
            severity,
            message: message.into(),
            location: location.into(),
        }
    }
}

/// Everything known about one scanned file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    /// Relative to the scanned folder, or as given for a file argument.
    pub path: String,
    pub format: Format,
    pub verdict: Verdict,
    pub findings: Vec<Finding>,
    /// Files (relative to this file's folder) that its loader reads as raw
    /// data: an ONNX model's external data locations that passed the path
    /// checks. Not part of the JSON report; used by the folder-level pass
    /// in [`crate::scan_paths`].
    #[serde(skip)]
    pub external_data: Vec<String>,
}

impl FileReport {
    /// A file that was analysed: unsafe if any finding is high or critical.
    pub fn new(path: impl Into<String>, format: Format, findings: Vec<Finding>) -> Self {
        let verdict = if findings.iter().any(|f| f.severity.is_blocking()) {
            Verdict::Unsafe
        } else {
            Verdict::Clean
        };
        FileReport {
            path: path.into(),
            format,
            verdict,
            findings,
            external_data: Vec::new(),
        }
    }

    /// A file that could not be read or analysed; `findings` say why.
    pub fn failed(path: impl Into<String>, format: Format, findings: Vec<Finding>) -> Self {
        FileReport {
            path: path.into(),
            format,
            verdict: Verdict::Error,
            findings,
            external_data: Vec::new(),
        }
    }
}

/// Counts over all files of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Summary {
    pub files: usize,
    #[serde(rename = "unsafe")]
    pub unsafe_files: usize,
    pub errors: usize,
}

/// The result of one scan.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Report {
    pub files: Vec<FileReport>,
    pub summary: Summary,
}

impl Report {
    /// Builds a report and its summary from per-file reports, keeping their order.
    pub fn from_files(files: Vec<FileReport>) -> Self {
        let summary = Summary {
            files: files.len(),
            unsafe_files: files.iter().filter(|f| f.verdict == Verdict::Unsafe).count(),
            errors: files.iter().filter(|f| f.verdict == Verdict::Error).count(),
        };
        Report { files, summary }
    }

    /// The contract shape, on one line.
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and integers to a String
        // cannot fail; the fallback only keeps this function total.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                "{{\"error\":{}}}",
                serde_json::Value::String(format!("report serialization failed: {e}"))
            )
        })
    }

    /// Human-readable: one line per file, its findings indented below it,
    /// then a summary line. Control characters from file names or file
    /// contents are escaped so a hostile name cannot drive the terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for file in &self.files {
            out.push_str(&printable(&file.path));
            out.push_str("  ");
            out.push_str(file.format.as_str());
            out.push_str("  ");
            out.push_str(file.verdict.as_str());
            out.push('\n');
            for f in &file.findings {
                out.push_str("    ");
                out.push_str(f.severity.as_str());
                out.push(' ');
                out.push_str(&printable(&f.rule));
                out.push_str(": ");
                out.push_str(&printable(&f.message));
                if !f.location.is_empty() {
                    out.push_str(" (");
                    out.push_str(&printable(&f.location));
                    out.push(')');
                }
                out.push('\n');
            }
        }
        let s = &self.summary;
        out.push_str(&format!(
            "{} {} scanned, {} unsafe, {} {}\n",
            s.files,
            if s.files == 1 { "file" } else { "files" },
            s.unsafe_files,
            s.errors,
            if s.errors == 1 { "error" } else { "errors" },
        ));
        out
    }

    /// True when every file is clean (an unreadable file is not clean).
    pub fn is_clean(&self) -> bool {
        self.files.iter().all(|f| f.verdict == Verdict::Clean)
    }

    /// The first unsafe file and its first high or critical finding.
    pub fn first_unsafe(&self) -> Option<(&FileReport, &Finding)> {
        self.files
            .iter()
            .filter(|f| f.verdict == Verdict::Unsafe)
            .find_map(|f| {
                f.findings
                    .iter()
                    .find(|x| x.severity.is_blocking())
                    .map(|x| (f, x))
            })
    }

    /// The first file that could not be analysed and the finding saying why.
    pub fn first_error(&self) -> Option<(&FileReport, &Finding)> {
        self.files
            .iter()
            .filter(|f| f.verdict == Verdict::Error)
            .find_map(|f| f.findings.first().map(|x| (f, x)))
    }
}

/// Escapes control characters (and nothing else) so that untrusted text can
/// be printed to a terminal or log line safely.
pub(crate) fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Quotes an untrusted name for a message: `'name'`, control characters
/// escaped, very long names shortened so one hostile key cannot bloat a report.
pub(crate) fn quote(name: &str) -> String {
    const MAX_CHARS: usize = 200;
    let mut shown: String = name.chars().take(MAX_CHARS).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    format!("'{}'", printable(&shown))
}

#[cfg(test)]
mod tests;
