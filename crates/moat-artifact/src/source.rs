//! Model sources. Only local folders (`file://`) exist so far; the other
//! schemes are recognised so that their absence is a clear error rather than
//! a confusing "no such folder".

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local folder, as an absolute, canonical path.
    Local(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {0:?}: scheme not supported yet (supported: file://DIR)")]
    Unsupported(String),
    #[error("source {0:?}: expected file:///absolute/path or file://relative/path")]
    Malformed(String),
    #[error("source {url:?}: {path}: {source}")]
    Io {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("source {url:?}: {path} is not a folder")]
    NotAFolder { url: String, path: PathBuf },
    #[error("source {0:?}: file:// sources have no revisions; drop --revision")]
    RevisionOnLocal(String),
}

impl Source {
    pub fn parse(url: &str, revision: Option<&str>) -> Result<Self, SourceError> {
        let Some(rest) = url.strip_prefix("file://") else {
            return Err(SourceError::Unsupported(url.to_owned()));
        };
        if revision.is_some() {
            return Err(SourceError::RevisionOnLocal(url.to_owned()));
        }
        if rest.is_empty() || rest.contains('\0') {
            return Err(SourceError::Malformed(url.to_owned()));
        }
        let raw = PathBuf::from(rest);
        let path = std::fs::canonicalize(&raw).map_err(|source| SourceError::Io {
            url: url.to_owned(),
            path: raw.clone(),
            source,
        })?;
        if !path.is_dir() {
            return Err(SourceError::NotAFolder {
                url: url.to_owned(),
                path,
            });
        }
        Ok(Source::Local(path))
    }

    /// The canonical URL recorded in the lock.
    pub fn url(&self) -> String {
        match self {
            Source::Local(p) => format!("file://{}", p.display()),
        }
    }
}
