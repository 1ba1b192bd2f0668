// Full tensor dumps of llama.cpp's graph, for op-by-op numerics comparison (measurement tool).
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static FILE * g_out = nullptr;

static float get_elem(const ggml_tensor * t, const uint8_t * data, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    size_t off = i0*t->nb[0] + i1*t->nb[1] + i2*t->nb[2] + i3*t->nb[3];
    switch (t->type) {
        case GGML_TYPE_F32: return *(const float *)(data + off);
        case GGML_TYPE_F16: return ggml_fp16_to_fp32(*(const ggml_fp16_t *)(data + off));
        case GGML_TYPE_I32: return (float)*(const int32_t *)(data + off);
        default: return NAN;
    }
}

static bool cb(struct ggml_tensor * t, bool ask, void *) {
    if (ask) return true;
    if (!g_out) return true;
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_I32) return true;
    const bool host = ggml_backend_buffer_is_host(t->buffer);
    std::vector<uint8_t> buf;
    const uint8_t * data;
    if (host) { data = (const uint8_t *)t->data; }
    else { buf.resize(ggml_nbytes(t)); ggml_backend_tensor_get(t, buf.data(), 0, buf.size()); data = buf.data(); }
    char name[64] = {0}; strncpy(name, t->name, 63);
    char opn[32] = {0}; strncpy(opn, ggml_op_desc(t), 31);
    fwrite(name, 1, 64, g_out); fwrite(opn, 1, 32, g_out);
    int32_t ty = t->type; fwrite(&ty, 4, 1, g_out);
    int64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]}; fwrite(ne, 8, 4, g_out);
    std::vector<float> v; v.reserve(ggml_nelements(t));
    for (int64_t i3 = 0; i3 < ne[3]; i3++) for (int64_t i2 = 0; i2 < ne[2]; i2++)
    for (int64_t i1 = 0; i1 < ne[1]; i1++) for (int64_t i0 = 0; i0 < ne[0]; i0++)
        v.push_back(get_elem(t, data, i0, i1, i2, i3));
    fwrite(v.data(), 4, v.size(), g_out);
    return true;
}

int main(int argc, char ** argv) {
    // usage: dump MODEL OUTPREFIX FA(0/1) ids... [-- then ids for single-token steps]
    if (argc < 5) { fprintf(stderr, "usage\n"); return 1; }
    const char * path = argv[1]; std::string prefix = argv[2]; int fa = atoi(argv[3]);
    std::vector<int> prompt, steps; bool after = false;
    for (int i = 4; i < argc; i++) { if (!strcmp(argv[i], "--")) { after = true; continue; } (after ? steps : prompt).push_back(atoi(argv[i])); }
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(path, mp);
    auto cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_threads = 2; cp.n_threads_batch = 2;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.cb_eval = cb; cp.cb_eval_user_data = nullptr; cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    const int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    auto run = [&](std::vector<int> ids, int step) {
        std::string fn = prefix + "_" + std::to_string(step) + ".bin";
        g_out = fopen(fn.c_str(), "wb");
        llama_batch b = llama_batch_init(ids.size(), 0, 1);
        static int pos = 0;
        for (size_t i = 0; i < ids.size(); i++) { b.token[i] = ids[i]; b.pos[i] = pos++; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1; }
        b.n_tokens = ids.size();
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); exit(1); }
        fclose(g_out); g_out = nullptr;
        int best = 0; const float * lg = llama_get_logits_ith(ctx, ids.size() - 1);
        for (int i = 1; i < nv; i++) if (lg[i] > lg[best]) best = i;
        std::string lf = prefix + "_" + std::to_string(step) + ".logits";
        FILE * f = fopen(lf.c_str(), "wb");
        for (size_t i = 0; i < ids.size(); i++) fwrite(llama_get_logits_ith(ctx, i), 4, nv, f);
        fclose(f);
        printf("step %d argmax %d\n", step, best);
        llama_batch_free(b);
        return best;
    };
    run(prompt, 0);
    for (size_t s = 0; s < steps.size(); s++) run({steps[s]}, s + 1);
    llama_free(ctx); llama_model_free(model);
    return 0;
}
