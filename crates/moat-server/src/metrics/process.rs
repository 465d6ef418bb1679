//! Process metrics in the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …), read
//! from `/proc/self` at scrape time so they cost nothing between scrapes.
//!
//! A value that cannot be read (not Linux, `/proc` not mounted, a format we
//! do not understand) is left out of the scrape rather than reported as 0:
//! an absent series is visibly missing, a zero looks like a healthy process.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::path::Path;

/// Clock ticks per second of the times in `/proc/*/stat`. The kernel always
/// reports them in USER_HZ, which is 100 on every Linux ABI (Prometheus's
/// own Go `procfs` hard-codes the same value); reading `sysconf` would need
/// `unsafe`, which this workspace forbids.
const USER_HZ: f64 = 100.0;

/// The values of one scrape; `None` where the source could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub threads: Option<f64>,
}

impl ProcessStats {
    /// Read the running process's figures from `proc` (normally `/proc`).
    pub fn read(proc: &Path) -> Self {
        let me = proc.join("self");
        let stat = std::fs::read_to_string(me.join("stat")).ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let field = |i: usize| {
            fields
                .as_ref()
                .and_then(|f| f.get(i))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let status = std::fs::read_to_string(me.join("status")).unwrap_or_default();
        let boot_time = std::fs::read_to_string(proc.join("stat"))
            .ok()
            .and_then(|s| boot_time(&s));
        Self {
            // utime and stime (fields 14 and 15 of proc(5), 0-based 11 and
            // 12 after the command name).
            cpu_seconds: field(11).zip(field(12)).map(|(u, s)| (u + s) / USER_HZ),
            resident_bytes: status_kib(&status, "VmRSS:").map(|k| k * 1024.0),
            virtual_bytes: status_kib(&status, "VmSize:").map(|k| k * 1024.0),
            threads: status_value(&status, "Threads:"),
            open_fds: std::fs::read_dir(me.join("fd")).ok().map(|d| d.count() as f64),
            max_fds: std::fs::read_to_string(me.join("limits"))
                .ok()
                .and_then(|l| max_open_files(&l)),
            // starttime (field 22) is in ticks after boot.
            start_time_seconds: boot_time.zip(field(19)).map(|(b, t)| b + t / USER_HZ),
        }
    }
}

/// The fields of `/proc/self/stat` after `pid (comm)`. The command name may
/// hold spaces and parentheses, so the split starts after the last `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// `btime` of `/proc/stat`: boot time in Unix seconds.
fn boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn status_value(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A `/proc/self/status` line like `VmRSS:   1234 kB`.
fn status_kib(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.trim_end().ends_with("kB").then_some(())?;
    status_value(status, key)
}

/// The soft limit of `Max open files` in `/proc/self/limits` (absent when
/// unlimited: there is no number to report).
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Registered on the unprefixed root registry: the `process_` names are the
/// ecosystem's, not moat's.
#[derive(Debug)]
pub struct ProcessCollector {
    pub proc: std::path::PathBuf,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read(&self.proc);
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            ("process_open_fds", "Number of open file descriptors", s.open_fds),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                s.threads,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let stat = "1234 (moat (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 4200 1000 10";
        let f = stat_fields(stat).unwrap_or_default();
        assert_eq!(f[0], "S");
        assert_eq!(f[11], "250");
        assert_eq!(f[12], "50");
        assert_eq!(f[19], "4200");
    }

    #[test]
    fn limits_and_status_parse() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024.0));
        assert_eq!(max_open_files("Max open files unlimited unlimited files"), None);
        let status = "Name:\tmoat\nVmSize:\t  200 kB\nVmRSS:\t   100 kB\nThreads:\t7\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(100.0));
        assert_eq!(status_kib(status, "VmSize:"), Some(200.0));
        assert_eq!(status_value(status, "Threads:"), Some(7.0));
        assert_eq!(status_kib("VmRSS: 5 pages\n", "VmRSS:"), None);
        assert_eq!(boot_time("cpu 1 2 3\nbtime 1700000000\n"), Some(1.7e9));
    }

    #[test]
    fn missing_proc_gives_absent_values_not_zero() {
        let s = ProcessStats::read(Path::new("/nonexistent-proc"));
        assert_eq!(s, ProcessStats::default());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads() {
        let s = ProcessStats::read(Path::new("/proc"));
        assert!(s.resident_bytes.is_some_and(|v| v > 0.0), "{s:?}");
        assert!(s.open_fds.is_some_and(|v| v >= 3.0), "{s:?}");
        assert!(s.cpu_seconds.is_some(), "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        assert!(
            s.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86400.0 * 365.0),
            "{s:?}"
        );
    }
}
