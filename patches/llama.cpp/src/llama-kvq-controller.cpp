// kvq: the controller MLP (kvq.controller.* metadata): parse, validate, evaluate.
#include "llama-kvq-impl.h"

#include "llama-impl.h"
#include "llama-model.h"

#include "gguf.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <initializer_list>

//
// kvq_feature_norm
//

void kvq_feature_norm::init(const llama_kvq_controller & c) {
    n = (double) c.norm_prior;
    mean.resize(c.n_in);
    m2.resize(c.n_in);
    for (int j = 0; j < c.n_in; ++j) {
        const double sd = c.std_[j];
        mean[j] = c.mean[j];
        m2[j] = n * sd * sd;
    }
}

// The same double operations in the same order as ControllerSpec.logits, so that C and NumPy
// normalise bit for bit where no multiply-add is fused (this file is built without -march: on
// x86-64 there is no FMA to fuse into).
void kvq_feature_norm::normalize(const llama_kvq_controller & c, const float * feat, float * z) {
    if (empty()) {
        init(c);
    }
    n += 1.0;
    for (int j = 0; j < c.n_in; ++j) {
        const double x = feat[c.feat_idx[j]];
        const double d = x - mean[j];
        mean[j] += d / n;
        m2[j] += d * (x - mean[j]);
        const double var = m2[j] / n;
        const double sd = var > 0.0 && std::isfinite(var) ? std::sqrt(var) : (double) c.std_[j];
        z[j] = (float) ((x - mean[j]) / sd);
    }
}

//
// llama_kvq_controller
//

int llama_kvq_controller::decide(const float * feat, float price, kvq_feature_norm * norm) const {
    float z[LLAMA_KVQ_N_FEATURES];
    if (norm_prior > 0) {
        GGML_ASSERT(norm != nullptr);
        norm->normalize(*this, feat, z);
    } else {
        for (int j = 0; j < n_in; ++j) {
            z[j] = (feat[feat_idx[j]] - mean[j]) / std_[j];
        }
    }
    std::vector<float> h(n_hidden);
    for (int i = 0; i < n_hidden; ++i) {
        float s = 0.0f;
        for (int j = 0; j < n_in; ++j) {
            s += z[j] * w1[i * n_in + j];
        }
        s += b1[i];
        h[i] = s > 0.0f ? s : 0.0f;
    }
    int best = 0;
    float best_v = -INFINITY;
    if (!damage_floor.empty()) {
        // ControllerSpec.logits with damage_floor: damage estimates, projected, then -d - bits
        std::vector<float> d(n_out);
        for (int o = 0; o < n_out; ++o) {
            float s = 0.0f;
            for (int i = 0; i < n_hidden; ++i) {
                s += h[i] * w2[o * n_hidden + i];
            }
            d[o] = log_damage ? expf(s + b2[o]) : -(s + b2[o] + KVQ_EFF_BITS_BY_BITS[bits[o]]);
        }
        d[n_out - 1] = d[n_out - 1] > 0.0f ? d[n_out - 1] : 0.0f;
        for (int o = n_out - 2; o >= 0; --o) {
            const float lo = damage_floor[o] * d[o + 1];
            d[o] = d[o] > lo ? d[o] : lo;
        }
        for (int o = 0; o < n_out; ++o) {
            const float eb = KVQ_EFF_BITS_BY_BITS[bits[o]];
            const float v = -d[o] - eb - price * eb;
            if (v > best_v) {
                best_v = v;
                best = o;
            }
        }
        return bits[best];
    }
    for (int o = 0; o < n_out; ++o) {
        float s = 0.0f;
        for (int i = 0; i < n_hidden; ++i) {
            s += h[i] * w2[o * n_hidden + i];
        }
        const float eb = KVQ_EFF_BITS_BY_BITS[bits[o]];
        if (log_damage) {
            s = -expf(s + b2[o]) - eb - price * eb;
        } else {
            s = s + (b2[o] - price * eb);
        }
        if (s > best_v) {
            best_v = s;
            best = o;
        }
    }
    return bits[best];
}

