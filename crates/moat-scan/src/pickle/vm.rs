//! A non-executing pickle machine: walks the opcodes of protocols 0–5 the way
//! CPython's unpickler does, but every value is a symbol in an arena, so
//! nothing is imported, called or materialised.
//!
//! What it tracks is exactly what a loader would *do*: which globals it
//! imports (`GLOBAL`, `STACK_GLOBAL`, `INST`), which values it calls
//! (`REDUCE`, `OBJ`, `NEWOBJ`, `NEWOBJ_EX`, `BUILD`, and the implicit
//! `append`/`__setitem__`/`add` calls on non-builtin containers), and what it
//! cannot know (`EXT*` codes, imports whose names are computed). Each is
//! judged against [`super::policy`].
//!
//! Shape, for hostile input: one pass over the bytes (O(n)); declared lengths
//! are checked against the remaining input before use; the stack, marks,
//! memo, arena and opcode count are capped by the constants below; values
//! are shared by index (a `DUP` or `GET` of a huge list copies one integer),
//! so expansion bombs cost nothing; there is no recursion over values.
//! An error stops the walk but keeps every finding made before it, because a
//! real unpickler has already executed those opcodes (nullifAI).

use std::collections::{HashMap, HashSet};

use super::policy::{self, Class};
use super::{Sink, rule};
use crate::report::{Finding, Severity, quote};

/// Most opcodes walked in one stream (all pickles of it together).
pub const MAX_OPCODES: usize = 32_000_000;
/// Most values on the stack (all marks together).
pub const MAX_STACK: usize = 1_000_000;
/// Most nested MARKs open at once.
pub const MAX_MARKS: usize = 100_000;
/// Most memo entries.
pub const MAX_MEMO: usize = 4_000_000;
/// Most symbolic values created for one stream (bounds memory at ~32 B each).
pub const MAX_NODES: usize = 8_000_000;
/// Longest LONG1/LONG4 integer, in bytes. Checkpoints store small integers.
pub const MAX_LONG_BYTES: usize = 64 * 1024;
/// Longest protocol-0 text argument (INT/LONG/FLOAT/GET/PUT lines).
pub const MAX_LINE: usize = 64 * 1024;
/// Strings longer than this are kept truncated (they are never module names).
const MAX_KEPT_STR: usize = 4096;
/// How deeply joblib object arrays (a pickle inside a pickle) may nest.
const MAX_NESTED_PICKLES: usize = 4;

/// Index of a value in the arena.
type Id = u32;

/// A symbolic value.
#[derive(Debug, Clone)]
enum Node {
    Str {
        text: Box<str>,
        complete: bool,
    },
    Bytes,
    Int(Option<i64>),
    Float,
    Bool,
    None,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set,
    /// An imported global; `path` is `module.name`.
    Global {
        path: Box<str>,
        allowed: bool,
    },
    /// The result of calling `callee` with `args`; `state` is what BUILD set.
    Call {
        callee: Id,
        args: Id,
        state: Option<Id>,
    },
    /// `cls.__new__(cls, ...)` (NEWOBJ, OBJ, INST); `state` as for Call.
    Object {
        cls: Id,
        state: Option<Id>,
    },
    /// A persistent id; torch resolves these to storages.
    Persistent,
    /// Anything we cannot know statically (EXT codes, out-of-band buffers).
    Unknown,
}

/// Why a stream stopped before its end.
#[derive(Debug)]
enum Halt {
    Malformed(String),
    Limit(String),
}

/// Options for a stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Stop after this many pickles (legacy torch files: raw bytes follow).
    pub max_pickles: Option<usize>,
    /// Follow joblib's NumpyArrayWrapper: raw array bytes follow its BUILD.
    pub joblib: bool,
}

/// What a walk found beyond its findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Complete pickles (ending in STOP).
    pub pickles: usize,
    /// Offset just after the last complete pickle.
    pub end: usize,
    /// Whether the walk reached the end (or `max_pickles`) without an error.
    pub complete: bool,
    /// Persistent ids seen (torch storage references).
    pub persistent_ids: usize,
}

/// Walks every pickle in `data` (several may be stacked), reporting into
/// `sink`. `member` names the archive member for locations ("" for a file).
pub fn walk(data: &[u8], member: &str, options: Options, sink: &mut Sink) -> Walk {
    let mut vm = Machine::new(data, member, options, sink);
    vm.run_stream()
}

