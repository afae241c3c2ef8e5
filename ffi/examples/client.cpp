// A C++ client of the attnrt C ABI, built against the INSTALLED header and static library:
//
//   client FIXTURE.safetensors [NUM_THREADS]
//
// reads a golden fixture (weights, a packed varlen batch described by cu_seqlens + max_seqlen,
// the expected output y), builds the layer, runs the batch on the best backend (AUTO) and on
// the host's own thread pool (a std::thread parallel-for passed as a callback), checks both
// against y at 1e-4, and shows two error paths (a forced backend that is not built, a bad
// cu_seqlens) that leave the output untouched.
//
// Build (see ffi/examples/CMakeLists.txt and ffi/README.md):
//   cmake -S ffi/examples -B build -DCMAKE_PREFIX_PATH=<prefix> && cmake --build build
// or: g++ -std=c++17 client.cpp $(pkg-config --cflags attnrt) <prefix>/lib/libattnrt_ffi.a -lpthread -ldl -lm
//
// Exit status: 0 on success, 1 on any unexpected status or mismatch, 2 on a bad fixture.

#include <attnrt.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// A minimal JSON reader: enough for a safetensors header (objects, arrays, strings with
// escapes, numbers, true/false/null). Throws std::runtime_error on malformed input.

struct Json {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool b = false;
    double num = 0.0;
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;

    const Json* get(const std::string& key) const {
        if (kind != Object) return nullptr;
        for (const auto& kv : obj) {
            if (kv.first == key) return &kv.second;
        }
        return nullptr;
    }
};

class JsonParser {
  public:
    explicit JsonParser(const std::string& s) : s_(s) {}

    Json parse() {
        Json v = value(0);
        skip_ws();
        if (i_ != s_.size()) fail("trailing characters");
        return v;
    }

  private:
    const std::string& s_;
    size_t i_ = 0;

    [[noreturn]] void fail(const char* what) const {
        throw std::runtime_error(std::string("JSON: ") + what + " at byte " + std::to_string(i_));
    }
    void skip_ws() {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
    }
    char peek() {
        skip_ws();
        if (i_ >= s_.size()) fail("unexpected end");
        return s_[i_];
    }
    void expect(char c) {
        if (peek() != c) fail("unexpected character");
        ++i_;
    }
    bool literal(const char* word) {
        size_t n = std::strlen(word);
        if (s_.compare(i_, n, word) == 0) {
            i_ += n;
            return true;
        }
        return false;
    }

    Json value(int depth) {
        if (depth > 32) fail("nested too deep");
        Json v;
        char c = peek();
        if (c == '{') {
            ++i_;
            v.kind = Json::Object;
            if (peek() == '}') {
                ++i_;
                return v;
            }
            for (;;) {
                std::string key = string();
                expect(':');
                v.obj.emplace_back(std::move(key), value(depth + 1));
                if (peek() == ',') {
                    ++i_;
                    continue;
                }
                expect('}');
                return v;
            }
        }
        if (c == '[') {
            ++i_;
            v.kind = Json::Array;
            if (peek() == ']') {
                ++i_;
                return v;
            }
            for (;;) {
                v.arr.push_back(value(depth + 1));
                if (peek() == ',') {
                    ++i_;
                    continue;
                }
                expect(']');
                return v;
            }
        }
        if (c == '"') {
            v.kind = Json::String;
            v.str = string();
            return v;
        }
        if (literal("true")) {
            v.kind = Json::Bool;
            v.b = true;
            return v;
        }
        if (literal("false")) {
            v.kind = Json::Bool;
            return v;
        }
        if (literal("null")) return v;
        size_t start = i_;
        while (i_ < s_.size() && std::strchr("+-0123456789.eE", s_[i_]) != nullptr) ++i_;
        if (start == i_) fail("unexpected character");
        v.kind = Json::Number;
        v.num = std::strtod(s_.substr(start, i_ - start).c_str(), nullptr);
        return v;
    }

