/* LD_PRELOAD shim for llama.cpp's tools: wait 0.3 s when the process exits, so that
 * llama.cpp's asynchronous logger thread (common/log.cpp, deliberately never joined) can
 * write its last lines (the final statistics of llama-perplexity) before the process ends.
 * Build: cc -shared -fPIC -O2 -o exit_delay.so bench/exit_delay.c */
#include <unistd.h>

__attribute__((destructor)) static void torchless_bench_exit_delay(void) { usleep(300000); }