//
// parsing
//

static bool kvq_get_f32_arr(const gguf_context * meta, const char * key, std::vector<float> & out, std::string & err) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0) {
        err = std::string("missing ") + key;
        return false;
    }
    if (gguf_get_kv_type(meta, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, id) != GGUF_TYPE_FLOAT32) {
        err = std::string(key) + " must be an array of float32";
        return false;
    }
    const size_t n = gguf_get_arr_n(meta, id);
    const float * data = (const float *) gguf_get_arr_data(meta, id);
    out.assign(data, data + n);
    for (float x : out) {
        if (!std::isfinite(x)) {
            err = std::string(key) + " has non-finite values";
            return false;
        }
    }
    return true;
}

static bool kvq_get_u32(const gguf_context * meta, const char * key, uint32_t & out, std::string & err) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0) {
        err = std::string("missing ") + key;
        return false;
    }
    switch (gguf_get_kv_type(meta, id)) {
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(meta, id); return true;
        case GGUF_TYPE_INT32:
            if (gguf_get_val_i32(meta, id) < 0) {
                err = std::string(key) + " must be >= 0";
                return false;
            }
            out = (uint32_t) gguf_get_val_i32(meta, id);
            return true;
        default: err = std::string(key) + " must be an integer"; return false;
    }
}

// An optional string key naming one of `choices`: its index (0 when absent), or -1 with err set.
static int kvq_get_choice(const gguf_context * meta, const char * key, std::initializer_list<const char *> choices,
                          std::string & err) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0) return 0;
    const char * v = gguf_get_kv_type(meta, id) == GGUF_TYPE_STRING ? gguf_get_val_str(meta, id) : "";
    std::string names;
    int i = 0;
    for (const char * c : choices) {
        if (strcmp(v, c) == 0) return i;
        names += (i++ ? ", " : "") + std::string(c);
    }
    err = std::string(key) + " must be one of " + names + ", got \"" + v + "\"";
    return -1;
}