    std::string string() {
        expect('"');
        std::string out;
        while (i_ < s_.size() && s_[i_] != '"') {
            char c = s_[i_++];
            if (c != '\\') {
                out += c;
                continue;
            }
            if (i_ >= s_.size()) fail("unterminated escape");
            char e = s_[i_++];
            switch (e) {
                case 'n': out += '\n'; break;
                case 't': out += '\t'; break;
                case 'r': out += '\r'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'u': {
                    // Headers are ASCII; keep other code points as '?'.
                    if (i_ + 4 > s_.size()) fail("short \\u escape");
                    unsigned long cp = std::strtoul(s_.substr(i_, 4).c_str(), nullptr, 16);
                    out += cp < 0x80 ? static_cast<char>(cp) : '?';
                    i_ += 4;
                    break;
                }
                default: out += e;  // \" \\ \/
            }
        }
        if (i_ >= s_.size()) fail("unterminated string");
        ++i_;
        return out;
    }
};

// ---------------------------------------------------------------------------------------------
// A safetensors file: an 8-byte little-endian header length N, N bytes of JSON
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the
// data. Tensors are copied out into aligned vectors (the data region is not aligned for us).

struct Tensor {
    std::string dtype;
    std::vector<size_t> shape;
    std::vector<uint8_t> bytes;

    size_t elems() const {
        size_t n = 1;
        for (size_t d : shape) n *= d;
        return n;
    }
    template <typename T>
    std::vector<T> as(const char* want) const {
        if (dtype != want) throw std::runtime_error("tensor has dtype " + dtype + ", want " + want);
        std::vector<T> v(bytes.size() / sizeof(T));
        if (!v.empty()) std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
        return v;
    }
};

struct SafeTensors {
    std::map<std::string, Tensor> tensors;
    std::map<std::string, std::string> metadata;

    const Tensor* get(const std::string& name) const {
        auto it = tensors.find(name);
        return it == tensors.end() ? nullptr : &it->second;
    }
};

size_t dtype_size(const std::string& dt) {
    if (dt == "F32" || dt == "I32") return 4;
    if (dt == "F16" || dt == "BF16") return 2;
    throw std::runtime_error("unsupported dtype " + dt);
}

