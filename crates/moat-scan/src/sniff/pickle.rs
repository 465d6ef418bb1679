//! Recognises pickle opcode streams that carry no PROTO header.
//!
//! Protocol 0 pickles are plain ASCII (`cos\nsystem\n(S'id'\ntR.`), so a
//! text check alone would call them harmless text. This walks the opcodes the
//! way an unpickler would, tracking only the stack depth (no values, nothing
//! executed), and says "pickle" as soon as the stream imports a global, or
//! when it reaches STOP with a value on the stack. Ordinary text fails within
//! a few bytes: an unknown opcode, a malformed argument line, or a stack
//! underflow ("1. Install" pops a mark that was never pushed).

/// True when `data` starts like a pickle. `complete` says whether `data` is
/// the whole file; if not, a stream still valid where the window ends is
/// treated as a pickle (fail closed).
pub(crate) fn looks_like_pickle(data: &[u8], complete: bool) -> bool {
    let mut walker = Walker {
        data,
        pos: 0,
        depth: 0,
        marks: Vec::new(),
    };
    match walker.run() {
        Outcome::Pickle => true,
        Outcome::NotPickle => false,
        Outcome::OutOfData => !complete && walker.pos > 0,
    }
}

enum Outcome {
    Pickle,
    NotPickle,
    OutOfData,
}

struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    /// Items on the stack above the innermost mark.
    depth: usize,
    /// Depths saved by MARK.
    marks: Vec<usize>,
}

impl<'a> Walker<'a> {
    fn run(&mut self) -> Outcome {
        loop {
            if let Err(outcome) = self.step() {
                return outcome;
            }
        }
    }

    /// Walks one opcode; `Err` carries the decision once there is one.
    fn step(&mut self) -> Result<(), Outcome> {
        let Some(&op) = self.data.get(self.pos) else {
            return Err(Outcome::OutOfData);
        };
        self.pos += 1;
        match op {
            // PROTO, GLOBAL, INST, STACK_GLOBAL, EXT1/2/4: a real pickle,
            // and the ones that reach arbitrary callables.
            0x80 | 0x82..=0x84 | 0x93 => return Err(Outcome::Pickle),
            b'c' | b'i' => {
                let Some(module) = self.line() else {
                    return Err(Outcome::OutOfData);
                };
                let Some(name) = self.line() else {
                    return Err(Outcome::OutOfData);
                };
                return Err(if is_dotted_name(module) && is_dotted_name(name) {
                    Outcome::Pickle
                } else {
                    Outcome::NotPickle
                });
            }
            b'.' => {
                return Err(if self.depth >= 1 {
                    Outcome::Pickle
                } else {
                    Outcome::NotPickle
                });
            }
            // Line-argument opcodes. Python parses these arguments
            // leniently (`int(line, 0)` accepts spaces, underscores,
            // `0x`), so any line is accepted here: being stricter than
            // the unpickler would let a crafted pickle pass as text.
            // Only STRING is checked, exactly as Python 3 checks it.
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' => {
                let Some(arg) = self.line() else {
                    return Err(Outcome::OutOfData);
                };
                if op == b'S' && !is_quoted(arg) {
                    return Err(Outcome::NotPickle);
                }
                if op == b'p' {
                    self.stack(1, 1)?;
                } else {
                    self.stack(0, 1)?;
                }
            }
            b'(' => {
                self.marks.push(self.depth);
                self.depth = 0;
            }
            b'0' => {
                if self.depth > 0 {
                    self.depth -= 1;
                } else {
                    self.pop_mark(0)?;
                }
            }
            b'1' => self.pop_mark(0)?,
            b'2' => self.stack(1, 2)?,
            b'N' | b']' | b'}' | b')' | 0x88 | 0x89 | 0x8f | 0x97 => self.stack(0, 1)?,
            b'R' | b'a' | b'b' | 0x81 => self.stack(2, 1)?,
            b's' | 0x92 => self.stack(3, 1)?,
            b'Q' | 0x85 | 0x94 | 0x98 => self.stack(1, 1)?,
            0x86 => self.stack(2, 1)?,
            0x87 => self.stack(3, 1)?,
            b'd' | b'l' | b't' | b'o' | 0x91 => self.pop_mark(1)?,
            b'e' | b'u' | 0x90 => {
                self.pop_mark(0)?;
                if self.depth == 0 {
                    return Err(Outcome::NotPickle);
                }
            }
            // Fixed-size binary arguments.
            b'K' | b'h' | b'q' | b'M' | b'J' | b'j' | b'r' | b'G' | 0x95 => {
                let size = match op {
                    b'K' | b'h' | b'q' => 1,
                    b'M' => 2,
                    b'J' | b'j' | b'r' => 4,
                    _ => 8,
                };
                if self.skip(size).is_none() {
                    return Err(Outcome::OutOfData);
                }
                match op {
                    b'q' | b'r' => self.stack(1, 1)?,
                    0x95 => {}
                    _ => self.stack(0, 1)?,
                }
            }
            // Length-prefixed binary arguments.
            b'U' | b'C' | 0x8a | 0x8c => {
                if self.counted(1).is_none() {
                    return Err(Outcome::OutOfData);
                }
                self.stack(0, 1)?;
            }
            b'T' | b'X' | b'B' | 0x8b => {
                if self.counted(4).is_none() {
                    return Err(Outcome::OutOfData);
                }
                self.stack(0, 1)?;
            }
            0x8d | 0x8e | 0x96 => {
                if self.counted(8).is_none() {
                    return Err(Outcome::OutOfData);
                }
                self.stack(0, 1)?;
            }
            _ => return Err(Outcome::NotPickle),
        }
        Ok(())
    }

    /// Pops `pop` items above the innermost mark, then pushes `push`.
    fn stack(&mut self, pop: usize, push: usize) -> Result<(), Outcome> {
        match self.depth.checked_sub(pop) {
            Some(rest) => {
                self.depth = rest + push;
                Ok(())
            }
            None => Err(Outcome::NotPickle),
        }
    }

    /// Pops everything down to the innermost mark, then pushes `push`.
    fn pop_mark(&mut self, push: usize) -> Result<(), Outcome> {
        match self.marks.pop() {
            Some(saved) => {
                self.depth = saved + push;
                Ok(())
            }
            None => Err(Outcome::NotPickle),
        }
    }

    /// The bytes up to the next newline (consumed with it), if there is one.
    /// Each byte is looked at once, so the walk stays linear in the input.
    fn line(&mut self) -> Option<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..)?;
        let len = rest.iter().position(|&b| b == b'\n')?;
        self.pos += len + 1;
        rest.get(..len)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        let end = self.pos.checked_add(n)?;
        if end > self.data.len() {
            return None;
        }
        self.pos = end;
        Some(())
    }

    /// Skips a little-endian length of `width` bytes and that many bytes.
    fn counted(&mut self, width: usize) -> Option<()> {
        let start = self.pos;
        let bytes = self.data.get(start..start.checked_add(width)?)?;
        let mut len: u64 = 0;
        for (i, b) in bytes.iter().enumerate() {
            len |= u64::from(*b) << (8 * i);
        }
        self.pos = start + width;
        self.skip(usize::try_from(len).ok()?)
    }
}

/// A Python module or attribute path: identifiers (Unicode allowed, as in
/// Python 3) joined by dots.
fn is_dotted_name(s: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(s) else {
        return false;
    };
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
                && chars.all(|c| c.is_alphanumeric() || c == '_')
        })
}

fn is_quoted(s: &[u8]) -> bool {
    matches!(s, [b'\'', .., b'\''] | [b'"', .., b'"'])
}
