//! Which pickle globals a model checkpoint may import.
//!
//! An allowlist, not a deny-list: every import a pickle makes is a call into
//! code chosen by the file's author, so only the few globals that PyTorch,
//! numpy and joblib checkpoints actually need are accepted, each with the
//! reason it cannot reach code execution. Anything else is unsafe; the
//! deny-lists below only decide whether it is *critical* (known to reach code
//! execution: `os.system`, `builtins.eval`, `pkgutil.resolve_name`, ...) or
//! merely *high* (an unknown class whose `__reduce__` nobody has reviewed).

/// How an import is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// On the allowlist.
    Allowed,
    /// Not on the allowlist.
    Unsafe,
    /// Known to reach code execution, file or network access.
    Critical,
}

/// Full dotted paths (`module.name`) that ML checkpoints need. A path is
/// allowed only by exact match, so `collections.OrderedDict.__init__` or
/// `torch._utils._rebuild_tensor_v2.__globals__` are not.
const ALLOWED: &[&str] = &[
    // A dict subclass: constructing it and setting items runs no user code.
    "collections.OrderedDict",
    // torch.save's tensor rebuilders: they wrap an already loaded storage in
    // a tensor view (offset/size/stride checked by torch) and call nothing
    // taken from the pickle except other imported (and so checked) globals.
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_meta_tensor_no_storage",
    // Applies an imported (so checked) rebuild function and tensor subclass.
    "torch._tensor._rebuild_from_type_v2",
    // Storage types: persistent ids name them to allocate raw storage bytes.
    "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage",
    "torch.UntypedStorage",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.ComplexFloatStorage",
    "torch.ComplexDoubleStorage",
    "torch.QInt8Storage",
    "torch.QUInt8Storage",
    "torch.QInt32Storage",
    "torch.QUInt4x2Storage",
    "torch.QUInt2x4Storage",
    // Plain value types: constructing them parses numbers or names only.
    "torch.Size",
    "torch.device",
    "torch.dtype",
    // dtype, layout, memory-format and qscheme singletons: constants.
    "torch.float32",
    "torch.float",
    "torch.float16",
    "torch.half",
    "torch.bfloat16",
    "torch.float64",
    "torch.double",
    "torch.int64",
    "torch.long",
    "torch.int32",
    "torch.int",
    "torch.int16",
    "torch.short",
    "torch.int8",
    "torch.uint8",
    "torch.bool",
    "torch.complex64",
    "torch.complex128",
    "torch.float8_e4m3fn",
    "torch.float8_e5m2",
    "torch.qint8",
    "torch.quint8",
    "torch.qint32",
    "torch.strided",
    "torch.sparse_coo",
    "torch.contiguous_format",
    "torch.channels_last",
    "torch.preserve_format",
    "torch.per_tensor_affine",
    "torch.per_channel_affine",
    "torch.per_channel_affine_float_qparams",
    // numpy array pickles: allocate an array, then BUILD copies raw bytes in
    // (object arrays carry their objects as ordinary, checked pickle data).
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    // Protocol 5 array pickles: a view on a bytes buffer.
    "numpy.core.numeric._frombuffer",
    "numpy._core.numeric._frombuffer",
    // numpy pickles bytes as `_codecs.encode(str, 'latin1')`: a pure
    // text-to-bytes transform (codecs are looked up among stdlib encodings).
    "_codecs.encode",
    // Pure constructors of built-in value types.
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "builtins.slice",
    "builtins.complex",
    "builtins.range",
    // Only useful as the `base` argument of copyreg._reconstructor, whose
    // other arguments are checked at the call (see vm.rs).
    "builtins.object",
    // copyreg._reconstructor(cls, base, state) calls base.__new__(cls) and
    // base.__init__: allowed only when cls and base are allowlisted globals,
    // which the VM checks at the REDUCE.
    "copyreg._reconstructor",
    // joblib's marker for an array whose raw bytes follow in the stream; it
    // only holds shape/dtype/order, and the VM follows it to skip the bytes.
    "joblib.numpy_pickle.NumpyArrayWrapper",
];

