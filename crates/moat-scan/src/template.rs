//! Static check of Jinja chat templates (GGUF `tokenizer.chat_template*`,
//! `chat_template` in `tokenizer_config.json`, `chat_template.jinja`).
//!
//! A chat template is code: llama-cpp-python rendered it with a Jinja2
//! environment that was not sandboxed, and a template reaching
//! `__globals__` / `__builtins__` / `os.popen` ran shell commands on load
//! (CVE-2024-34359). moat's own engine renders with minijinja, which has no
//! Python objects to reach; this check is for everything downstream that may
//! use Jinja2, and it refuses templates whose only purpose can be an escape.
//!
//! Why the AST and not the text: minijinja's parser (feature
//! `unstable_machinery`, minijinja is pinned by `Cargo.lock`) gives the exact
//! tree a renderer would see, so `ns.x` after `{% set ns = namespace() %}` is
//! an attribute of a variable (fine) while `namespace.__init__` or
//! `cycler.__init__.__globals__` is an attribute of a gadget global (refused),
//! and string constants are already folded (`'__cla' ~ 'ss__'` is one
//! constant `'__class__'` in the tree). A text scan could tell neither apart.
//! A template that minijinja cannot parse is itself a finding: it cannot be
//! checked, and a parser differential is exactly how payloads hide.
//!
//! Limits (deny-list on top of an allowlist renderer): a name assembled at
//! render time from innocent pieces (`'%c'|format(95)`) cannot be seen
//! statically. Computed subscripts and `|attr` with a non-constant argument
//! are therefore reported too, since real chat templates index with literal
//! keys.

use minijinja::machinery::ast::{CallArg, Expr, Stmt};
use minijinja::machinery::{Span, parse};
use minijinja::syntax::SyntaxConfig;

use crate::report::{Finding, Severity, quote};

/// Stable rule ids.
pub mod rule {
    pub const PARSE: &str = "template.parse";
    pub const TOO_LARGE: &str = "template.too-large";
    pub const DUNDER: &str = "template.dunder";
    pub const GADGET: &str = "template.gadget";
    pub const IMPORT: &str = "template.import";
    pub const DANGEROUS_NAME: &str = "template.dangerous-name";
    pub const COMPUTED_ATTRIBUTE: &str = "template.computed-attribute";
}

/// Real chat templates are at most tens of kilobytes.
pub const MAX_TEMPLATE_LEN: usize = 1 << 20;

/// Nesting beyond this is reported instead of walked.
const MAX_DEPTH: usize = 400;

/// At most this many findings per template.
const MAX_FINDINGS: usize = 20;

/// The parser and the tree's destructor recurse; a long chain such as
/// `1+1+1+...` nests as deep as it is long, so the work runs on a thread
/// whose stack grows with the template: [`STACK_PER_BYTE`] per byte over a
/// base, up to [`MAX_STACK`] (enough for [`MAX_TEMPLATE_LEN`]). Sizing it
/// by length matters: mapping 256 MiB per check cost more than the check
/// for ordinary (few-KiB) templates.
const BASE_STACK: usize = 2 << 20;
const STACK_PER_BYTE: usize = 256;
const MAX_STACK: usize = 256 << 20;

fn stack_size(len: usize) -> usize {
    BASE_STACK
        .saturating_add(len.saturating_mul(STACK_PER_BYTE))
        .min(MAX_STACK)
}

/// Globals whose attributes are the classic escape routes: their Python
/// objects lead to `__init__.__globals__` and from there to `os`.
const GADGET_GLOBALS: &[&str] = &[
    "cycler",
    "joiner",
    "namespace",
    "lipsum",
    "range",
    "dict",
    "self",
    "config",
    "request",
    "url_for",
    "get_flashed_messages",
];

/// Names no chat template needs; each is a step towards code execution.
const DANGEROUS_NAMES: &[&str] = &[
    "os",
    "popen",
    "eval",
    "exec",
    "system",
    "subprocess",
    "open",
    "getattr",
    "import",
    "builtins",
];