SafeTensors load_safetensors(const char* path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(std::string("cannot open ") + path);
    std::vector<uint8_t> file((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (file.size() < 8) throw std::runtime_error("file shorter than its header length");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | file[static_cast<size_t>(i)];
    if (n > file.size() - 8) throw std::runtime_error("header length past the end of the file");
    std::string header(reinterpret_cast<const char*>(file.data()) + 8, static_cast<size_t>(n));
    Json h = JsonParser(header).parse();
    if (h.kind != Json::Object) throw std::runtime_error("header is not an object");
    const size_t data_start = 8 + static_cast<size_t>(n);
    const size_t data_len = file.size() - data_start;
    SafeTensors st;
    for (const auto& kv : h.obj) {
        const Json& v = kv.second;
        if (kv.first == "__metadata__") {
            for (const auto& m : v.obj) {
                if (m.second.kind == Json::String) st.metadata[m.first] = m.second.str;
            }
            continue;
        }
        const Json* dt = v.get("dtype");
        const Json* shape = v.get("shape");
        const Json* off = v.get("data_offsets");
        if (!dt || dt->kind != Json::String || !shape || shape->kind != Json::Array || !off ||
            off->kind != Json::Array || off->arr.size() != 2) {
            throw std::runtime_error("malformed entry " + kv.first);
        }
        Tensor t;
        t.dtype = dt->str;
        for (const Json& d : shape->arr) {
            if (d.kind != Json::Number || d.num < 0 || d.num > 1e12) throw std::runtime_error("bad shape");
            t.shape.push_back(static_cast<size_t>(d.num));
        }
        double b = off->arr[0].num, e = off->arr[1].num;
        if (!(b >= 0 && e >= b && e <= static_cast<double>(data_len))) {
            throw std::runtime_error("data_offsets of " + kv.first + " outside the data");
        }
        size_t begin = static_cast<size_t>(b), end = static_cast<size_t>(e);
        if (end - begin != t.elems() * dtype_size(t.dtype)) {
            throw std::runtime_error("data size of " + kv.first + " does not match its shape");
        }
        t.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(data_start + begin),
                       file.begin() + static_cast<std::ptrdiff_t>(data_start + end));
        st.tensors.emplace(kv.first, std::move(t));
    }
    return st;
}

// ---------------------------------------------------------------------------------------------
// The ABI side.

std::string last_error() {
    char buf[512];
    size_t written = 0;
    attnrt_error_message(buf, sizeof buf, &written);
    return std::string(buf, written);
}

bool check(attnrt_status st, const char* what) {
    if (st != ATTNRT_STATUS_OK) {
        const char* name = attnrt_status_name(st);
        std::fprintf(stderr, "%s failed: %s (%u): %s\n", what, name ? name : "?",
                     static_cast<unsigned>(st), last_error().c_str());
        return false;
    }
    return true;
}

// The fixture's configuration (metadata "config", itself JSON) as an attnrt_config.
attnrt_config config_of(const SafeTensors& st) {
    auto it = st.metadata.find("config");
    if (it == st.metadata.end()) throw std::runtime_error("no config in the metadata");
    Json c = JsonParser(it->second).parse();
    auto num = [&](const char* k) -> size_t {
        const Json* v = c.get(k);
        if (!v || v->kind != Json::Number) throw std::runtime_error(std::string("config lacks ") + k);
        return static_cast<size_t>(v->num);
    };
    attnrt_config cfg;
    if (!check(attnrt_config_default(num("n_embd"), num("n_head"), &cfg), "attnrt_config_default")) {
        throw std::runtime_error("invalid config");
    }
    cfg.n_kv_head = num("n_kv_head");
    cfg.head_dim = num("head_dim");
    if (const Json* bias = c.get("bias")) {
        auto flag = [&](const char* k) -> uint8_t {
            const Json* v = bias->get(k);
            return v && v->kind == Json::Bool && v->b ? 1 : 0;
        };
        cfg.bias_q = flag("q");
        cfg.bias_k = flag("k");
        cfg.bias_v = flag("v");
        cfg.bias_o = flag("o");
    }
    if (const Json* q = c.get("qk_norm")) {
        if (q->str == "per_head") cfg.qk_norm = ATTNRT_QK_NORM_PER_HEAD;
        else if (q->str == "full") cfg.qk_norm = ATTNRT_QK_NORM_FULL;
        else if (q->str == "none") cfg.qk_norm = ATTNRT_QK_NORM_NONE;
        else throw std::runtime_error("unknown qk_norm " + q->str);
    }
    if (const Json* eps = c.get("rmsnorm_eps"); eps && eps->kind == Json::Number) {
        cfg.rmsnorm_eps = static_cast<float>(eps->num);
    }
    const Json* win = c.get("sliding_window");
    cfg.sliding_window = win && win->kind == Json::Number ? static_cast<int64_t>(win->num) : -1;
    const Json* rope = c.get("rope");
    cfg.rope = rope && rope->kind == Json::Object ? 1 : 0;
    if (cfg.rope) {
        const Json* conv = rope->get("convention");
        cfg.rope_convention = conv && conv->str == "half_split" ? ATTNRT_ROPE_CONVENTION_HALF_SPLIT
                                                                : ATTNRT_ROPE_CONVENTION_INTERLEAVED;
        if (const Json* theta = rope->get("theta")) cfg.rope_theta = theta->num;
        const Json* scaling = rope->get("scaling");
        if (scaling && scaling->kind != Json::Null) {
            // This example maps no scaling parameters; the ABI has them (rope_scaling, ...).
            throw std::runtime_error("this client does not map rope scaling; use another fixture");
        }
    }
    return cfg;
}

// A host thread pool in the shape of attnrt_parallel_for_fn: `workers` std::threads take task
// indices from a shared counter; returns when every task has returned.
struct HostPool {
    unsigned workers;
    std::atomic<size_t> calls{0};
    std::atomic<size_t> tasks{0};
};

// Must not throw: it is called from the library (a thread that cannot start only means fewer
// workers; the calling thread always works).
void host_parallel_for(void* ctx, size_t n, attnrt_task_fn task, void* task_ctx) noexcept {
    HostPool* pool = static_cast<HostPool*>(ctx);
    pool->calls.fetch_add(1);
    std::atomic<size_t> next{0};
    auto work = [&]() {
        for (size_t i; (i = next.fetch_add(1)) < n;) {
            task(task_ctx, i);
            pool->tasks.fetch_add(1);
        }
    };
    std::vector<std::thread> threads;
    try {
        for (unsigned w = 1; w < pool->workers && w < n; ++w) threads.emplace_back(work);
    } catch (...) {
    }
    work();  // the calling thread is a worker too
    for (auto& t : threads) t.join();
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double m = a.size() == b.size() ? 0.0 : INFINITY;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
        m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
    }
    return m;
}

