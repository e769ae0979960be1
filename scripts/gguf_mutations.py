"""Mutated copies of a GGUF for scripts/fuzz_gguf.py: one seeded mutation per case.

Two kinds. Byte patches edit the base file in place at a structure kvq_cli.gguf.header located
(a header count, a value's type or length, a tensor's dims, type or offset) or cut it short, so
the file lies about itself. Rewrites re-encode the file from its parts (metadata entries, tensor
infos, tensor data) with one part changed, so the file is well formed but says something odd (a
NaN in the controller, a head count of 0, a tensor of the wrong shape, a missing key).
`Mutator(base).case(i)` is a pure function of (base, seed, i): a failing case is rerun by number.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvq_cli.gguf.header import ARRAY, SCALAR_FORMATS, STRING, read_header
from kvq_cli.gguf.keys import Controller as C

U32, I32, F32, BOOL, U64, I64, F64 = 4, 5, 6, 7, 10, 11, 12
GGML_TYPE_COUNT = 44   # the runtime's ggml (Q2_0 42 and KVQ2 43 are ours)
ARCH = "llama"
HPARAMS = [f"{ARCH}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length", "context_length",
                                   "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                                   "vocab_size", "attention.key_length", "attention.value_length",
                                   "attention.layer_norm_rms_epsilon", "rope.freq_base", "expert_count",
                                   "expert_used_count", "rope.scaling.type")]
TOKENIZER = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
             "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
             "tokenizer.ggml.add_bos_token"]
CONTROLLER = [v for k, v in vars(C).items() if k.isupper()]
BIG = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]


def enc_str(s: str | bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_value(vtype: int, value, item_type: int | None = None) -> bytes:
    """The bytes of a value of GGUF type `vtype` (without key and type)."""
    if vtype == STRING:
        return enc_str(value)
    if vtype == ARRAY:
        body = b"".join(enc_value(item_type, v) for v in value) if item_type == STRING else \
            np.asarray(value, dtype=np.dtype(SCALAR_FORMATS[item_type])).tobytes()
        return struct.pack("<IQ", item_type, len(value)) + body
    fmt = SCALAR_FORMATS[vtype]
    return struct.pack(fmt, bool(value) if vtype == BOOL else value)


def enc_kv(key: str, vtype: int, value, item_type: int | None = None) -> bytes:
    """A whole metadata entry: key, type, value."""
    return enc_str(key) + struct.pack("<I", vtype) + enc_value(vtype, value, item_type)


@dataclass
class Tensor:
    """A tensor of an Image: its info and its data bytes."""

    name: str
    ne: tuple[int, ...]
    type: int
    data: memoryview


class Image:
    """A GGUF as parts that re-encode to a well-formed file (offsets and padding recomputed)."""

    def __init__(self, raw: bytes, path: Path):
        h = read_header(path)
        self.version, self.alignment = h.version, h.alignment
        self.kv: dict[str, bytes] = {k: raw[f.span[0]:f.span[1]] for k, f in h.fields.items()}
        self.fields = h.fields
        ends = [t.offset for t in h.tensors[1:]] + [len(raw) - h.data_offset]
        self.tensors = [Tensor(t.name, t.ne, t.type, memoryview(raw)[h.data_offset + t.offset:h.data_offset + end])
                        for t, end in zip(h.tensors, ends)]

    def copy(self) -> "Image":
        """A copy whose entries and tensor list can change without touching this one."""
        new = object.__new__(Image)
        new.__dict__.update(self.__dict__, kv=dict(self.kv), tensors=list(self.tensors))
        return new

    def to_bytes(self) -> bytes:
        """The file: header, tensor infos with offsets recomputed, padding, data."""
        kv = b"".join(self.kv.values())
        tis, blobs, off = [], [], 0
        for t in self.tensors:
            tis.append(enc_str(t.name) + struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}q", *t.ne)
                       + struct.pack("<iQ", t.type, off))
            pad = -len(t.data) % self.alignment
            blobs += [t.data, b"\0" * pad]
            off += len(t.data) + pad
        head = b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv)) + kv + b"".join(tis)
        return b"".join([head, b"\0" * (-len(head) % self.alignment), *blobs])


class Mutator:
    """Seeded mutations of one base GGUF; `case(i)` -> (description, file bytes)."""

    def __init__(self, base: str | Path, seed: int = 0):
        self.path = Path(base)
        self.raw = self.path.read_bytes()
        self.header = read_header(self.path)
        self.image = Image(self.raw, self.path)
        self.seed = seed
        self.kinds = [(self.patch_header, 6), (self.patch_kv, 12), (self.patch_tensor_info, 12), (self.truncate, 8),
                      (self.flip_bytes, 6), (self.hparam, 14), (self.tokenizer, 8), (self.controller, 22),
                      (self.remove_key, 6), (self.tensor_rewrite, 8), (self.architecture, 2)]

    def case(self, i: int) -> tuple[str, bytes]:
        """Case i: (description, file bytes)."""
        rng = random.Random(f"{self.seed}:{i}")
        kinds, weights = zip(*self.kinds)
        return rng.choices(kinds, weights)[0](rng)

    # -- byte patches of the base file ------------------------------------------------
    def _patched(self, edits: list[tuple[int, bytes]]) -> bytes:
        b = bytearray(self.raw)
        for pos, data in edits:
            b[pos:pos + len(data)] = data
        return bytes(b)

    def patch_header(self, rng) -> tuple[str, bytes]:
        """Magic, version, tensor count or metadata count."""
        what = rng.choice(["magic", "version", "n_tensors", "n_kv"])
        if what == "magic":
            v = rng.choice([b"GGUG", b"gguf", b"\0\0\0\0", b"FUGG", bytes(rng.randrange(256) for _ in range(4))])
            return f"header magic -> {v!r}", v + self.raw[4:]
        if what == "version":
            v = rng.choice([0, 1, 4, 5, 0x03000000, 2**32 - 1, rng.randrange(2**32)])
            return f"header version -> {v}", self._patched([(4, struct.pack("<I", v))])
        n = len(self.header.tensors) if what == "n_tensors" else len(self.header.fields)
        v = rng.choice([0, 1, n - 1, n + 1, 2 * n, *BIG, rng.randrange(2**64)])
        return f"header {what} {n} -> {v}", self._patched([(8 if what == "n_tensors" else 16, struct.pack("<Q", v))])

    def patch_kv(self, rng) -> tuple[str, bytes]:
        """A metadata entry's type, key length, item type, count, string length or value bytes."""
        key = rng.choice(list(self.header.fields))
        f = self.header.fields[key]
        start = f.span[0]
        klen = len(key.encode())
        type_at = start + 8 + klen
        what = rng.choice(["type", "key_length", "value"] + (["item_type", "count"] if f.type == ARRAY else [])
                          + (["string_length"] if f.type == STRING else []))
        if what == "type":
            v = rng.choice([*range(14), 2**32 - 1])
            return f"kv {key} type {f.type} -> {v}", self._patched([(type_at, struct.pack("<I", v))])
        if what == "key_length":
            v = rng.choice([0, klen - 1, klen + 1, 2**20, *BIG])
            return f"kv {key} key length {klen} -> {v}", self._patched([(start, struct.pack("<Q", v))])
        if what == "item_type":
            v = rng.choice([*range(14), 2**32 - 1])
            return f"kv {key} item type {f.item_type} -> {v}", self._patched([(type_at + 4, struct.pack("<I", v))])
        if what == "count":
            v = rng.choice([0, 1, f.count - 1, f.count + 1, 2 * f.count, 2**20, *BIG])
            return f"kv {key} count {f.count} -> {v}", self._patched([(type_at + 8, struct.pack("<Q", v))])
        if what == "string_length":
            n = len(f.value.encode())
            v = rng.choice([0, n - 1, n + 1, 2**20, *BIG])
            return f"kv {key} string length {n} -> {v}", self._patched([(type_at + 4, struct.pack("<Q", v))])
        end = f.span[1]   # random bytes inside the value
        pos = rng.randrange(type_at + 4, end) if end > type_at + 4 else type_at
        data = bytes(rng.randrange(256) for _ in range(min(rng.choice([1, 2, 4, 8]), end - pos) or 1))
        return f"kv {key} value bytes at +{pos - type_at - 4} -> {data.hex()}", self._patched([(pos, data)])

    def patch_tensor_info(self, rng) -> tuple[str, bytes]:
        """A tensor info's n_dims, one dimension, ggml type, offset or name length."""
        t = rng.choice(self.header.tensors)
        nlen = len(t.name.encode())
        dims_at = t.span[0] + 8 + nlen
        type_at = dims_at + 4 + 8 * len(t.ne)
        what = rng.choice(["n_dims", "dim", "dim", "type", "type", "offset", "offset", "name_length"])
        if what == "n_dims":
            v = rng.choice([0, 1, 2, 3, 4, 5, 2**32 - 1])
            return f"tensor {t.name} n_dims {len(t.ne)} -> {v}", self._patched([(dims_at, struct.pack("<I", v))])
        if what == "dim":
            j = rng.randrange(len(t.ne))
            d = t.ne[j]
            v = rng.choice([0, 1, d - 1, d + 1, 2 * d, d // 2, 32, -1, -d, 2**31, 2**62, 2**63 - 1])
            return f"tensor {t.name} ne[{j}] {d} -> {v}", self._patched([(dims_at + 4 + 8 * j, struct.pack("<q", v))])
        if what == "type":
            v = rng.choice([*range(GGML_TYPE_COUNT + 2), 100, -1, 2**31 - 1])
            return f"tensor {t.name} type {t.type} -> {v}", self._patched([(type_at, struct.pack("<i", v))])
        if what == "offset":
            v = rng.choice([0, t.offset + 1, t.offset + 32, max(t.offset - 32, 0), len(self.raw), *BIG])
            return f"tensor {t.name} offset {t.offset} -> {v}", self._patched([(type_at + 4, struct.pack("<Q", v))])
        v = rng.choice([0, nlen - 1, nlen + 1, 64, 2**20, *BIG])
        return f"tensor {t.name} name length {nlen} -> {v}", self._patched([(t.span[0], struct.pack("<Q", v))])

    def truncate(self, rng) -> tuple[str, bytes]:
        """The file cut at a random point (in the header, the tensor infos or the data)."""
        head_end = self.header.data_offset
        n = rng.choice([rng.randrange(0, head_end), rng.randrange(head_end, len(self.raw)), rng.randrange(0, 64),
                        head_end, head_end - 1, len(self.raw) - 1, rng.randrange(self.header.tensors[0].span[0], head_end)])
        return f"truncate at {n} of {len(self.raw)}", self.raw[:n]

    def flip_bytes(self, rng) -> tuple[str, bytes]:
        """1-16 random bytes of the header's structure."""
        # structure-dense parts: the first KB, the non-tokenizer metadata, the tensor infos
        spans = [(0, 1024), (self.header.tensors[0].span[0], self.header.data_offset)]
        spans += [f.span for k, f in self.header.fields.items() if not k.startswith("tokenizer.ggml.")]
        edits = []
        for _ in range(rng.choice([1, 2, 4, 8, 16])):
            a, b = rng.choice(spans)
            edits.append((rng.randrange(a, b), bytes([rng.randrange(256)])))
        return f"flip {len(edits)} bytes at {sorted(p for p, _ in edits)[:4]}", self._patched(edits)

    # -- rewrites (well-formed files) ----------------------------------------------------
    def rewrite(self, desc: str, kv: dict[str, bytes | None] | None = None, tensors=None) -> tuple[str, bytes]:
        """(desc, the base re-encoded with metadata entries replaced (None: removed) and/or other tensors)."""
        img = self.image.copy()
        for key, entry in (kv or {}).items():
            if entry is None:
                img.kv.pop(key, None)
            else:
                img.kv[key] = entry
        if tensors is not None:
            img.tensors = tensors
        return desc, img.to_bytes()

    def _odd_scalar(self, rng, like: int | None = None):
        """(type, value, item_type, text) of a value a reader might not expect."""
        choices = [(U32, 0), (U32, 1), (U32, 2), (U32, 3), (U32, 7), (U32, 64), (U32, 4096), (U32, 65536),
                   (I32, -1), (I32, -2**31), (U32, 2**31), (U32, 2**32 - 1), (U64, 2**40), (U64, 2**64 - 1),
                   (I64, -1), (F32, float("nan")), (F32, float("inf")), (F32, -1.0), (F32, 0.0), (F32, 1e38),
                   (F64, 2.5), (BOOL, True), (STRING, ""), (STRING, "x" * 300), (STRING, "4"), (0, 4), (1, -3)]   # 0: u8, 1: i8
        if like is not None and rng.random() < 0.5:   # same type, odd value
            choices = [c for c in choices if c[0] == like] or choices
        vtype, value = rng.choice(choices)
        return vtype, value, None, f"{value!r} ({vtype})"

    def hparam(self, rng) -> tuple[str, bytes]:
        """A hyperparameter with an odd value or type, or a per-layer array."""
        key = rng.choice(HPARAMS)
        f = self.header.fields.get(key)
        if key.endswith("rope.scaling.type") and rng.random() < 0.7:
            v = rng.choice(["none", "linear", "yarn", "longrope", "foo", ""])
            return self.rewrite(f"hparam {key} -> {v!r}", {key: enc_kv(key, STRING, v)})
        if rng.random() < 0.12:   # per-layer arrays are legal for head counts
            n = rng.choice([0, 1, 3, 4, 512])
            vals = [rng.choice([0, 1, 2, 4, 8, 3]) for _ in range(n)]
            return self.rewrite(f"hparam {key} -> array {vals[:8]} (n={n})", {key: enc_kv(key, ARRAY, vals, I32)})
        vtype, value, _, text = self._odd_scalar(rng, f.type if f else U32)
        return self.rewrite(f"hparam {key} -> {text}", {key: enc_kv(key, vtype, value)})

    def tokenizer(self, rng) -> tuple[str, bytes]:
        """A tokenizer key: special ids out of range, other models, bad templates, vocab arrays edited."""
        key = rng.choice(TOKENIZER)
        f = self.header.fields[key]
        n_vocab = self.header.fields["tokenizer.ggml.tokens"].count
        if key.endswith("_id"):
            vtype, value = rng.choice([(U32, n_vocab), (U32, n_vocab + 1), (I32, -1), (U32, 2**32 - 1), (U32, 2**31),
                                       (STRING, "1"), (F32, 1.5)])
            return self.rewrite(f"tokenizer {key} -> {value!r} ({vtype})", {key: enc_kv(key, vtype, value)})
        if key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            v = rng.choice(["", "llama", "bert", "t5", "rwkv", "ugm", "plamo2", "none", "no_vocab", "foo", "gpt2", "qwen2"])
            return self.rewrite(f"tokenizer {key} -> {v!r}", {key: enc_kv(key, STRING, v)})
        if key == "tokenizer.chat_template":
            v = rng.choice(["{% for m in messages %}", "{{ raise_exception('no') }}", "", "{{ messages[99]['content'] }}",
                            "x" * 100000, "{% for m in messages %}{{ m.content }}{% endfor %}"])
            return self.rewrite(f"tokenizer chat_template -> {v[:40]!r}", {key: enc_kv(key, STRING, v)})
        if key == "tokenizer.ggml.add_bos_token":
            return self.rewrite("tokenizer add_bos_token -> u32 7", {key: enc_kv(key, U32, 7)})
        # the long arrays: read them whole from the base file (the header keeps only their first items)
        full = _full_array(self.raw, f)
        how = rng.choice(["shorter", "longer", "empty", "odd items", "wrong type"])
        if how == "shorter":
            full = full[:rng.choice([1, 100, len(full) // 2, len(full) - 1])]
        elif how == "longer":
            full = full + full[:rng.choice([1, 1000])]
        elif how == "empty":
            full = []
        elif how == "odd items":
            full = list(full)
            odd = ([-1, 7, 100, 2**31 - 1] if f.item_type != STRING else
                   ["", "nospace", " ", "a b c", "\xff" * 3, b"\xff\xfe", b"\x80 \xc3", "x" * 5000])
            for _ in range(rng.choice([1, 10, 1000])):
                full[rng.randrange(len(full))] = rng.choice(odd)
        if how == "wrong type":
            entry = enc_kv(key, ARRAY, [1.0] * len(full), F32)
        else:
            entry = enc_kv(key, ARRAY, full, f.item_type)
        return self.rewrite(f"tokenizer {key} {how} (n={len(full)})", {key: entry})

    def controller(self, rng) -> tuple[str, bytes]:
        """A kvq.controller.* key: NaN/Inf, wrong shapes, huge sizes, wrong types, odd names."""
        key = rng.choice(CONTROLLER)
        f = self.header.fields.get(key)
        if f is not None and f.type == ARRAY and f.item_type == F32 and rng.random() < 0.6:
            vals = list(f.value)
            how = rng.choice(["nan", "inf", "-inf", "huge", "zero", "negative", "shorter", "longer", "empty", "f64", "i32",
                              "many", "strings"])
            if how == "strings":   # the right count, the wrong type
                return self.rewrite(f"controller {key} strings", {key: enc_kv(key, ARRAY, ["0.5"] * len(vals), STRING)})
            if how in ("nan", "inf", "-inf", "huge", "zero", "negative") and vals:
                x = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "huge": 3e38, "zero": 0.0,
                     "negative": -1.0}[how]
                for j in rng.sample(range(len(vals)), rng.choice([1, len(vals)]) if len(vals) > 1 else 1):
                    vals[j] = x
                return self.rewrite(f"controller {key} {how}", {key: enc_kv(key, ARRAY, vals, F32)})
            if how == "shorter":
                vals = vals[:-1]
            elif how == "longer":
                vals = vals + [0.5]
            elif how == "empty":
                vals = []
            elif how == "many":
                vals = [0.1] * rng.choice([10**5, 10**6])
            item = {"f64": F64, "i32": I32}.get(how, F32)
            if item == I32:
                vals = [int(v) if abs(v) < 2**31 else 0 for v in vals]   # (NaN and inf are not < 2**31)
            return self.rewrite(f"controller {key} {how} (n={len(vals)})", {key: enc_kv(key, ARRAY, vals, item)})
        if key == C.FEATURES:
            v = rng.choice([[], ["quality"], ["quality", "quality"], ["nope"], [""], ["x" * 5000], ["quality"] * 100,
                            list(f.value) + ["attn_recv"], list(f.value)[::-1], list(f.value)[:-1]])
            if rng.random() < 0.2:
                vals = [float(i) for i in range(len(f.value))]   # the right count, the wrong type
                return self.rewrite("controller features -> f32 array", {key: enc_kv(key, ARRAY, vals, F32)})
            return self.rewrite(f"controller features -> {v[:4]} (n={len(v)})", {key: enc_kv(key, ARRAY, v, STRING)})
        if key == C.PRECISIONS:
            v = rng.choice([[], [2], [1, 2], [2, 4, 8, 16, 32], [-1, 4], [16, 8, 4, 2], [0, 2, 4, 8, 16], [3, 3, 3, 3],
                            [2, 4, 8, 2**31 - 1], [2] * 1000])
            item = rng.choice([I32, U32, F32, U64]) if rng.random() < 0.3 else U32
            v2 = [float(x) for x in v] if item == F32 else [x % 2**32 for x in v] if item in (U32, U64) else v
            return self.rewrite(f"controller precisions -> {v[:6]} ({item})", {key: enc_kv(key, ARRAY, v2, item)})
        if key in (C.GRANULARITY, C.HEAD) and rng.random() < 0.7:
            v = rng.choice(["", "token", "token_layer", "logits", "log_damage", "layer", "x" * 1000, "\xff"])
            return self.rewrite(f"controller {key} -> {v[:20]!r}", {key: enc_kv(key, STRING, v)})
        vtype, value, _, text = self._odd_scalar(rng, f.type if f else U32)
        return self.rewrite(f"controller {key} -> {text}", {key: enc_kv(key, vtype, value)})

    def remove_key(self, rng) -> tuple[str, bytes]:
        """A required key removed, or general.alignment set."""
        keys = HPARAMS + TOKENIZER + CONTROLLER + ["general.architecture", "general.alignment"]
        key = rng.choice([k for k in keys if k in self.header.fields] or list(self.header.fields))
        if rng.random() < 0.2:
            alignment = rng.choice([0, 1, 3, 16, 64, 2**31])
            return self.rewrite(f"alignment -> {alignment}", {"general.alignment": enc_kv("general.alignment", U32, alignment)})
        return self.rewrite(f"remove {key}", {key: None})

    def tensor_rewrite(self, rng) -> tuple[str, bytes]:
        """A tensor dropped, shrunk, transposed, renamed, duplicated, NaN-filled, retyped or converted."""
        tensors = list(self.image.tensors)
        j = rng.randrange(len(tensors))
        t = tensors[j]
        how = rng.choice(["drop", "shrink", "transpose", "rename", "duplicate", "nan", "retype", "convert", "convert", "extra"])
        if how == "drop":
            del tensors[j]
        elif how == "shrink" and len(t.ne) > 1 and t.ne[-1] > 1:
            rows = rng.choice([1, t.ne[-1] // 2, t.ne[-1] - 1])
            ne = t.ne[:-1] + (rows,)
            tensors[j] = Tensor(t.name, ne, t.type, t.data[:len(t.data) // t.ne[-1] * rows])
        elif how == "transpose" and len(t.ne) == 2:
            tensors[j] = Tensor(t.name, (t.ne[1], t.ne[0]), t.type, t.data)
        elif how == "rename":
            tensors[j] = Tensor(rng.choice(["", "blk.99.attn_q.weight", "output.weight", "x" * 70, "token_embd.weight"]),
                                t.ne, t.type, t.data)
        elif how == "duplicate":
            tensors.append(t)
        elif how == "nan":
            arr = np.frombuffer(t.data, np.float16 if t.type == 1 else np.float32).copy()
            arr[rng.randrange(len(arr)):] = np.nan
            tensors[j] = Tensor(t.name, t.ne, t.type, memoryview(arr.tobytes()))
        elif how == "convert" and t.type in (0, 1):   # the same values stored in another type
            import gguf

            Q = gguf.GGMLQuantizationType
            arr = np.frombuffer(t.data, np.float16 if t.type == 1 else np.float32).astype(np.float32).reshape(t.ne[::-1])
            new = rng.choice([Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.IQ4_NL])
            try:
                blob = gguf.quants.quantize(arr, new)
            except Exception:   # noqa: BLE001 (a type gguf-py cannot write, or rows that do not fit its blocks)
                new, blob = Q.F16, arr.astype(np.float16)
            tensors[j] = Tensor(t.name, t.ne, int(new), memoryview(np.ascontiguousarray(blob).tobytes()))
            how = f"convert to {new.name}"
        elif how == "retype":   # same bytes read as another type of the same size where one exists
            new = {0: 26, 1: 30, 26: 0, 30: 1}.get(t.type, 0)
            tensors[j] = Tensor(t.name, t.ne, new, t.data)
        else:
            tensors.append(Tensor("blk.0.attn_k.bias", (128,), 0, memoryview(b"\0" * 512)))
        return self.rewrite(f"tensor-rewrite {how} {t.name}", tensors=tensors)

    def architecture(self, rng) -> tuple[str, bytes]:
        """general.architecture set to another (or no) architecture."""
        v = rng.choice(["", "gpt2", "bert", "qwen2", "mamba", "t5", "clip", "gemma3", "falcon", "nope", "llama4"])
        key = "general.architecture"
        return self.rewrite(f"architecture -> {v!r}", {key: enc_kv(key, STRING, v)})


def _full_array(raw: bytes, f) -> list:
    """Every item of a metadata array of the base file (the header reader keeps long ones short)."""
    klen = struct.unpack_from("<Q", raw, f.span[0])[0]
    pos = f.span[0] + 8 + klen + 4 + 4 + 8   # key, type, item type, count
    if f.item_type != STRING:
        return np.frombuffer(raw, np.dtype(SCALAR_FORMATS[f.item_type]), f.count, pos).tolist()
    out = []
    for _ in range(f.count):
        n = struct.unpack_from("<Q", raw, pos)[0]
        out.append(raw[pos + 8:pos + 8 + n])
        pos += 8 + n
    return out