/// Checks one template; `location` says where it came from (key, offset).
pub fn check(source: &str, location: &str) -> Vec<Finding> {
    if source.len() > MAX_TEMPLATE_LEN {
        return vec![Finding::new(
            rule::TOO_LARGE,
            Severity::High,
            format!(
                "chat template of {} bytes exceeds the {MAX_TEMPLATE_LEN}-byte limit and was not analysed",
                source.len()
            ),
            location,
        )];
    }
    let run = || {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("moat-template-check".into())
                .stack_size(stack_size(source.len()))
                .spawn_scoped(scope, || check_on_this_thread(source, location))
                .map_err(|e| e.to_string())
                .and_then(|h| h.join().map_err(|_| "the analysis panicked".to_owned()))
        })
    };
    match run() {
        Ok(findings) => findings,
        Err(why) => vec![Finding::new(
            rule::PARSE,
            Severity::High,
            format!("the chat template could not be analysed ({why}), so it is refused"),
            location,
        )],
    }
}

fn check_on_this_thread(source: &str, location: &str) -> Vec<Finding> {
    let ast = match parse(source, "chat_template", SyntaxConfig::default()) {
        Ok(ast) => ast,
        Err(e) => {
            let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
            return vec![Finding::new(
                rule::PARSE,
                Severity::High,
                format!(
                    "the chat template does not parse ({}); it cannot be checked and may rely on \
                     a parser differential",
                    quote(&e.to_string())
                ),
                format!("{location}{line}"),
            )];
        }
    };
    let mut walker = Walker {
        location,
        findings: Vec::new(),
        dropped: 0,
    };
    walker.stmt(&ast, 0);
    let Walker {
        mut findings,
        dropped,
        ..
    } = walker;
    if dropped > 0 {
        findings.push(Finding::new(
            findings.first().map(|f| f.rule.clone()).unwrap_or_default(),
            Severity::Critical,
            format!("{dropped} more findings in this template were not listed"),
            location,
        ));
    }
    findings
}

fn is_dunder_like(s: &str) -> bool {
    s.contains("__")
}

struct Walker<'l> {
    location: &'l str,
    findings: Vec<Finding>,
    dropped: usize,
}