std::shared_ptr<llama_kvq_controller> kvq_parse_controller(const gguf_context * meta) {
    auto c = std::make_shared<llama_kvq_controller>();
    if (gguf_find_key(meta, LLAMA_KVQ_KEY_VERSION) < 0) {
        return c; // absent
    }
    c->present = true;
    std::string & err = c->error;
    uint32_t version = 0, hidden = 0;
    if (!kvq_get_u32(meta, LLAMA_KVQ_KEY_VERSION, version, err)) return c;
    if (version != LLAMA_KVQ_CONTROLLER_VERSION) {
        err = "unsupported controller version " + std::to_string(version);
        return c;
    }
    if (!kvq_get_u32(meta, LLAMA_KVQ_KEY_HIDDEN, hidden, err)) return c;
    // features: array of strings naming runtime features
    {
        const int64_t id = gguf_find_key(meta, LLAMA_KVQ_KEY_FEATURES);
        if (id < 0 || gguf_get_kv_type(meta, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, id) != GGUF_TYPE_STRING) {
            err = "kvq.controller.features must be an array of strings";
            return c;
        }
        const size_t n = gguf_get_arr_n(meta, id);
        for (size_t i = 0; i < n; ++i) {
            const char * name = gguf_get_arr_str(meta, id, i);
            int idx = -1;
            for (int f = 0; f < LLAMA_KVQ_N_FEATURES; ++f) {
                if (strcmp(name, KVQ_FEATURE_NAMES[f]) == 0) idx = f;
            }
            if (idx < 0) {
                err = std::string("unknown controller feature ") + name;
                return c;
            }
            c->feat_idx.push_back(idx);
        }
    }
    {
        const int64_t id = gguf_find_key(meta, LLAMA_KVQ_KEY_PRECISIONS);
        if (id < 0 || gguf_get_kv_type(meta, id) != GGUF_TYPE_ARRAY ||
            (gguf_get_arr_type(meta, id) != GGUF_TYPE_INT32 && gguf_get_arr_type(meta, id) != GGUF_TYPE_UINT32)) {
            err = "kvq.controller.precisions must be an array of integers";
            return c;
        }
        const size_t n = gguf_get_arr_n(meta, id);
        const int32_t * data = (const int32_t *) gguf_get_arr_data(meta, id);
        for (size_t i = 0; i < n; ++i) {
            if (kvq_pool_of_bits(data[i]) < 0) {
                err = "controller precision " + std::to_string(data[i]) + " is not one of 0, 2, 3, 4, 8, 16";
                return c;
            }
            c->bits.push_back(data[i]);
        }
    }
    if (!kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_W1, c->w1, err)) return c;
    if (!kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_B1, c->b1, err)) return c;
    if (!kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_W2, c->w2, err)) return c;
    if (!kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_B2, c->b2, err)) return c;
    if (!kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_FEAT_MEAN, c->mean, err)) return c;
    if (!kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_FEAT_STD, c->std_, err)) return c;
    if (gguf_find_key(meta, LLAMA_KVQ_KEY_K_CENTER) >= 0 && !kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_K_CENTER, c->k_center, err)) return c;
    if (gguf_find_key(meta, LLAMA_KVQ_KEY_DAMAGE_FLOOR) >= 0 && !kvq_get_f32_arr(meta, LLAMA_KVQ_KEY_DAMAGE_FLOOR, c->damage_floor, err)) return c;
    if (gguf_find_key(meta, LLAMA_KVQ_KEY_NORM_PRIOR) >= 0 && !kvq_get_u32(meta, LLAMA_KVQ_KEY_NORM_PRIOR, c->norm_prior, err)) return c;
    const int head = kvq_get_choice(meta, LLAMA_KVQ_KEY_HEAD, { "logits", "log_damage" }, err);
    const int granularity = head < 0 ? -1 : kvq_get_choice(meta, LLAMA_KVQ_KEY_GRANULARITY, { "token", "token_layer" }, err);
    if (granularity < 0) return c;
    c->log_damage = head == 1;
    c->per_layer = granularity == 1;
    c->n_in = (int) c->feat_idx.size();
    c->n_hidden = (int) hidden;
    c->n_out = (int) c->bits.size();
    const size_t ni = c->n_in, nh = c->n_hidden, no = c->n_out;
    if (ni == 0 || nh == 0 || no < 2 || ni > LLAMA_KVQ_N_FEATURES) {
        err = "controller needs >= 1 feature, >= 1 hidden unit and >= 2 precisions";
    } else if (c->w1.size() != nh * ni) {
        err = "kvq.controller.w1 has " + std::to_string(c->w1.size()) + " values, expected " + std::to_string(nh) + "x" + std::to_string(ni);
    } else if (c->b1.size() != nh) {
        err = "kvq.controller.b1 has " + std::to_string(c->b1.size()) + " values, expected " + std::to_string(nh);
    } else if (c->w2.size() != no * nh) {
        err = "kvq.controller.w2 has " + std::to_string(c->w2.size()) + " values, expected " + std::to_string(no) + "x" + std::to_string(nh);
    } else if (c->b2.size() != no) {
        err = "kvq.controller.b2 has " + std::to_string(c->b2.size()) + " values, expected " + std::to_string(no);
    } else if (c->mean.size() != ni || c->std_.size() != ni) {
        err = "kvq.controller.feature_mean/feature_std must have one value per feature";
    } else {
        for (float s : c->std_) {
            if (!(s > 0.0f)) {
                err = "kvq.controller.feature_std must be > 0";
            }
        }
        if (!c->damage_floor.empty()) {
            bool ascending = true;
            for (size_t o = 1; o < no; ++o) ascending = ascending && c->bits[o] > c->bits[o - 1];
            if (c->damage_floor.size() != no - 1) {
                err = "kvq.controller.damage_floor has " + std::to_string(c->damage_floor.size()) + " values, expected " + std::to_string(no - 1);
            } else if (!ascending) {
                err = "kvq.controller.damage_floor needs the precisions in ascending order";
            }
            for (float f : c->damage_floor) {
                if (!(f >= 0.0f)) {
                    err = "kvq.controller.damage_floor must be >= 0";
                }
            }
        }
    }
    const int64_t bid = gguf_find_key(meta, LLAMA_KVQ_KEY_BUDGET_BITS);
    if (bid >= 0 && gguf_get_kv_type(meta, bid) == GGUF_TYPE_FLOAT32) {
        c->budget_bits = gguf_get_val_f32(meta, bid);
    }
    return c;
}

