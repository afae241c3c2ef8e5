// A C++ client of the attnrt C ABI: builds a small GQA + RoPE layer, runs a packed varlen batch
// (three documents in one row, described by cu_seqlens), prints the backend that ran and a
// checksum of the output, and shows the error path (a forced backend that is not built).
//
// Build against the installed header and static library, for example:
//   g++ -std=c++17 client.cpp $(pkg-config --cflags --libs attnrt) -o client
// or with CMake: find_package(attnrt REQUIRED) and target_link_libraries(app attnrt::attnrt).
//
// Exit status: 0 on success, 1 on any unexpected status.

#include <attnrt.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace {

// The deterministic weights the Rust test of this client uses too: value i of tensor k.
std::vector<float> fill(size_t n, unsigned k) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) {
        v[i] = static_cast<float>((i * 37 + k * 11) % 101) / 101.0f - 0.5f;
    }
    return v;
}

attnrt_tensor view(const std::vector<float>& v) {
    attnrt_tensor t;
    t.data = v.data();
    t.len = v.size();
    t.dtype = ATTNRT_DTYPE_F32;
    return t;
}

attnrt_tensor none() {
    attnrt_tensor t;
    t.data = nullptr;
    t.len = 0;
    t.dtype = ATTNRT_DTYPE_F32;
    return t;
}

std::string last_error() {
    char buf[512];
    size_t written = 0;
    attnrt_error_message(buf, sizeof buf, &written);
    return std::string(buf, written);
}

bool check(attnrt_status st, const char* what) {
    if (st != ATTNRT_STATUS_OK) {
        std::fprintf(stderr, "%s failed: %s (%u): %s\n", what, attnrt_status_name(st),
                     static_cast<unsigned>(st), last_error().c_str());
        return false;
    }
    return true;
}

}  // namespace

int main() {
    const size_t n_embd = 32, n_head = 4, n_kv_head = 2, head_dim = 8;
    const size_t batch = 1, seq_len = 12;
    const size_t num_threads = 2;  // tasks run at once; sizes the workspace too

    attnrt_config cfg;
    if (!check(attnrt_config_default(n_embd, n_head, &cfg), "attnrt_config_default")) return 1;
    cfg.n_kv_head = n_kv_head;
    cfg.head_dim = head_dim;
    cfg.rope = 1;
    cfg.rope_convention = ATTNRT_ROPE_CONVENTION_HALF_SPLIT;
    cfg.rope_theta = 10000.0;
    cfg.sliding_window = 6;

    const size_t q = n_head * head_dim, kv = n_kv_head * head_dim;
    attnrt_layer* layer = nullptr;
    {
        // The layer copies the weights: these vectors may go away right after attnrt_layer_new.
        std::vector<float> wq = fill(q * n_embd, 1), wk = fill(kv * n_embd, 2),
                           wv = fill(kv * n_embd, 3), wo = fill(n_embd * q, 4);
        attnrt_weights w;
        w.wq = view(wq);
        w.wk = view(wk);
        w.wv = view(wv);
        w.wo = view(wo);
        w.bq = w.bk = w.bv = w.bo = w.q_norm = w.k_norm = none();
        if (!check(attnrt_layer_new(&cfg, &w, &layer), "attnrt_layer_new")) return 1;
    }

    size_t ws_len = 0;
    if (!check(attnrt_workspace_size(layer, batch, seq_len, num_threads, &ws_len), "attnrt_workspace_size")) {
        attnrt_layer_free(layer);
        return 1;
    }
    std::vector<float> x = fill(batch * seq_len * n_embd, 5);
    std::vector<float> workspace(ws_len), out(batch * seq_len * n_embd, 0.0f);
    const int32_t cu_seqlens[] = {0, 5, 9, 12};  // three packed documents

    attnrt_forward_args args;
    attnrt_forward_args_init(&args);
    args.x = x.data();
    args.x_len = x.size();
    args.batch = batch;
    args.seq_len = seq_len;
    args.cu_seqlens = cu_seqlens;
    args.cu_seqlens_len = 4;
    args.max_seqlen = 5;
    args.workspace = workspace.data();
    args.workspace_len = workspace.size();
    args.out = out.data();
    args.out_len = out.size();
    args.backend = ATTNRT_BACKEND_AUTO;
    args.num_threads = num_threads;

    attnrt_backend ran = ATTNRT_BACKEND_AUTO;
    int rc = 0;
    if (check(attnrt_forward(layer, &args, &ran), "attnrt_forward")) {
        double sum = 0.0, abs_sum = 0.0;
        for (float v : out) {
            sum += v;
            abs_sum += std::fabs(v);
        }
        std::printf("attnrt %s\n", attnrt_version());
        std::printf("backend %u\n", static_cast<unsigned>(ran));
        std::printf("checksum %.9g %.9g\n", sum, abs_sum);
    } else {
        rc = 1;
    }

    // A forced backend that this build lacks fails with a status; nothing falls back, and the
    // output stays as it was.
    std::vector<float> before = out;
    args.backend = ATTNRT_BACKEND_CUDA;
    attnrt_status st = attnrt_forward(layer, &args, &ran);
    std::printf("forced CUDA: %s: %s\n", attnrt_status_name(st), last_error().c_str());
    if (st != ATTNRT_STATUS_BACKEND_UNAVAILABLE || before != out) rc = 1;

    // An invalid call: a cu_seqlens that does not end at T.
    const int32_t bad_cu[] = {0, 5, 9, 11};
    args.backend = ATTNRT_BACKEND_AUTO;
    args.cu_seqlens = bad_cu;
    st = attnrt_forward(layer, &args, &ran);
    std::printf("bad cu_seqlens: %s: %s\n", attnrt_status_name(st), last_error().c_str());
    if (st != ATTNRT_STATUS_INPUT_VALUE || before != out) rc = 1;

    attnrt_layer_free(layer);
    return rc;
}