impl Walker<'_> {
    fn push(&mut self, rule: &'static str, severity: Severity, message: String, span: Span) {
        if self.findings.len() >= MAX_FINDINGS {
            self.dropped += 1;
            return;
        }
        self.findings.push(Finding::new(
            rule,
            severity,
            message,
            format!(
                "{} line {} column {}",
                self.location, span.start_line, span.start_col
            ),
        ));
    }

    fn too_deep(&mut self, depth: usize, span: Span) -> bool {
        if depth > MAX_DEPTH {
            self.push(
                rule::PARSE,
                Severity::High,
                format!("the chat template nests deeper than {MAX_DEPTH} levels and was not fully checked"),
                span,
            );
            return true;
        }
        false
    }

    fn stmts(&mut self, stmts: &[Stmt<'_>], depth: usize) {
        for s in stmts {
            self.stmt(s, depth + 1);
        }
    }

    fn import(&mut self, what: &str, span: Span) {
        self.push(
            rule::IMPORT,
            Severity::Critical,
            format!(
                "the chat template uses {{% {what} %}}: a chat template must be self-contained; \
                 loading other templates can pull in unchecked code"
            ),
            span,
        );
    }

    fn stmt(&mut self, stmt: &Stmt<'_>, depth: usize) {
        if self.too_deep(depth, stmt_span(stmt)) {
            return;
        }
        let d = depth + 1;
        match stmt {
            Stmt::Template(t) => self.stmts(&t.children, d),
            Stmt::EmitExpr(e) => self.expr(&e.expr, d),
            Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::ForLoop(f) => {
                self.expr(&f.target, d);
                self.expr(&f.iter, d);
                if let Some(e) = &f.filter_expr {
                    self.expr(e, d);
                }
                self.stmts(&f.body, d);
                self.stmts(&f.else_body, d);
            }
            Stmt::IfCond(i) => {
                self.expr(&i.expr, d);
                self.stmts(&i.true_body, d);
                self.stmts(&i.false_body, d);
            }
            Stmt::WithBlock(w) => {
                for (a, b) in &w.assignments {
                    self.expr(a, d);
                    self.expr(b, d);
                }
                self.stmts(&w.body, d);
            }
            Stmt::Set(s) => {
                self.expr(&s.target, d);
                self.expr(&s.expr, d);
            }
            Stmt::SetBlock(s) => {
                self.expr(&s.target, d);
                if let Some(f) = &s.filter {
                    self.expr(f, d);
                }
                self.stmts(&s.body, d);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled, d);
                self.stmts(&a.body, d);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter, d);
                self.stmts(&f.body, d);
            }
            Stmt::Block(b) => self.stmts(&b.body, d),
            Stmt::Import(i) => {
                self.import("import", i.span());
                self.expr(&i.expr, d);
            }
            Stmt::FromImport(i) => {
                self.import("from ... import", i.span());
                self.expr(&i.expr, d);
            }
            Stmt::Extends(e) => {
                self.import("extends", e.span());
                self.expr(&e.name, d);
            }
            Stmt::Include(i) => {
                self.import("include", i.span());
                self.expr(&i.name, d);
            }
            Stmt::Macro(m) => {
                for e in m.args.iter().chain(&m.defaults) {
                    self.expr(e, d);
                }
                self.stmts(&m.body, d);
            }
            Stmt::CallBlock(c) => {
                self.call(&c.call.expr, &c.call.args, d);
                self.stmts(&c.macro_decl.body, d);
            }
            Stmt::Do(c) => self.call(&c.call.expr, &c.call.args, d),
        }
    }

    fn call(&mut self, callee: &Expr<'_>, args: &[CallArg<'_>], depth: usize) {
        self.expr(callee, depth);
        self.args(args, depth);
    }

    fn args(&mut self, args: &[CallArg<'_>], depth: usize) {
        for a in args {
            match a {
                CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => {
                    self.expr(e, depth)
                }
            }
        }
    }

    fn name_rules(&mut self, name: &str, how: &str, span: Span) {
        if is_dunder_like(name) {
            self.push(
                rule::DUNDER,
                Severity::Critical,
                format!(
                    "the chat template {how} {}: double-underscore names reach Python internals \
                     (__globals__, __builtins__) in a Jinja2 renderer (CVE-2024-34359)",
                    quote(name)
                ),
                span,
            );
        } else if DANGEROUS_NAMES.contains(&name) {
            self.push(
                rule::DANGEROUS_NAME,
                Severity::Critical,
                format!(
                    "the chat template {how} {}, a name used to run commands; no chat template needs it",
                    quote(name)
                ),
                span,
            );
        }
    }

    fn expr(&mut self, expr: &Expr<'_>, depth: usize) {
        if self.too_deep(depth, expr.span()) {
            return;
        }
        let d = depth + 1;
        match expr {
            Expr::Var(v) => self.name_rules(v.id, "uses the name", v.span()),
            Expr::Const(c) => {
                if let Some(s) = c.value.as_str()
                    && is_dunder_like(s)
                {
                    self.name_rules(s, "contains the string", c.span());
                }
            }
            Expr::Slice(s) => {
                self.expr(&s.expr, d);
                for e in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(e, d);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr, d),
            Expr::BinOp(b) => {
                self.expr(&b.left, d);
                self.expr(&b.right, d);
            }
            Expr::Compare(c) => {
                self.expr(&c.expr, d);
                for op in &c.ops {
                    self.expr(&op.expr, d);
                }
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr, d);
                self.expr(&i.true_expr, d);
                if let Some(e) = &i.false_expr {
                    self.expr(e, d);
                }
            }
            Expr::Filter(f) => {
                if f.name == "attr" {
                    match f.args.first() {
                        Some(CallArg::Pos(Expr::Const(c))) => {
                            if let Some(s) = c.value.as_str() {
                                self.name_rules(s, "looks up the attribute", c.span());
                            }
                        }
                        _ => self.push(
                            rule::COMPUTED_ATTRIBUTE,
                            Severity::High,
                            "the chat template uses |attr with a computed name, which can reach any \
                             Python attribute in a Jinja2 renderer"
                                .to_owned(),
                            f.span(),
                        ),
                    }
                }
                if let Some(e) = &f.expr {
                    self.expr(e, d);
                }
                self.args(&f.args, d);
            }
            Expr::Test(t) => {
                self.expr(&t.expr, d);
                self.args(&t.args, d);
            }
            Expr::GetAttr(g) => {
                self.name_rules(g.name, "accesses the attribute", g.span());
                self.gadget(&g.expr, g.name, g.span());
                self.expr(&g.expr, d);
            }
            Expr::GetItem(g) => {
                if let Expr::Const(c) = &g.subscript_expr
                    && let Some(s) = c.value.as_str()
                {
                    self.name_rules(s, "looks up the item", c.span());
                    self.gadget(&g.expr, s, g.span());
                } else if is_string_building(&g.subscript_expr) {
                    self.push(
                        rule::COMPUTED_ATTRIBUTE,
                        Severity::High,
                        "the chat template indexes with a string built at render time, which can \
                         spell a double-underscore name"
                            .to_owned(),
                        g.span(),
                    );
                }
                self.expr(&g.expr, d);
                self.expr(&g.subscript_expr, d);
            }
            Expr::Call(c) => self.call(&c.expr, &c.args, d),
            Expr::List(l) => {
                for e in &l.items {
                    self.expr(e, d);
                }
            }
            Expr::Tuple(t) => {
                for e in &t.items {
                    self.expr(e, d);
                }
            }
            Expr::Map(m) => {
                for e in m.keys.iter().chain(&m.values) {
                    self.expr(e, d);
                }
            }
        }
    }

    /// Attribute or item access directly on a gadget global. Calling the
    /// global (`namespace(...)`) and using the result is fine.
    fn gadget(&mut self, target: &Expr<'_>, name: &str, span: Span) {
        if let Expr::Var(v) = target
            && GADGET_GLOBALS.contains(&v.id)
        {
            self.push(
                rule::GADGET,
                Severity::Critical,
                format!(
                    "the chat template reads {}.{}: attributes of the global '{}' lead to Python \
                     internals in a Jinja2 renderer (CVE-2024-34359 gadget)",
                    v.id,
                    quote(name),
                    v.id
                ),
                span,
            );
        }
    }
}

