//! Chat templates: the Jinja template shipped in the model's
//! `tokenizer_config.json`, rendered with minijinja.
//!
//! A template is code that came with the model, so it runs sandboxed:
//! minijinja has no file system, import or attribute access to host objects;
//! `include`/`import` have no loader; execution is bounded by fuel so a
//! hostile template cannot loop forever. Python string methods used by real
//! templates (`.split()`, `.strip()`, …) come from minijinja-contrib's pycompat.

use crate::error::EngineError;
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

/// Upper bound on template work per render (minijinja instructions).
const FUEL: u64 = 2_000_000;

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'a str,
    content: &'a str,
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source)
            .map_err(|e| format!("chat_template does not parse: {e}"))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Render `messages` with the generation prompt appended.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String, EngineError> {
        let msgs: Vec<Msg<'_>> = messages
            .iter()
            .map(|(r, c)| Msg { role: r, content: c })
            .collect();
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Inference(format!("chat template: {e}")))?;
        tmpl.render(context! {
            messages => Value::from(minijinja::value::Serde(&msgs)),
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => true,
        })
        .map_err(|e| {
            EngineError::invalid(
                Some("messages"),
                format!("the model's chat template rejected the messages: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_pycompat_methods() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content.split('</think>')[-1].strip() }}{% endfor %}{% if add_generation_prompt %}<A>{% endif %}".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let out = t.render(&[("user".into(), "x</think> hi ".into())]).unwrap();
        assert_eq!(out, "<s>[user]hi<A>");
    }

    #[test]
    fn runaway_templates_are_stopped() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(t.render(&[]).is_err());
    }

    #[test]
    fn raise_exception_is_a_request_error() {
        let t = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t.render(&[]).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn no_file_system_access() {
        let t =
            ChatTemplate::new("{% include '/etc/passwd' %}".into(), String::new(), String::new()).unwrap();
        assert!(t.render(&[]).is_err());
    }
}