// Owns a layer handle.
struct Layer {
    attnrt_layer* p = nullptr;
    ~Layer() { attnrt_layer_free(p); }
};

int run(const char* path, size_t num_threads) {
    SafeTensors st = load_safetensors(path);
    attnrt_config cfg = config_of(st);

    // Weights: the layer copies them, so the vectors may go away after attnrt_layer_new.
    Layer layer;
    {
        std::map<std::string, std::vector<float>> f32;
        std::map<std::string, std::vector<uint16_t>> f16;
        auto view = [&](const char* name) {
            attnrt_tensor t{nullptr, 0, ATTNRT_DTYPE_F32};
            const Tensor* src = st.get(name);
            if (!src) return t;
            if (src->dtype == "F32") {
                auto& v = f32[name] = src->as<float>("F32");
                t.data = v.data();
                t.len = v.size();
            } else {
                auto& v = f16[name] = src->as<uint16_t>(src->dtype.c_str());
                t.data = v.data();
                t.len = v.size();
                t.dtype = src->dtype == "F16" ? ATTNRT_DTYPE_F16 : ATTNRT_DTYPE_BF16;
            }
            return t;
        };
        attnrt_weights w;
        w.wq = view("wq");
        w.wk = view("wk");
        w.wv = view("wv");
        w.wo = view("wo");
        w.bq = view("bq");
        w.bk = view("bk");
        w.bv = view("bv");
        w.bo = view("bo");
        w.q_norm = view("q_norm");
        w.k_norm = view("k_norm");
        if (!check(attnrt_layer_new(&cfg, &w, &layer.p), "attnrt_layer_new")) return 1;
    }

    const Tensor* xt = st.get("x");
    const Tensor* yt = st.get("y");
    if (!xt || !yt || xt->shape.size() != 3) throw std::runtime_error("fixture lacks x [B, T, C] or y");
    const size_t batch = xt->shape[0], seq_len = xt->shape[1];
    std::vector<float> x = xt->as<float>("F32"), expected = yt->as<float>("F32");
    std::map<std::string, std::vector<int32_t>> ints;
    for (const char* name : {"seq_lens", "document_ids", "cu_seqlens", "max_seqlen", "position_ids"}) {
        if (const Tensor* t = st.get(name)) ints[name] = t->as<int32_t>("I32");
    }
    std::vector<float> freqs;
    if (const Tensor* t = st.get("freqs_cis")) freqs = t->as<float>("F32");

    size_t ws_len = 0;
    if (!check(attnrt_workspace_size(layer.p, batch, seq_len, num_threads, &ws_len), "attnrt_workspace_size")) {
        return 1;
    }
    std::vector<float> workspace(ws_len), out(x.size(), 0.0f);

    attnrt_forward_args args;
    attnrt_forward_args_init(&args);
    args.x = x.data();
    args.x_len = x.size();
    args.batch = batch;
    args.seq_len = seq_len;
    auto opt = [&](const char* name, const int32_t** p, size_t* len) {
        auto it = ints.find(name);
        if (it != ints.end()) {
            *p = it->second.data();
            *len = it->second.size();
        }
    };
    opt("seq_lens", &args.seq_lens, &args.seq_lens_len);
    opt("document_ids", &args.document_ids, &args.document_ids_len);
    opt("cu_seqlens", &args.cu_seqlens, &args.cu_seqlens_len);
    opt("position_ids", &args.position_ids, &args.position_ids_len);
    if (ints.count("max_seqlen")) args.max_seqlen = ints["max_seqlen"].at(0);
    if (!freqs.empty()) {
        args.freqs_cis = freqs.data();
        args.freqs_cis_len = freqs.size();
    }
    args.workspace = workspace.data();
    args.workspace_len = workspace.size();
    args.out = out.data();
    args.out_len = out.size();
    args.backend = ATTNRT_BACKEND_AUTO;
    args.num_threads = num_threads;  // scoped threads inside the library, sized above

    attnrt_simd_tier tier = ATTNRT_SIMD_TIER_SCALAR;
    check(attnrt_cpu_tier(&tier), "attnrt_cpu_tier");
    const char* tier_name = attnrt_simd_tier_name(tier);
    std::printf("attnrt %s, cpu tier %s\n", attnrt_version(), tier_name ? tier_name : "?");
    std::printf("fixture %s: batch %zu, seq_len %zu, %zu cu_seqlens, num_threads %zu\n", path,
                batch, seq_len, ints.count("cu_seqlens") ? ints["cu_seqlens"].size() : size_t{0},
                num_threads);

    int rc = 0;
    attnrt_backend ran = ATTNRT_BACKEND_AUTO;
    if (!check(attnrt_forward(layer.p, &args, &ran), "attnrt_forward")) return 1;
    double err = max_abs_diff(out, expected);
    std::printf("backend %u\n", static_cast<unsigned>(ran));
    std::printf("max abs err vs fixture %.3g\n", err);
    if (!(err <= 1e-4)) rc = 1;

    // The same call on the host's own pool (the callback); bitwise the same output.
    HostPool pool{static_cast<unsigned>(std::max<size_t>(num_threads, 1))};
    std::vector<float> out2(out.size(), 0.0f);
    attnrt_forward_args cb = args;
    cb.out = out2.data();
    cb.parallel_for = host_parallel_for;
    cb.parallel_ctx = &pool;
    if (!check(attnrt_forward(layer.p, &cb, &ran), "attnrt_forward (host pool)")) return 1;
    bool same = std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)) == 0;
    std::printf("host pool: %zu parallel_for calls, %zu tasks, %s\n", pool.calls.load(),
                pool.tasks.load(), same ? "bitwise identical" : "DIFFERENT");
    if (!same || pool.calls.load() == 0) rc = 1;

    // A forced backend that this build lacks fails with a status; nothing falls back, and the
    // output stays as it was.
    std::vector<float> before = out;
    args.backend = ATTNRT_BACKEND_CUDA;
    attnrt_status s = attnrt_forward(layer.p, &args, &ran);
    std::printf("forced CUDA: %s: %s\n", attnrt_status_name(s), last_error().c_str());
    if (s != ATTNRT_STATUS_BACKEND_UNAVAILABLE || before != out) rc = 1;

    // An invalid call: a cu_seqlens that does not end at T.
    if (ints.count("cu_seqlens")) {
        std::vector<int32_t> bad = ints["cu_seqlens"];
        bad.back() -= 1;
        args.backend = ATTNRT_BACKEND_AUTO;
        args.cu_seqlens = bad.data();
        s = attnrt_forward(layer.p, &args, &ran);
        std::printf("bad cu_seqlens: %s: %s\n", attnrt_status_name(s), last_error().c_str());
        if (s != ATTNRT_STATUS_INPUT_VALUE || before != out) rc = 1;
    }
    std::printf("%s\n", rc == 0 ? "OK" : "FAILED");
    return rc;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s FIXTURE.safetensors [NUM_THREADS]\n", argv[0]);
        return 2;
    }
    size_t threads = argc > 2 ? static_cast<size_t>(std::strtoul(argv[2], nullptr, 10)) : 2;
    try {
        return run(argv[1], threads);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    }
}