/// A subscript that assembles a string: concatenation, a filter (`format`,
/// `join`, `replace`...) or a call.
fn is_string_building(e: &Expr<'_>) -> bool {
    use minijinja::machinery::ast::BinOpKind;
    match e {
        Expr::BinOp(b) => {
            matches!(b.op, BinOpKind::Concat)
                || matches!(b.op, BinOpKind::Add) && {
                    matches!(&b.left, Expr::Const(c) if c.value.as_str().is_some())
                        || matches!(&b.right, Expr::Const(c) if c.value.as_str().is_some())
                }
        }
        Expr::Filter(f) => f.name != "int" && f.name != "length",
        Expr::Call(_) => true,
        _ => false,
    }
}

fn stmt_span(stmt: &Stmt<'_>) -> Span {
    match stmt {
        Stmt::Template(s) => s.span(),
        Stmt::EmitExpr(s) => s.span(),
        Stmt::EmitRaw(s) => s.span(),
        Stmt::ForLoop(s) => s.span(),
        Stmt::IfCond(s) => s.span(),
        Stmt::WithBlock(s) => s.span(),
        Stmt::Set(s) => s.span(),
        Stmt::SetBlock(s) => s.span(),
        Stmt::AutoEscape(s) => s.span(),
        Stmt::FilterBlock(s) => s.span(),
        Stmt::Block(s) => s.span(),
        Stmt::Import(s) => s.span(),
        Stmt::FromImport(s) => s.span(),
        Stmt::Extends(s) => s.span(),
        Stmt::Include(s) => s.span(),
        Stmt::Macro(s) => s.span(),
        Stmt::CallBlock(s) => s.span(),
        Stmt::Continue(s) => s.span(),
        Stmt::Break(s) => s.span(),
        Stmt::Do(s) => s.span(),
    }
}

#[cfg(test)]
mod tests;