/// The opcode names, for locations.
fn op_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown opcode",
    }
}

struct Machine<'a, 's> {
    data: &'a [u8],
    pos: usize,
    member: &'a str,
    options: Options,
    sink: &'s mut Sink,
    /// Index of the current opcode in the stream, its byte and offset.
    op_index: usize,
    op: u8,
    op_offset: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Imports and callees already reported, so a global used a thousand
    /// times is one finding.
    reported: HashSet<(&'static str, Box<str>)>,
    persistent_ids: usize,
    nested: usize,
}

type Step<T = ()> = Result<T, Halt>;

fn malformed<T>(msg: impl Into<String>) -> Step<T> {
    Err(Halt::Malformed(msg.into()))
}

impl<'a, 's> Machine<'a, 's> {
    fn new(data: &'a [u8], member: &'a str, options: Options, sink: &'s mut Sink) -> Self {
        Machine {
            data,
            pos: 0,
            member,
            options,
            sink,
            op_index: 0,
            op: 0,
            op_offset: 0,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            reported: HashSet::new(),
            persistent_ids: 0,
            nested: 0,
        }
    }

    fn run_stream(&mut self) -> Walk {
        let mut walk = Walk {
            pickles: 0,
            end: 0,
            complete: false,
            persistent_ids: 0,
        };
        loop {
            if self.pos >= self.data.len() && walk.pickles > 0 {
                walk.complete = true;
                break;
            }
            if self.options.max_pickles.is_some_and(|max| walk.pickles >= max) {
                walk.complete = true;
                break;
            }
            // Each pickle starts with an empty stack and memo, as a fresh
            // `pickle.load` on the same file would.
            self.stack.clear();
            self.marks.clear();
            self.memo.clear();
            match self.run_one() {
                Ok(()) => {
                    walk.pickles += 1;
                    walk.end = self.pos;
                }
                Err(halt) => {
                    self.report_halt(halt, walk.pickles);
                    break;
                }
            }
        }
        walk.persistent_ids = self.persistent_ids;
        walk
    }

    fn report_halt(&mut self, halt: Halt, pickles: usize) {
        let (rule, what) = match halt {
            Halt::Malformed(m) => (rule::MALFORMED, m),
            Halt::Limit(m) => (rule::LIMIT, m),
        };
        let context = if pickles > 0 {
            format!(
                " (after {pickles} complete pickle{})",
                if pickles == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        };
        let message = if rule == rule::MALFORMED {
            format!(
                "the pickle stream is malformed{context}: {what}; a loader runs every opcode \
                 before the error, so the file is refused; convert the weights to safetensors"
            )
        } else {
            format!(
                "the pickle stream exceeds a scanner limit{context}: {what}; it cannot be \
                 analysed completely, so it is refused; convert the weights to safetensors"
            )
        };
        let location = self.location();
        self.sink
            .push(Finding::new(rule, Severity::High, message, location));
    }

    fn location(&self) -> String {
        let at = format!(
            "opcode {} ({}) at offset {}",
            self.op_index,
            op_name(self.op),
            self.op_offset
        );
        if self.member.is_empty() {
            at
        } else {
            format!("member {}, {at}", quote(self.member))
        }
    }

    /// Runs one pickle to its STOP.
    fn run_one(&mut self) -> Step {
        loop {
            let Some(&op) = self.data.get(self.pos) else {
                self.op_offset = self.pos;
                return malformed("the data ends before the STOP opcode (truncated pickle)");
            };
            self.op = op;
            self.op_offset = self.pos;
            self.op_index += 1;
            if self.op_index > MAX_OPCODES {
                return Err(Halt::Limit(format!("more than {MAX_OPCODES} opcodes")));
            }
            self.pos += 1;
            if op == b'.' {
                self.pop()?;
                // CPython ignores values and marks left on the stack at STOP.
                return Ok(());
            }
            self.step(op)?;
        }
    }

    // ---------------------------------------------------------------- input

    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let remaining = data.len().saturating_sub(self.pos);
        if n > remaining {
            return malformed(format!(
                "an argument of {n} bytes is declared but only {remaining} bytes remain (truncated)"
            ));
        }
        let bytes = data.get(self.pos..self.pos + n).unwrap_or(&[]);
        self.pos += n;
        Ok(bytes)
    }

