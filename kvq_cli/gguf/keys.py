"""GGUF metadata keys written and read by kvq (one place; the C side mirrors these names).

Namespaced like gguf-py's `Keys`: everything kvq adds lives under `kvq.`; standard llama
keys are built from the architecture name.
"""
from __future__ import annotations


class Controller:
    """`kvq.controller.*`: the per-token precision MLP that travels inside the GGUF."""

    VERSION = "kvq.controller.version"          # uint32, format version of these keys
    FEATURES = "kvq.controller.features"        # array[string], feature names in input order
    PRECISIONS = "kvq.controller.precisions"    # array[uint32], output classes in bits (2,4,8,16)
    HIDDEN = "kvq.controller.hidden"            # uint32, hidden width
    W1 = "kvq.controller.w1"                    # array[f32], [hidden, n_features] row-major
    B1 = "kvq.controller.b1"                    # array[f32], [hidden]
    W2 = "kvq.controller.w2"                    # array[f32], [n_precisions, hidden] row-major
    B2 = "kvq.controller.b2"                    # array[f32], [n_precisions]
    FEATURE_MEAN = "kvq.controller.feature_mean"  # array[f32], [n_features]
    FEATURE_STD = "kvq.controller.feature_std"    # array[f32], [n_features]
    BUDGET_BITS = "kvq.controller.budget_bits"    # f32, effective bits it was trained for
    GRANULARITY = "kvq.controller.granularity"    # string, "token" (one decision for all layers) or "token_layer"
    HEAD = "kvq.controller.head"                  # string, optional: "logits" (default) or "log_damage" (ControllerSpec.logits)
    K_CENTER = "kvq.controller.k_center"          # array[f32], optional, [n_layer, n_embd_kv] row-major: mean post-RoPE
                                                  # K per layer on the calibration text, subtracted from K before storing
    DAMAGE_FLOOR = "kvq.controller.damage_floor"  # array[f32], optional, [n_precisions - 1]: damage projection (ControllerSpec.logits)
    NORM_PRIOR = "kvq.controller.norm_prior"      # uint32, optional: n0 > 0 normalises the features by running statistics
                                                  # of the model it runs on, started from n0 rows at feature_mean/std


KVQ_PREFIX = "kvq."


class Llm:
    """Standard llama.cpp keys, formatted with the architecture name (e.g. 'llama')."""

    ARCHITECTURE = "general.architecture"
    NAME = "general.name"
    FILE_TYPE = "general.file_type"
    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    VOCAB_SIZE = "{arch}.vocab_size"
    CHAT_TEMPLATE = "tokenizer.chat_template"
