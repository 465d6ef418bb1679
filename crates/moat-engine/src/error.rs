//! Engine errors, split by who is at fault: the request (400), capacity
//! (503), an upstream (502/503), or the model / engine itself (500 and load failures).

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as asked; `param` names the field.
    #[error("{message}")]
    InvalidRequest { param: Option<String>, message: String },
    /// The queue or the KV-cache budget is full; retry in `retry_after`
    /// seconds (sent as `Retry-After`).
    #[error("model {model} is overloaded: {reason}; retry later")]
    Overloaded {
        model: String,
        reason: String,
        retry_after: u64,
    },
    /// The model could not be loaded; names the file and what is wrong.
    #[error("model {model}: {message}")]
    Load { model: String, message: String },
    /// No upstream of the model could answer (all down, cooling down or
    /// failing); `retry_after` seconds until the first comes back.
    #[error("{message}")]
    Unavailable {
        model: String,
        message: String,
        retry_after: u64,
    },
    /// An upstream answered wrongly after text already reached the client,
    /// or with something no retry can fix.
    #[error("{0}")]
    BadGateway(String),
    /// A failure while running the model.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl EngineError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        EngineError::InvalidRequest {
            param: param.map(str::to_owned),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Inference(e.to_string())
    }
}