/// Top-level modules (or any path segment) whose globals reach code
/// execution, the file system, the network or the import machinery.
const CRITICAL_SEGMENTS: &[&str] = &[
    "builtins",
    "__builtin__",
    "__builtins__",
    "os",
    "posix",
    "nt",
    "subprocess",
    "_posixsubprocess",
    "sys",
    "runpy",
    "pip",
    "_pip",
    "pkgutil",
    "importlib",
    "imp",
    "zipimport",
    "code",
    "codeop",
    "pty",
    "socket",
    "shutil",
    "webbrowser",
    "operator",
    "_operator",
    "functools",
    "_functools",
    "types",
    "ctypes",
    "_ctypes",
    "pickle",
    "_pickle",
    "cPickle",
    "pickletools",
    "marshal",
    "dill",
    "cloudpickle",
    "shelve",
    "multiprocessing",
    "asyncio",
    "threading",
    "_thread",
    "signal",
    "platform",
    "commands",
    "popen2",
    "timeit",
    "bdb",
    "pdb",
    "trace",
    "profile",
    "cProfile",
    "doctest",
    "venv",
    "ensurepip",
    "distutils",
    "setuptools",
    "site",
    "inspect",
    "gc",
    "io",
    "_io",
    "fileinput",
    "tempfile",
    "glob",
    "pathlib",
    "urllib",
    "urllib2",
    "http",
    "httplib",
    "ftplib",
    "smtplib",
    "telnetlib",
    "requests",
    "aiohttp",
    "xmlrpc",
    "yaml",
    // Attribute names that are code execution whatever module they hang off.
    "eval",
    "exec",
    "execfile",
    "compile",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "open",
    "system",
    "popen",
    "Popen",
    "call",
    "check_call",
    "check_output",
    "run",
    "spawn",
    "spawnl",
    "spawnv",
    "execl",
    "execv",
    "execve",
    "execvp",
    "globals",
    "locals",
    "vars",
    "breakpoint",
    "input",
    "apply",
    "load",
    "loads",
    "import_module",
    "resolve_name",
    "attrgetter",
    "methodcaller",
    "partial",
    "reduce",
];

/// Dotted prefixes (at a dot boundary) of globals known to run code.
const CRITICAL_PREFIXES: &[&str] = &[
    "torch._C",
    "torch.hub",
    "torch.load",
    "torch.serialization",
    "torch.jit",
    "torch.package",
    "torch.ops",
    "torch._dynamo",
    "torch._inductor",
    "torch.utils.cpp_extension",
    "torch.distributed",
    "torch.testing",
    "torch.fx",
    "numpy.load",
    "numpy.testing",
    "numpy.f2py",
    "numpy.distutils",
    "numpy.ctypeslib",
    "numpy.lib.npyio",
    "joblib.load",
    "tensorflow.io",
    "keras.utils",
];

/// Python 2 module names that Python 3's unpickler maps (`fix_imports`) to
/// the names it actually imports; both spellings are judged.
const FIX_IMPORTS: &[(&str, &str)] = &[
    ("__builtin__", "builtins"),
    ("copy_reg", "copyreg"),
    ("exceptions", "builtins"),
    ("cPickle", "pickle"),
    ("UserDict", "collections"),
    ("commands", "subprocess"),
];

/// `module.name`, with the Python 2 module spelling mapped as Python 3 does.
pub fn full_path(module: &str, name: &str) -> String {
    format!("{module}.{name}")
}

/// Judges the global `name` from `module` (either may be dotted).
pub fn classify(module: &str, name: &str) -> Class {
    let path = full_path(module, name);
    let mapped = FIX_IMPORTS
        .iter()
        .find(|(py2, _)| *py2 == module)
        .map(|(_, py3)| full_path(py3, name));
    if is_allowed(&path) || mapped.as_deref().is_some_and(is_allowed) {
        return Class::Allowed;
    }
    if is_critical(&path) || mapped.as_deref().is_some_and(is_critical) {
        Class::Critical
    } else {
        Class::Unsafe
    }
}

/// Exact allowlist membership of a full dotted path.
pub fn is_allowed(path: &str) -> bool {
    ALLOWED.contains(&path)
}

fn is_critical(path: &str) -> bool {
    let segments_hit = path.split('.').any(|seg| {
        CRITICAL_SEGMENTS.contains(&seg)
            // Dunder attributes (`__globals__`, `__subclasses__`, `__class__`)
            // are how sandbox escapes walk from any object to `os`.
            || (seg.len() > 4 && seg.starts_with("__") && seg.ends_with("__") && seg != "__main__")
    });
    segments_hit
        || CRITICAL_PREFIXES.iter().any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
}