std::shared_ptr<llama_kvq_controller> kvq_read_controller_file(const char * path) {
    const std::string where = std::string("controller file ") + path;
    if (std::FILE * f = std::fopen(path, "rb")) {
        std::fclose(f);
    } else {
        kvq_fail(where + ": cannot open it (" + std::strerror(errno) + ")");
        return nullptr;
    }
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gguf_context * meta = nullptr;
    try {
        meta = gguf_init_from_file(path, params);
    } catch (const std::exception & e) { // gguf reports bad files by returning null; allocation may throw
        kvq_fail(where + ": " + e.what());
        return nullptr;
    }
    if (!meta) {
        kvq_fail(where + ": not a valid GGUF file");
        return nullptr;
    }
    std::shared_ptr<llama_kvq_controller> c = kvq_parse_controller(meta);
    gguf_free(meta);
    if (!c->present) {
        kvq_fail(where + ": no kvq.controller.* metadata (" LLAMA_KVQ_KEY_VERSION " missing)");
        return nullptr;
    }
    if (!c->error.empty()) {
        kvq_fail(where + ": malformed kvq controller: " + c->error);
        return nullptr;
    }
    return c;
}

bool kvq_controller_fits(const llama_kvq_controller & c, const std::string & origin, int n_layer, int n_embd_kv) {
    if (!c.k_center.empty() && c.k_center.size() != (size_t) n_layer * n_embd_kv) {
        kvq_fail(origin + ": kvq.controller.k_center has " + std::to_string(c.k_center.size()) +
                 " values, expected n_layer x n_embd_kv = " + std::to_string((int64_t) n_layer * n_embd_kv));
        return false;
    }
    return true;
}

//
// model hook and C API
//

void llama_kvq_load_controller(llama_model & model, const gguf_context * meta) {
    model.kvq_controller = kvq_parse_controller(meta);
    if (!model.kvq_controller->error.empty()) {
        LLAMA_LOG_WARN("%s: ignoring malformed kvq controller: %s\n", __func__, model.kvq_controller->error.c_str());
    }
}

int32_t llama_kvq_model_controller(const llama_model * model) {
    if (!model) return kvq_fail("null model");
    const auto & c = model->kvq_controller;
    if (!c || !c->present) return 0;
    if (!c->error.empty()) return kvq_fail("malformed kvq controller metadata: " + c->error);
    return 1;
}

int32_t llama_kvq_controller_eval(const llama_model * model, const float * x, int64_t n, int32_t * bits) {
    if (llama_kvq_model_controller(model) != 1) {
        if (model && model->kvq_controller && model->kvq_controller->present) return -1;
        return model ? kvq_fail("the model has no kvq controller") : -1;
    }
    if (n < 0 || (n > 0 && (!x || !bits))) return kvq_fail("controller_eval needs n >= 0 and x, bits for n rows");
    const auto & c = *model->kvq_controller;
    kvq_feature_norm norm; // norm_prior > 0: the rows as a fresh context's decisions, in order
    for (int64_t i = 0; i < n; ++i) {
        bits[i] = c.decide(x + i * LLAMA_KVQ_N_FEATURES, 0.0f, &norm);
    }
    return 0;
}
