// Smooth weighted round-robin (nginx's upstream algorithm) in C, for harbor:strategy@0.1.0.
//
// Each pick, every healthy backend's running score grows by its weight; the highest score
// wins and gives back the sum of the weights. Over any window a backend of weight w gets
// w/total of the picks, spread out evenly rather than in bursts. The scores live in this
// instance's memory (one instance per Harbor worker thread), so the spread is exact per
// worker.
//
// Built by build.sh with Debian's clang and wasi-libc and wit-bindgen's C generator:
// - without HARBOR_WASI: no libc I/O, so the component imports nothing (the cheap path);
// - with -DHARBOR_WASI: a line on stderr at init, through wasi-libc and the preview1 adapter,
//   so the component imports WASI 0.2 and runs in Harbor's sandbox (stderr -> strategy log).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef HARBOR_WASI
#include <stdio.h>
#endif

#include "strategy.h"

#define STATE_HEALTHY 0
#define STATS_PER_BACKEND 4

static uint32_t *weights;  // from set-backends, by index
static int64_t *scores;    // running scores, by index
static size_t backend_count;

bool exports_strategy_init(strategy_string_t *config, strategy_strategy_info_t *ret, strategy_string_t *err) {
    (void)err;
#ifdef HARBOR_WASI
    fprintf(stderr, "c-swrr: starting, config of %zu bytes\n", config->len);
#endif
    strategy_string_free(config);
    // A static name: the result has no post-return, so nothing is freed after it.
    strategy_string_set(&ret->name, "c-swrr");
    ret->wants_reports = false;
    return true;
}

void exports_strategy_set_backends(uint64_t generation, strategy_list_backend_info_t *backends) {
    (void)generation;
    size_t n = backends->len;
    uint32_t *new_weights = calloc(n ? n : 1, sizeof *new_weights);
    int64_t *new_scores = calloc(n ? n : 1, sizeof *new_scores);
    if (new_weights == NULL || new_scores == NULL) {
        // Out of memory: keep the last good table.
        free(new_weights);
        free(new_scores);
        strategy_list_backend_info_free(backends);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t index = backends->ptr[i].index;
        if (index < n) {
            new_weights[index] = backends->ptr[i].weight ? backends->ptr[i].weight : 1;
        }
    }
    free(weights);
    free(scores);
    weights = new_weights;
    scores = new_scores;
    backend_count = n;
    strategy_list_backend_info_free(backends);
}

bool exports_strategy_pick(strategy_connection_t *conn, strategy_list_u32_t *stats, uint32_t *ret) {
    (void)conn;
    size_t n = stats->len / STATS_PER_BACKEND;
    if (n > backend_count) {
        n = backend_count;  // numbers for backends set-backends has not named yet
    }
    int64_t total = 0;
    size_t best = SIZE_MAX;
    for (size_t i = 0; i < n; i++) {
        if (stats->ptr[STATS_PER_BACKEND * i + 1] != STATE_HEALTHY) {
            continue;
        }
        scores[i] += weights[i];
        total += weights[i];
        if (best == SIZE_MAX || scores[i] > scores[best]) {
            best = i;
        }
    }
    strategy_list_u32_free(stats);
    if (best == SIZE_MAX) {
        return false;
    }
    scores[best] -= total;
    *ret = (uint32_t)best;
    return true;
}

void exports_strategy_report(strategy_connection_outcome_t *outcome) {
    (void)outcome;
}
