/* One iteration's CPU attention, every layer in one native call, paced by flags the GPU writes.
 *
 * Per layer the GPU's copy stream writes `ready[l]` once that layer's Q/K/V (and staged prefill
 * K/V) have landed in host memory; the workers wait for it, store the staged prefill K/V, run the
 * decode attention, and the last to finish writes `done[l]`, which the GPU's other copy stream
 * waits for before it sends the output back. The host thread that issues GPU work never waits for
 * the CPU, and no Python runs between layers. Flights (sub-batches) are served layer-major: layer
 * l of flight 0, layer l of flight 1, then layer l + 1; the GPU issues them in that order too.
 *
 * The whole call is one task on the pool: a worker that finds no share left in one (layer,
 * flight) goes on to the next as soon as its inputs are ready, while the others finish theirs, so
 * no worker waits for the slowest one of each layer. Two consecutive (layer, flight) steps may run
 * at once, never more. Within one flight that happens only when the producer sets a layer's ready
 * flag before the previous layer's done flag (a profiler timing ready layers back to back; the
 * engine's layer l + 1 needs layer l's output): the two layers then write the same output rows. */
#ifndef NEOD_LAYERS_H
#define NEOD_LAYERS_H

#include <stddef.h>
#include <stdint.h>

#include "neod_decode.h"

#define NEOD_MAX_FLIGHTS 8

struct NeodFlight {
    struct NeodDecodeArgs decode; /* decode.kv is layer 0 of the pool; decode.batch may be 0 */
    const void *prefill_k;        /* [num_prefill, num_kv_heads, head_dim] staged per layer */
    const void *prefill_v;
    const int64_t *prefill_slots; /* [num_prefill] block * block_size + offset */
    int32_t num_prefill;
    const uint32_t *ready;        /* [num_layers]: layer l may start once ready[l] == seq */
    uint32_t *done;               /* [num_layers]: set to seq once layer l's output is written */
};

/* Runs num_layers layers of every flight; the KV pool's layers lie layer_bytes apart. Returns 0;
 * -1 with a message in err if the arguments are invalid; -2 if out of memory; -3 with a message if
 * a ready flag did not come within timeout_ns. Unless num_flights or num_layers is out of range,
 * every done flag is set to seq on return, so a GPU stream waiting on them never hangs. busy_ns
 * gets the time during which some worker computed (not the waits for the GPU); worker_ns the
 * workers' time in that work, summed over them: against the pool's size times busy_ns it tells
 * how much of the pool computed. */
int neod_decode_layers(neod_pool *pool, const struct NeodFlight *flights, int num_flights,
                       int num_layers, int64_t layer_bytes, uint32_t seq, int64_t timeout_ns,
                       int64_t *busy_ns, int64_t *worker_ns, char *err, size_t err_len);

#endif
