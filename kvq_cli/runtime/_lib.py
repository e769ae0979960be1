"""ctypes bindings for the `llama_kvq_*` API our llama.cpp patch adds (src/llama-kvq.h).

One binding per C function, prototype in the comment above it, in llama-cpp-python's style.
Bound on the library llama-cpp-python already loaded (`llama_cpp.llama_cpp._lib`).
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char_p, c_double, c_float, c_int32, c_int64, c_void_p

from kvq_cli.errors import RuntimeMissing

POOL_NAMES = ("window", "f16", "q8", "q4", "k4v2", "q2", "drop")   # llama_kvq_stats.rows (drop: bits 0, left out)
N_POOLS = len(POOL_NAMES)

POLICY_STATIC, POLICY_RULE, POLICY_LEARNED, POLICY_ASSIGN = 0, 1, 2, 3
# enum llama_kvq_attn_kernel
ATTN_DEFAULT, ATTN_REF, ATTN_FUSED_SCALAR, ATTN_FUSED_SIMD = 0, 1, 2, 3
ATTN_FUSED_AVX2, ATTN_FUSED_AVX512, ATTN_FUSED_NEON = 4, 5, 6


class KvqParams(ctypes.Structure):
    """struct llama_kvq_params"""

    _fields_ = [
        ("policy", c_int32),
        ("static_bits", c_int32),
        ("window", c_int32),
        ("budget_bits", c_float),
        ("budget_bytes", c_int64),
        ("per_layer", c_int32),
        ("trace", c_int32),
        ("rotate", c_int32),
        ("rule_sink", c_int32),
        ("rule_heavy", c_float),
        ("rule_base_bits", c_int32),
        ("attn_ref", c_int32),
        ("record_q", c_int32),
        ("price_step", c_float),
        ("k_center", c_int32),
        ("qar_mu", c_float),
        ("window_bits", c_int32),
        ("v_unbias", c_int32),
        ("controller_path", c_char_p),
    ]


class KvqStats(ctypes.Structure):
    """struct llama_kvq_stats"""

    _fields_ = [
        ("n_tokens", c_int64),
        ("rows", c_int64 * N_POOLS),
        ("bytes_held", c_int64),
        ("bytes_budget", c_int64),
        ("n_elements", c_int64),
        ("bits_per_elem", c_double),
        ("n_budget_demotions", c_int64),
        ("t_policy_ms", c_double),
        ("t_attn_ms", c_double),
    ]


_P_i32 = POINTER(c_int32)
_P_f32 = POINTER(c_float)

# name: (restype, argtypes)
_PROTOTYPES = {
    # struct llama_kvq_params llama_kvq_default_params(void);
    "llama_kvq_default_params": (KvqParams, []),
    # int32_t llama_kvq_params_from_spec(const char * spec, struct llama_kvq_params * out);
    "llama_kvq_params_from_spec": (c_int32, [c_char_p, POINTER(KvqParams)]),
    # int32_t llama_kvq_enable(struct llama_context * ctx, const struct llama_kvq_params * params);
    "llama_kvq_enable": (c_int32, [c_void_p, POINTER(KvqParams)]),
    # struct llama_context * llama_kvq_init_from_model(struct llama_model * model, struct llama_context_params cparams,
    #                                                  const struct llama_kvq_params * params);
    # (argtypes set in KvqLib: the llama_context_params struct is llama-cpp-python's)
    "llama_kvq_init_from_model": (c_void_p, None),
    # int32_t llama_kvq_enabled(const struct llama_context * ctx);
    "llama_kvq_enabled": (c_int32, [c_void_p]),
    # const char * llama_kvq_last_error(void);
    "llama_kvq_last_error": (c_char_p, []),
    # void llama_kvq_clear_error(void);
    "llama_kvq_clear_error": (None, []),
    # int32_t llama_kvq_set_assignment(struct llama_context * ctx, const int32_t * bits, int64_t n);
    "llama_kvq_set_assignment": (c_int32, [c_void_p, _P_i32, c_int64]),
    # int32_t llama_kvq_set_k_center(struct llama_context * ctx, const float * k_mu, int64_t n);
    "llama_kvq_set_k_center": (c_int32, [c_void_p, _P_f32, c_int64]),
    # int32_t llama_kvq_get_stats(const struct llama_context * ctx, struct llama_kvq_stats * out);
    "llama_kvq_get_stats": (c_int32, [c_void_p, POINTER(KvqStats)]),
    # int32_t llama_kvq_n_features(void);
    "llama_kvq_n_features": (c_int32, []),
    # const char * llama_kvq_feature_name(int32_t i);
    "llama_kvq_feature_name": (c_char_p, [c_int32]),
    # int64_t llama_kvq_get_trace(const struct llama_context * ctx, int32_t * pos, int32_t * layer,
    #                             int32_t * token, int32_t * bits, float * features, int64_t cap);
    "llama_kvq_get_trace": (c_int64, [c_void_p, _P_i32, _P_i32, _P_i32, _P_i32, _P_f32, c_int64]),
    # void llama_kvq_clear_trace(struct llama_context * ctx);
    "llama_kvq_clear_trace": (None, [c_void_p]),
    # int64_t llama_kvq_get_queries(const struct llama_context * ctx, int32_t il, float * q, int32_t * pos, int64_t cap);
    "llama_kvq_get_queries": (c_int64, [c_void_p, c_int32, _P_f32, _P_i32, c_int64]),
    # int32_t llama_kvq_roundtrip(const struct llama_context * ctx, int32_t bits, const float * x, float * y, int64_t n_rows);
    "llama_kvq_roundtrip": (c_int32, [c_void_p, c_int32, _P_f32, _P_f32, c_int64]),
    # int32_t llama_kvq_roundtrip_v(const struct llama_context * ctx, int32_t bits, const float * x, float * y, int64_t n_rows);
    "llama_kvq_roundtrip_v": (c_int32, [c_void_p, c_int32, _P_f32, _P_f32, c_int64]),
    # int32_t llama_kvq_roundtrip_qar(const struct llama_context * ctx, int32_t bits, const float * x, const float * u,
    #                                 float * y, int64_t n_rows);
    "llama_kvq_roundtrip_qar": (c_int32, [c_void_p, c_int32, _P_f32, _P_f32, _P_f32, c_int64]),
    # int32_t llama_kvq_model_controller(const struct llama_model * model);
    "llama_kvq_model_controller": (c_int32, [c_void_p]),
    # int32_t llama_kvq_controller_eval(const struct llama_model * model, const float * x, int64_t n, int32_t * bits);
    "llama_kvq_controller_eval": (c_int32, [c_void_p, _P_f32, c_int64, _P_i32]),
    # int64_t llama_kvq_read_layer(const struct llama_context * ctx, int32_t il, float * k, float * v,
    #                              int32_t * pos, int32_t * prec, int64_t cap);
    "llama_kvq_read_layer": (c_int64, [c_void_p, c_int32, _P_f32, _P_f32, _P_i32, _P_i32, c_int64]),
    # int32_t llama_kvq_attend(struct llama_context * ctx, int32_t il, const float * q, int32_t n_q,
    #                          const int32_t * q_pos, float * out);
    "llama_kvq_attend": (c_int32, [c_void_p, c_int32, _P_f32, c_int32, _P_i32, _P_f32]),
    # int32_t llama_kvq_attend_kernel(struct llama_context * ctx, int32_t kernel, int32_t il, const float * q,
    #                                 int32_t n_q, const int32_t * q_pos, float * out);
    "llama_kvq_attend_kernel": (c_int32, [c_void_p, c_int32, c_int32, _P_f32, c_int32, _P_i32, _P_f32]),
    # const char * llama_kvq_attn_isa(const struct llama_context * ctx)
    "llama_kvq_attn_isa": (c_char_p, [c_void_p]),
}


class KvqLib:
    """The bound functions, as attributes named like the C functions."""

    def __init__(self, lib: ctypes.CDLL):
        for name, (restype, argtypes) in _PROTOTYPES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise RuntimeMissing(f"the loaded llama.cpp library has no {name}: it is not the kvq build") from None
            fn.restype = restype
            if argtypes is not None:
                fn.argtypes = argtypes
            setattr(self, name, fn)
        from llama_cpp import llama_cpp as raw

        self.llama_kvq_init_from_model.argtypes = [c_void_p, raw.llama_context_params, POINTER(KvqParams)]

    def last_error(self) -> str:
        msg = self.llama_kvq_last_error()
        return msg.decode("utf-8", "replace") if msg else "unknown kvq error"

    def feature_names(self) -> list[str]:
        return [self.llama_kvq_feature_name(i).decode() for i in range(self.llama_kvq_n_features())]


_LIB: KvqLib | None = None


def kvq_lib() -> KvqLib:
    """Bind (once) the kvq symbols of the library llama-cpp-python loaded."""
    global _LIB
    if _LIB is None:
        try:
            from llama_cpp import llama_cpp as raw
        except (ImportError, OSError) as e:
            raise RuntimeMissing(f"the llama.cpp runtime cannot be loaded ({e})") from None
        _LIB = KvqLib(raw._lib)
    return _LIB