    fn uint(&mut self, width: usize) -> Step<u64> {
        let bytes = self.take(width)?;
        Ok(bytes
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, b)| acc | (u64::from(*b) << (8 * i))))
    }

    fn counted(&mut self, width: usize) -> Step<&'a [u8]> {
        let len = self.uint(width)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.take(len)
    }

    fn line(&mut self) -> Step<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or(&[]);
        match rest.iter().take(MAX_LINE + 1).position(|&b| b == b'\n') {
            Some(len) => {
                self.pos += len + 1;
                Ok(rest.get(..len).unwrap_or(&[]))
            }
            None if rest.len() > MAX_LINE => Err(Halt::Limit(format!(
                "a text argument longer than {MAX_LINE} bytes"
            ))),
            None => malformed("a text argument has no terminating newline (truncated)"),
        }
    }

    // ---------------------------------------------------------------- stack

    fn node(&mut self, node: Node) -> Step<Id> {
        if self.nodes.len() >= MAX_NODES {
            return Err(Halt::Limit(format!("more than {MAX_NODES} values")));
        }
        let id = self.nodes.len() as Id;
        self.nodes.push(node);
        Ok(id)
    }

    fn push_id(&mut self, id: Id) -> Step {
        if self.stack.len() >= MAX_STACK {
            return Err(Halt::Limit(format!("a stack deeper than {MAX_STACK} values")));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, node: Node) -> Step {
        let id = self.node(node)?;
        self.push_id(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Id> {
        if self.stack.len() <= self.floor() {
            return malformed("the stack is empty where a value is needed (stack underflow)");
        }
        self.stack.pop().map_or_else(|| malformed("stack underflow"), Ok)
    }

    fn top(&self) -> Step<Id> {
        if self.stack.len() <= self.floor() {
            return malformed("the stack is empty where a value is needed (stack underflow)");
        }
        self.stack
            .last()
            .copied()
            .map_or_else(|| malformed("stack underflow"), Ok)
    }

    /// Pops everything above the innermost MARK, and the mark.
    fn pop_mark(&mut self) -> Step<Vec<Id>> {
        let Some(mark) = self.marks.pop() else {
            return malformed("an opcode needs a MARK but none is open");
        };
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn get(&self, id: Id) -> &Node {
        self.nodes.get(id as usize).unwrap_or(&Node::Unknown)
    }

    fn get_mut(&mut self, id: Id) -> Option<&mut Node> {
        self.nodes.get_mut(id as usize)
    }

    fn str_node(&mut self, bytes: &[u8]) -> Step {
        let text = String::from_utf8_lossy(bytes);
        self.push_str(&text)
    }

    fn push_str(&mut self, text: &str) -> Step {
        let complete = text.len() <= MAX_KEPT_STR;
        let kept: String = if complete {
            text.to_owned()
        } else {
            text.chars().take(MAX_KEPT_STR).collect()
        };
        self.push(Node::Str {
            text: kept.into_boxed_str(),
            complete,
        })
    }

    fn memo_put(&mut self, key: u64) -> Step {
        let top = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(Halt::Limit(format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Step {
        match self.memo.get(&key) {
            Some(&id) => self.push_id(id),
            None => malformed(format!("memo key {key} is read before it is written")),
        }
    }

    // ---------------------------------------------------------------- findings

    fn finding(&mut self, rule: &'static str, severity: Severity, message: String) {
        let location = self.location();
        self.sink.push(Finding::new(rule, severity, message, location));
    }

    /// Reports an import once per distinct path and returns its node.
    fn import(&mut self, module: &str, name: &str) -> Step {
        let class = policy::classify(module, name);
        let path = policy::full_path(module, name);
        let key = ("import", Box::<str>::from(path.as_str()));
        if class != Class::Allowed && !self.reported.contains(&key) {
            self.reported.insert(key);
            let shown = quote(&path);
            match class {
                Class::Critical => self.finding(
                    rule::IMPORT_CRITICAL,
                    Severity::Critical,
                    format!(
                        "imports {shown}, which can run arbitrary code, or reach files or the \
                         network, when the pickle is loaded; do not load this file, and convert \
                         trusted weights to safetensors"
                    ),
                ),
                _ => self.finding(
                    rule::IMPORT_UNSAFE,
                    Severity::High,
                    format!(
                        "imports {shown}, which is not on the allowlist of globals that model \
                         checkpoints need, so loading would run code nobody has reviewed; \
                         convert the weights to safetensors"
                    ),
                ),
            }
        }
        self.push(Node::Global {
            path: path.into_boxed_str(),
            allowed: class == Class::Allowed,
        })
    }

    /// The allowlisted class behind a value, if any: the callee of a call or
    /// the class of an object.
    fn made_by_allowed(&self, id: Id) -> Option<&str> {
        let maker = match self.get(id) {
            Node::Call { callee, .. } => *callee,
            Node::Object { cls, .. } => *cls,
            _ => return None,
        };
        match self.get(maker) {
            Node::Global { path, allowed: true } => Some(path),
            _ => None,
        }
    }

    /// Judges a call of `callee` made by the current opcode (`how` says what
    /// is called, e.g. "calls" or "creates an object of").
    fn check_call(&mut self, callee: Id, how: &str) {
        match self.get(callee) {
            Node::Global { allowed: true, .. } => {}
            Node::Global { path, allowed: false } => {
                let path = path.clone();
                let key = ("call", path.clone());
                if self.reported.contains(&key) {
                    return;
                }
                self.reported.insert(key);
                let severity = match path.split_once('.') {
                    Some((m, n)) if policy::classify(m, n) == Class::Critical => Severity::Critical,
                    _ => Severity::High,
                };
                self.finding(
                    rule::CALL_UNSAFE,
                    severity,
                    format!(
                        "{how} {} while loading, code outside the allowlist; convert the weights \
                         to safetensors",
                        quote(&path)
                    ),
                );
            }
            other => {
                let what = describe(other);
                self.finding(
                    rule::CALL_UNSAFE,
                    Severity::Critical,
                    format!(
                        "{how} {what} computed while loading (the shape of getattr/eval gadget \
                         chains), so what runs cannot be known before it runs; do not load this \
                         file"
                    ),
                );
            }
        }
    }

    /// copyreg._reconstructor(cls, base, state) runs `base.__new__(cls)` and
    /// `base.__init__(obj, state)`: both must be allowlisted globals.
    fn check_reconstructor(&mut self, args: Id) {
        let ok = match self.get(args) {
            Node::Tuple(items) => {
                items.len() == 3
                    && items
                        .iter()
                        .take(2)
                        .all(|&i| matches!(self.get(i), Node::Global { allowed: true, .. }))
            }
            _ => false,
        };
        if !ok {
            self.finding(
                rule::CALL_UNSAFE,
                Severity::Critical,
                "calls copyreg._reconstructor with a class or base that is not an allowlisted \
                 global, which runs that class's __new__ and __init__; do not load this file"
                    .to_owned(),
            );
        }
    }

    /// The implicit method call of APPEND(S)/SETITEM(S)/ADDITEMS on a value
    /// that is not a plain list/dict/set: `obj.append`, `obj.__setitem__`...
    fn check_container_call(&mut self, target: Id, method: &str) {
        let plain = matches!(self.get(target), Node::List(_) | Node::Dict(_) | Node::Set);
        if plain || self.made_by_allowed(target).is_some() {
            return;
        }
        let what = describe(self.get(target));
        self.finding(
            rule::CALL_UNSAFE,
            Severity::High,
            format!(
                "calls {method} on {what}, which runs that object's own method while loading; \
                 convert the weights to safetensors"
            ),
        );
    }

    // ---------------------------------------------------------------- opcodes

    fn step(&mut self, op: u8) -> Step {
        match op {
            0x80 => {
                let proto = self.uint(1)?;
                if proto > 5 {
                    return malformed(format!("unsupported pickle protocol {proto}"));
                }
            }
            0x95 => {
                let len = self.uint(8)?;
                let remaining = self.data.len().saturating_sub(self.pos) as u64;
                if len > remaining {
                    return malformed(format!(
                        "a FRAME declares {len} bytes but only {remaining} remain"
                    ));
                }
            }
            b'(' => {
                if self.marks.len() >= MAX_MARKS {
                    return Err(Halt::Limit(format!("more than {MAX_MARKS} nested MARKs")));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                if self.stack.len() > self.floor() {
                    self.pop()?;
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.top()?;
                self.push_id(top)?;
            }
            b'N' => self.push(Node::None)?,
            0x88 | 0x89 => self.push(Node::Bool)?,
            b'I' => {
                let line = self.line()?;
                let node = match line {
                    b"00" | b"01" => Node::Bool,
                    _ => Node::Int(parse_int(line)),
                };
                self.push(node)?;
            }
            b'L' => {
                let line = self.line()?;
                let digits = line.strip_suffix(b"L").unwrap_or(line);
                self.push(Node::Int(parse_int(digits)))?;
            }
            b'F' => {
                self.line()?;
                self.push(Node::Float)?;
            }
            b'J' => {
                let v = self.uint(4)? as u32 as i32;
                self.push(Node::Int(Some(i64::from(v))))?;
            }
            b'K' => {
                let v = self.uint(1)?;
                self.push(Node::Int(i64::try_from(v).ok()))?;
            }
            b'M' => {
                let v = self.uint(2)?;
                self.push(Node::Int(i64::try_from(v).ok()))?;
            }
            0x8a | 0x8b => {
                let width = if op == 0x8a { 1 } else { 4 };
                let len = self.uint(width)?;
                if len > MAX_LONG_BYTES as u64 {
                    return Err(Halt::Limit(format!(
                        "an integer of {len} bytes (the limit is {MAX_LONG_BYTES})"
                    )));
                }
                let bytes = self.take(len as usize)?;
                self.push(Node::Int(long_value(bytes)))?;
            }
            b'G' => {
                self.take(8)?;
                self.push(Node::Float)?;
            }
            b'S' => {
                let line = self.line()?;
                let inner = match line {
                    [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
                    _ => return malformed("a STRING argument is not quoted"),
                };
                let text = escape_decode(inner);
                self.str_node(&text)?;
            }
            b'V' => {
                let line = self.line()?;
                let text = raw_unicode_escape_decode(line);
                self.push_str(&text)?;
            }
            b'T' => {
                let b = self.counted(4)?;
                self.str_node(b)?;
            }
            b'U' => {
                let b = self.counted(1)?;
                self.str_node(b)?;
            }
            b'X' => {
                let b = self.counted(4)?;
                self.str_node(b)?;
            }
            0x8c => {
                let b = self.counted(1)?;
                self.str_node(b)?;
            }
            0x8d => {
                let b = self.counted(8)?;
                self.str_node(b)?;
            }
            b'B' => {
                self.counted(4)?;
                self.push(Node::Bytes)?;
            }
            b'C' => {
                self.counted(1)?;
                self.push(Node::Bytes)?;
            }
            0x8e | 0x96 => {
                self.counted(8)?;
                self.push(Node::Bytes)?;
            }
            0x97 => self.push(Node::Unknown)?,
            0x98 => {
                self.top()?;
            }
            b')' => self.push(Node::Tuple(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push(Node::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Node::Tuple(items))?;
            }
            b']' => self.push(Node::List(Vec::new()))?,
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Node::List(items))?;
            }
            b'a' => {
                let item = self.pop()?;
                let target = self.top()?;
                self.extend_list(target, vec![item]);
            }
            b'e' => {
                let items = self.pop_mark()?;
                let target = self.top()?;
                self.extend_list(target, items);
            }
            b'}' => self.push(Node::Dict(Vec::new()))?,
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.push(Node::Dict(pairs))?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                let target = self.top()?;
                self.set_items(target, vec![(key, value)]);
            }
            b'u' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                let target = self.top()?;
                self.set_items(target, pairs);
            }
            0x8f => self.push(Node::Set)?,
            0x90 => {
                self.pop_mark()?;
                let target = self.top()?;
                self.check_container_call(target, "add");
            }
            0x91 => {
                self.pop_mark()?;
                self.push(Node::Set)?;
            }
            b'g' => {
                let line = self.line()?;
                let key = parse_memo_key(line)?;
                self.memo_get(key)?;
            }
            b'h' => {
                let key = self.uint(1)?;
                self.memo_get(key)?;
            }
            b'j' => {
                let key = self.uint(4)?;
                self.memo_get(key)?;
            }
            b'p' => {
                let line = self.line()?;
                let key = parse_memo_key(line)?;
                self.memo_put(key)?;
            }
            b'q' => {
                let key = self.uint(1)?;
                self.memo_put(key)?;
            }
            b'r' => {
                let key = self.uint(4)?;
                self.memo_put(key)?;
            }
            0x94 => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let (module, name) = (String::from_utf8_lossy(module), String::from_utf8_lossy(name));
                self.import(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (self.get(module).clone(), self.get(name).clone()) {
                    (
                        Node::Str {
                            text: m,
                            complete: true,
                        },
                        Node::Str {
                            text: n,
                            complete: true,
                        },
                    ) => {
                        self.import(&m, &n)?;
                    }
                    (m, n) => {
                        self.finding(
                            rule::IMPORT_DYNAMIC,
                            Severity::Critical,
                            format!(
                                "STACK_GLOBAL imports a module or name that is not a constant \
                                 string ({} / {}), so what is imported cannot be known before \
                                 it runs; do not load this file",
                                describe(&m),
                                describe(&n)
                            ),
                        );
                        self.push(Node::Unknown)?;
                    }
                }
            }
            b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                let (module, name) = (String::from_utf8_lossy(module), String::from_utf8_lossy(name));
                let items = self.pop_mark()?;
                self.import(&module, &name)?;
                let cls = self.pop()?;
                self.check_call(cls, "creates an instance of");
                let args = self.node(Node::Tuple(items))?;
                self.push(Node::Call {
                    callee: cls,
                    args,
                    state: None,
                })?;
            }
            b'o' => {
                let items = self.pop_mark()?;
                let Some((&cls, rest)) = items.split_first() else {
                    return malformed("OBJ without a class on the stack");
                };
                self.check_call(cls, "creates an instance of");
                let args = self.node(Node::Tuple(rest.to_vec()))?;
                self.push(Node::Call {
                    callee: cls,
                    args,
                    state: None,
                })?;
            }
            0x81 => {
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.check_call(cls, "creates an object of");
                self.push(Node::Object { cls, state: None })?;
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.check_call(cls, "creates an object of");
                self.push(Node::Object { cls, state: None })?;
            }
            b'R' => {
                let args = self.pop()?;
                let callee = self.pop()?;
                self.check_call(callee, "calls");
                if matches!(self.get(callee), Node::Global { path, .. } if &**path == "copyreg._reconstructor")
                {
                    self.check_reconstructor(args);
                }
                self.push(Node::Call {
                    callee,
                    args,
                    state: None,
                })?;
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?;
                self.build(target, state)?;
            }
            0x82..=0x84 => {
                let width = match op {
                    0x82 => 1,
                    0x83 => 2,
                    _ => 4,
                };
                let code = self.uint(width)?;
                self.finding(
                    rule::EXT,
                    Severity::Critical,
                    format!(
                        "{} {code} imports whatever the loading process registered under that \
                         extension code (copyreg), which cannot be resolved statically; do not \
                         load this file",
                        op_name(op)
                    ),
                );
                self.push(Node::Unknown)?;
            }
            b'P' => {
                self.line()?;
                self.persistent_ids += 1;
                self.push(Node::Persistent)?;
            }
            b'Q' => {
                self.pop()?;
                self.persistent_ids += 1;
                self.push(Node::Persistent)?;
            }
            _ => {
                return malformed(format!("unknown opcode 0x{op:02x}"));
            }
        }
        Ok(())
    }

    fn extend_list(&mut self, target: Id, items: Vec<Id>) {
        if let Some(Node::List(list)) = self.get_mut(target) {
            list.extend(items);
        } else {
            self.check_container_call(target, "append/extend");
        }
    }

    fn set_items(&mut self, target: Id, new: Vec<(Id, Id)>) {
        if let Some(Node::Dict(dict)) = self.get_mut(target) {
            dict.extend(new);
        } else {
            self.check_container_call(target, "__setitem__");
        }
    }

    /// BUILD: `inst.__setstate__(state)` when the class defines it, else
    /// attribute assignment. Safe only on objects made by allowlisted globals.
    fn build(&mut self, target: Id, state: Id) -> Step {
        let maker = self.made_by_allowed(target).map(str::to_owned);
        match self.get_mut(target) {
            Some(Node::Call { state: s, .. } | Node::Object { state: s, .. }) if maker.is_some() => {
                *s = Some(state);
            }
            _ => {
                let what = describe(self.get(target));
                let severity = if matches!(self.get(target), Node::Global { .. }) {
                    // Setting attributes on a class or function object
                    // rewrites code that runs later (monkey-patching).
                    Severity::Critical
                } else {
                    Severity::High
                };
                self.finding(
                    rule::CALL_UNSAFE,
                    severity,
                    format!(
                        "BUILD on {what} calls its __setstate__ or sets its attributes while \
                         loading, code outside the allowlist; convert the weights to safetensors"
                    ),
                );
            }
        }
        if self.options.joblib && maker.as_deref() == Some("joblib.numpy_pickle.NumpyArrayWrapper") {
            self.follow_joblib_array(state)?;
        }
        Ok(())
    }

    /// joblib writes an array's raw bytes right after its wrapper's BUILD
    /// (object arrays: a nested pickle instead). Skip them as joblib reads
    /// them, so raw floats are never taken for opcodes.
    fn follow_joblib_array(&mut self, state: Id) -> Step {
        let Node::Dict(pairs) = self.get(state).clone() else {
            return malformed("a joblib NumpyArrayWrapper state is not a dict");
        };
        let lookup = |key: &str| {
            pairs.iter().find_map(|(k, v)| match self.get(*k) {
                Node::Str { text, .. } if &**text == key => Some(*v),
                _ => None,
            })
        };
        let shape = lookup("shape");
        let dtype = lookup("dtype");
        let align = lookup("numpy_array_alignment_bytes");
        let (Some(shape), Some(dtype)) = (shape, dtype) else {
            return malformed("a joblib NumpyArrayWrapper state lacks shape or dtype");
        };
        let count = match self.get(shape) {
            Node::Tuple(dims) => {
                let mut count: u64 = 1;
                for d in dims {
                    let Node::Int(Some(n)) = self.get(*d) else {
                        return malformed("a joblib array shape holds a non-integer");
                    };
                    let n = u64::try_from(*n).map_err(|_| Halt::Malformed("negative dimension".into()))?;
                    count = count
                        .checked_mul(n)
                        .ok_or_else(|| Halt::Malformed("a joblib array shape overflows".into()))?;
                }
                count
            }
            _ => return malformed("a joblib array shape is not a tuple"),
        };
        match self.dtype_itemsize(dtype) {
            Some(DtypeSize::Object) => {
                if count == 0 {
                    return Ok(());
                }
                if self.nested >= MAX_NESTED_PICKLES {
                    return Err(Halt::Limit(format!(
                        "joblib object arrays nested more than {MAX_NESTED_PICKLES} deep"
                    )));
                }
                // A nested pickle.load on the same stream: fresh stack and
                // memo, same findings, same opcode budget.
                let saved = (
                    std::mem::take(&mut self.stack),
                    std::mem::take(&mut self.marks),
                    std::mem::take(&mut self.memo),
                );
                self.nested += 1;
                let result = self.run_one();
                self.nested -= 1;
                (self.stack, self.marks, self.memo) = saved;
                result
            }
            Some(DtypeSize::Bytes(itemsize)) => {
                if align.is_some() {
                    let pad = self.uint(1)?;
                    self.take(pad as usize)?;
                }
                let len = count
                    .checked_mul(itemsize)
                    .ok_or_else(|| Halt::Malformed("a joblib array size overflows".into()))?;
                self.take(usize::try_from(len).unwrap_or(usize::MAX))?;
                Ok(())
            }
            None => malformed("the dtype of a joblib array cannot be determined statically"),
        }
    }

    /// Element size of a `numpy.dtype(descr, ...)` value.
    fn dtype_itemsize(&self, dtype: Id) -> Option<DtypeSize> {
        let Node::Call { callee, args, state } = self.get(dtype) else {
            return None;
        };
        if !matches!(self.get(*callee), Node::Global { path, .. } if &**path == "numpy.dtype") {
            return None;
        }
        // BUILD state (version, byteorder, subdescr, names, fields, elsize,
        // alignment, flags): structured dtypes carry fields, which may hold
        // objects; refuse to guess.
        if let Some(state) = state
            && let Node::Tuple(items) = self.get(*state)
            && let Some(fields) = items.get(4)
            && !matches!(self.get(*fields), Node::None)
        {
            return None;
        }
        let Node::Tuple(args) = self.get(*args) else {
            return None;
        };
        let Node::Str { text, .. } = self.get(*args.first()?) else {
            return None;
        };
        descr_itemsize(text)
    }
}

/// Element size of a simple numpy type string such as `f8`, `<i4`, `U10`, `O8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeSize {
    Object,
    Bytes(u64),
}

pub fn descr_itemsize(descr: &str) -> Option<DtypeSize> {
    let d = descr.trim_start_matches(['<', '>', '|', '=']);
    let (kind, digits) = d.split_at(d.char_indices().nth(1).map_or(d.len(), |(i, _)| i));
    let n: Option<u64> = if digits.is_empty() {
        None
    } else {
        digits.parse().ok()
    };
    match (kind, n) {
        ("O", _) => Some(DtypeSize::Object),
        ("?" | "b" | "B", None) => Some(DtypeSize::Bytes(1)),
        ("b" | "i" | "u" | "f" | "c" | "S" | "V" | "m" | "M", Some(n)) => Some(DtypeSize::Bytes(n)),
        ("U", Some(n)) => n.checked_mul(4).map(DtypeSize::Bytes),
        _ => None,
    }
}

fn describe(node: &Node) -> String {
    match node {
        Node::Str { text, .. } => format!("the string {}", quote(text)),
        Node::Bytes => "a bytes value".into(),
        Node::Int(_) => "an integer".into(),
        Node::Float => "a float".into(),
        Node::Bool => "a boolean".into(),
        Node::None => "None".into(),
        Node::Tuple(_) => "a tuple".into(),
        Node::List(_) => "a list".into(),
        Node::Dict(_) => "a dict".into(),
        Node::Set => "a set".into(),
        Node::Global { path, .. } => format!("the global {}", quote(path)),
        Node::Call { .. } => "the result of a call".into(),
        Node::Object { .. } => "an object".into(),
        Node::Persistent => "a persistent-id object".into(),
        Node::Unknown => "an unknown value".into(),
    }
}

fn pairs(items: Vec<Id>) -> Step<Vec<(Id, Id)>> {
    if !items.len().is_multiple_of(2) {
        return malformed("an odd number of items for a dict");
    }
    Ok(items
        .chunks_exact(2)
        .filter_map(|c| Some((*c.first()?, *c.get(1)?)))
        .collect())
}

fn parse_int(line: &[u8]) -> Option<i64> {
    std::str::from_utf8(line).ok()?.trim().parse().ok()
}

fn parse_memo_key(line: &[u8]) -> Step<u64> {
    match std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        Some(k) => Ok(k),
        None => malformed("a memo key is not a non-negative integer"),
    }
}

/// Little-endian two's complement, when it fits an i64.
fn long_value(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    if bytes.len() > 8 {
        return None;
    }
    let mut buf = [0u8; 8];
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    if negative {
        buf = [0xff; 8];
    }
    for (slot, b) in buf.iter_mut().zip(bytes) {
        *slot = *b;
    }
    Some(i64::from_le_bytes(buf))
}

/// Python's `codecs.escape_decode`, which protocol 0 STRING arguments use.
fn escape_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(&e) = s.get(i) else {
            out.push(b'\\');
            break;
        };
        i += 1;
        match e {
            b'\n' => {}
            b'\\' | b'\'' | b'"' => out.push(e),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'x' => {
                let hex = s.get(i..i + 2).and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.extend_from_slice(b"\\x"),
                }
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match s.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            _ => {
                out.push(b'\\');
                out.push(e);
            }
        }
    }
    out
}

/// Python's `raw-unicode-escape` decoding (UNICODE arguments): bytes are
/// Latin-1, except `\uXXXX` and `\UXXXXXXXX`.
fn raw_unicode_escape_decode(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        if b == b'\\' {
            let width = match s.get(i + 1) {
                Some(b'u') => 4,
                Some(b'U') => 8,
                _ => 0,
            };
            if width > 0 {
                let hex = s
                    .get(i + 2..i + 2 + width)
                    .and_then(|h| std::str::from_utf8(h).ok());
                if let Some(c) = hex
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .and_then(char::from_u32)
                {
                    out.push(c);
                    i += 2 + width;
                    continue;
                }
            }
        }
        out.push(char::from(b));
        i += 1;
    }
    out
}
