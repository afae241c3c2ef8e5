// A CUPTI activity tracer for any CUDA process, loaded through the driver's injection hook:
//
//   gcc -O2 -shared -fPIC -I$CUDA/include -DKREC=CUpti_ActivityKernel10 \
//       -DMREC=CUpti_ActivityMemcpy6 -DSREC=CUpti_ActivityMemset4 cupti_trace.c \
//       -o libtrace.so -L$CUDA/lib64 -lcupti -Wl,-rpath,$CUDA/lib64
//   CUDA_INJECTION64_PATH=$PWD/libtrace.so TRACE_OUT=trace.txt ./bench --multi-decode-lean
//
// (KREC / MREC / SREC: the newest record structs the toolkit's cupti_activity.h declares.)
// Writes one line per kernel (K), copy (C) and memset (S): device, stream, graph id, GPU start
// and end in ns, name; with TRACE_API=1 also one per driver API call (A): the host thread id
// in the stream column, graph id 0, host start and end on the same clock, the call's name.
// The GPU machine has Nsight Compute but not Nsight Systems; this gives the timeline of a
// replayed decode step, gaps between graph nodes included.
// `tools/step_timeline.py` turns it into per-step medians.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#define BUF_BYTES (16u << 20)

static FILE* out;

static void CUPTIAPI request(uint8_t** buf, size_t* size, size_t* max) {
    *buf = aligned_alloc(8, BUF_BYTES);
    *size = BUF_BYTES;
    *max = 0;
}

static void CUPTIAPI complete(CUcontext c, uint32_t s, uint8_t* buf, size_t size, size_t valid) {
    CUpti_Activity* r = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            KREC* k = (KREC*)r;
            fprintf(out, "K %u %u %u %llu %llu %s\n", k->deviceId, k->streamId, k->graphId,
                    (unsigned long long)k->start, (unsigned long long)k->end, k->name);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            SREC* m = (SREC*)r;
            fprintf(out, "S %u %u %u %llu %llu memset_%llu\n", m->deviceId, m->streamId,
                    m->graphId, (unsigned long long)m->start, (unsigned long long)m->end,
                    (unsigned long long)m->bytes);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            MREC* m = (MREC*)r;
            fprintf(out, "C %u %u %u %llu %llu kind%u_%llu\n", m->deviceId, m->streamId,
                    m->graphId, (unsigned long long)m->start, (unsigned long long)m->end,
                    (unsigned)m->copyKind, (unsigned long long)m->bytes);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
            CUpti_ActivityAPI* a = (CUpti_ActivityAPI*)r;
            const char* name = "?";
            cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
            fprintf(out, "A 0 %u 0 %llu %llu %s\n", a->threadId, (unsigned long long)a->start,
                    (unsigned long long)a->end, name);
        }
    }
    free(buf);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    fclose(out);
}

// Called by the driver when it loads this library (CUDA_INJECTION64_PATH).
int InitializeInjection(void) {
    out = fopen(getenv("TRACE_OUT"), "w");
    if (!out) return 0;
    cuptiActivityRegisterCallbacks(request, complete);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    const char* api = getenv("TRACE_API");
    if (api && api[0] == '1') cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
    atexit(finish);
    return 1;
}
