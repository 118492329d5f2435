/* kvcache._copyhash: copy a block and checksum it (xxh3-64) in one pass over memory.
 *
 * Why compiled code: in Python, a copy and its checksum are two passes (memoryview slice
 * assignment, then xxhash over what landed), each a call per 256 KiB piece; the hash then
 * costs its own time after the copy instead of hiding under it, and put/get of 1 MiB blocks
 * ran at 0.5-0.7 of memcpy. Here (kernels.h) each 64-byte stripe is loaded once into AVX2
 * registers, streamed to the destination with non-temporal stores and mixed into XXH3's
 * accumulators from the same registers, so DRAM sees one read of the source and one write
 * of the destination (no read-for-ownership), as a large memcpy does, and the hash hides
 * under the copy: ~0.9-1.0 of a streaming copy, against ~0.7 for copy-then-hash per L1
 * chunk and ~0.45 for the Python two-pass (bench/copyhash.py).
 * The GIL is released for every call over 64 KiB, so the connector's save thread, the
 * engine's threads and the I/O workers run beside a copy.
 *
 * The checksum is XXH3-64 with seed 0, the same value as `xxhash.xxh3_64_intdigest`
 * (the pure-Python fallback in kvcache/checksums.py), so either side of a block may use
 * either implementation. xxhash.h is vendored (BSD-2, LICENSE.xxhash, version 0.8.2).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

uint64_t shoal_generic_hash(const void *data, size_t n);
void shoal_generic_copy_stream(const void *src, void *dst, size_t n);
size_t shoal_generic_state_size(void);
void shoal_generic_state_reset(void *state);
void shoal_generic_state_update(void *state, const void *data, size_t n);
uint64_t shoal_generic_state_digest(const void *state);
uint64_t shoal_generic_copy_hash_source(const void *src, void *dst, size_t n);
uint64_t shoal_generic_copy_hash_exact(const void *src, void *dst, size_t n);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SHOAL_DISPATCH 1
uint64_t shoal_avx2_hash(const void *data, size_t n);
void shoal_avx2_copy_stream(const void *src, void *dst, size_t n);
void shoal_avx2_state_update(void *state, const void *data, size_t n);
uint64_t shoal_avx2_copy_hash_source(const void *src, void *dst, size_t n);
uint64_t shoal_avx2_copy_hash_exact(const void *src, void *dst, size_t n);
#else
#define SHOAL_DISPATCH 0
#endif

typedef uint64_t (*hash_fn)(const void *, size_t);
typedef uint64_t (*copy_fn)(const void *, void *, size_t);
static hash_fn kernel_hash = shoal_generic_hash;
static copy_fn kernel_copy_source = shoal_generic_copy_hash_source;
static copy_fn kernel_copy_exact = shoal_generic_copy_hash_exact;
static const char *kernel_name = "generic";
/* The state layout is xxhash's, the same in both units; only the update differs. */
typedef void (*update_fn)(void *, const void *, size_t);
typedef void (*stream_fn)(const void *, void *, size_t);
static stream_fn kernel_stream = shoal_generic_copy_stream;
static update_fn kernel_update = shoal_generic_state_update;

/* Calls on fewer bytes keep the GIL: releasing and taking it back costs more than the work. */
#define RELEASE_GIL_BYTES (64 << 10)

static PyObject *checksum(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t digest;
    if (view.len >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        digest = kernel_hash(view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        digest = kernel_hash(view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(digest);
}

static PyObject *copy_with(copy_fn kernel, PyObject *const *args, Py_ssize_t nargs,
                           const char *name) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s(source, target) takes 2 arguments", name);
        return NULL;
    }
    Py_buffer source, target;
    if (PyObject_GetBuffer(args[0], &source, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &target, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&source);
        return NULL;
    }
    if (source.len != target.len) {
        PyErr_Format(PyExc_ValueError, "%s: source is %zd bytes but target is %zd", name,
                     source.len, target.len);
        PyBuffer_Release(&source);
        PyBuffer_Release(&target);
        return NULL;
    }
    uint64_t digest;
    if (source.len >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        digest = kernel(source.buf, target.buf, (size_t)source.len);
        Py_END_ALLOW_THREADS
    } else {
        digest = kernel(source.buf, target.buf, (size_t)source.len);
    }
    PyBuffer_Release(&source);
    PyBuffer_Release(&target);
    return PyLong_FromUnsignedLongLong(digest);
}

/* copy_stream has no checksum: wrap it in the copy_fn shape and return 0. */
static uint64_t stream_only(const void *src, void *dst, size_t n) {
    kernel_stream(src, dst, n);
    return 0;
}

static PyObject *copy_stream(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    PyObject *done = copy_with(stream_only, args, n, "copy_stream");
    if (done == NULL) return NULL;
    Py_DECREF(done);
    Py_RETURN_NONE;
}

static PyObject *copy_checksum_source(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    return copy_with(kernel_copy_source, args, n, "copy_checksum_source");
}

static PyObject *copy_checksum_exact(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    return copy_with(kernel_copy_exact, args, n, "copy_checksum_exact");
}

/* -- batches: one call per pipeline piece, the per-block loop in C --------------------- */

/* Buffers of a sequence, acquired with the GIL held; released by release_all. */
static int acquire_all(PyObject *seq, Py_ssize_t n, Py_buffer *views, int flags,
                       const char *name) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (PyObject_GetBuffer(item, &views[i], flags) < 0) {
            for (Py_ssize_t j = 0; j < i; j++) PyBuffer_Release(&views[j]);
            return -1;
        }
    }
    (void)name;
    return 0;
}

static void release_all(Py_buffer *views, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) PyBuffer_Release(&views[i]);
}

/* offsets[i] as a Py_ssize_t; -1 with an exception set when it is not an int. */
static int offset_at(PyObject *offsets, Py_ssize_t i, Py_ssize_t *out) {
    PyObject *item = PySequence_Fast_GET_ITEM(offsets, i);
    Py_ssize_t value = PyLong_AsSsize_t(item);
    if (value == -1 && PyErr_Occurred()) return -1;
    *out = value;
    return 0;
}

/* put_into(arena, offsets, sources) -> list of checksums
 * arena[offsets[i]:offsets[i]+len(sources[i])] = sources[i] for every i, each hashed as it
 * is read (copy_checksum_source). Every slot is bounds-checked before anything is copied. */
static PyObject *put_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "put_into(arena, offsets, sources) takes 3 arguments");
        return NULL;
    }
    PyObject *offsets = PySequence_Fast(args[1], "offsets must be a sequence");
    if (offsets == NULL) return NULL;
    PyObject *sources = PySequence_Fast(args[2], "sources must be a sequence");
    if (sources == NULL) {
        Py_DECREF(offsets);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sources);
    Py_buffer arena;
    Py_buffer *views = NULL;
    Py_ssize_t *at = NULL;
    uint64_t *sums = NULL;
    if (PySequence_Fast_GET_SIZE(offsets) != n) {
        PyErr_Format(PyExc_ValueError, "put_into: %zd offsets but %zd sources",
                     PySequence_Fast_GET_SIZE(offsets), n);
        goto out_seq;
    }
    if (PyObject_GetBuffer(args[0], &arena, PyBUF_WRITABLE) < 0) goto out_seq;
    views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    at = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    sums = PyMem_Calloc((size_t)n + 1, sizeof(uint64_t));
    if (views == NULL || at == NULL || sums == NULL) {
        PyErr_NoMemory();
        goto out_arena;
    }
    if (acquire_all(sources, n, views, PyBUF_SIMPLE, "put_into") < 0) goto out_arena;
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (offset_at(offsets, i, &at[i]) < 0) goto out_views;
        if (at[i] < 0 || views[i].len > arena.len || at[i] > arena.len - views[i].len) {
            PyErr_Format(PyExc_ValueError,
                         "put_into: slot %zd (offset %zd, %zd bytes) is outside the arena "
                         "(%zd bytes)", i, at[i], views[i].len, arena.len);
            goto out_views;
        }
        total += (size_t)views[i].len;
    }
    if (total >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            sums[i] = kernel_copy_source(views[i].buf, (char *)arena.buf + at[i],
                                         (size_t)views[i].len);
        Py_END_ALLOW_THREADS
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            sums[i] = kernel_copy_source(views[i].buf, (char *)arena.buf + at[i],
                                         (size_t)views[i].len);
    }
    result = PyList_New(n);
    if (result == NULL) goto out_views;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *sum = PyLong_FromUnsignedLongLong(sums[i]);
        if (sum == NULL) {
            Py_CLEAR(result);
            goto out_views;
        }
        PyList_SET_ITEM(result, i, sum);
    }
out_views:
    release_all(views, n);
out_arena:
    PyMem_Free(views);
    PyMem_Free(at);
    PyMem_Free(sums);
    PyBuffer_Release(&arena);
out_seq:
    Py_DECREF(offsets);
    Py_DECREF(sources);
    return result;
}

/* get_from(arena, offsets, sizes, checksums, targets, verify) -> (served, corrupt)
 * Copies block i = arena[offsets[i]:offsets[i]+sizes[i]] into targets[i], in order, and
 * stops at the first block that is missing (offset < 0) or does not fit its target (size
 * differs), or, with verify, whose bytes as landed fail checksums[i] (copy_checksum_exact).
 * served = blocks copied (and verified); corrupt = the stop was a checksum mismatch (at
 * index served). A slot outside the arena is a ValueError, checked before any copy. */
static PyObject *get_from(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "get_from(arena, offsets, sizes, checksums, targets, verify) takes 6 "
                        "arguments");
        return NULL;
    }
    int verify = PyObject_IsTrue(args[5]);
    if (verify < 0) return NULL;
    PyObject *offsets = NULL, *sizes = NULL, *checksums = NULL, *targets = NULL;
    PyObject *result = NULL;
    Py_buffer arena;
    int have_arena = 0;
    Py_buffer *views = NULL;
    Py_ssize_t *at = NULL;
    uint64_t *want = NULL;
    Py_ssize_t n = 0, usable = 0, served = 0;
    int corrupt = 0;
    if ((offsets = PySequence_Fast(args[1], "offsets must be a sequence")) == NULL) goto out;
    if ((sizes = PySequence_Fast(args[2], "sizes must be a sequence")) == NULL) goto out;
    if ((checksums = PySequence_Fast(args[3], "checksums must be a sequence")) == NULL) goto out;
    if ((targets = PySequence_Fast(args[4], "targets must be a sequence")) == NULL) goto out;
    n = PySequence_Fast_GET_SIZE(targets);
    Py_ssize_t header = PySequence_Fast_GET_SIZE(offsets);
    if (PySequence_Fast_GET_SIZE(sizes) != header ||
        PySequence_Fast_GET_SIZE(checksums) != header) {
        PyErr_SetString(PyExc_ValueError, "get_from: offsets, sizes and checksums differ in length");
        goto out;
    }
    if (header < n) n = header; /* blocks past the reply's end are not served */
    if (PyObject_GetBuffer(args[0], &arena, PyBUF_SIMPLE) < 0) goto out;
    have_arena = 1;
    views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    at = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    want = PyMem_Calloc((size_t)n + 1, sizeof(uint64_t));
    if (views == NULL || at == NULL || want == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (acquire_all(targets, n, views, PyBUF_WRITABLE, "get_from") < 0) goto out;
    for (usable = 0; usable < n; usable++) {
        Py_ssize_t size;
        if (offset_at(offsets, usable, &at[usable]) < 0 ||
            offset_at(sizes, usable, &size) < 0)
            goto out_views;
        if (at[usable] < 0 || size != views[usable].len) break; /* a miss: the prefix ends */
        if (size > arena.len || at[usable] > arena.len - size) {
            PyErr_Format(PyExc_ValueError,
                         "get_from: block %zd (offset %zd, %zd bytes) is outside the arena "
                         "(%zd bytes)", usable, at[usable], size, arena.len);
            goto out_views;
        }
        PyObject *sum = PySequence_Fast_GET_ITEM(checksums, usable);
        want[usable] = PyLong_AsUnsignedLongLongMask(sum);
        if (want[usable] == (uint64_t)-1 && PyErr_Occurred()) goto out_views;
    }
    Py_BEGIN_ALLOW_THREADS
    for (served = 0; served < usable; served++) {
        const char *src = (const char *)arena.buf + at[served];
        size_t len = (size_t)views[served].len;
        if (verify) {
            if (kernel_copy_exact(src, views[served].buf, len) != want[served]) {
                corrupt = 1;
                break;
            }
        } else {
            kernel_stream(src, views[served].buf, len); /* no read-for-ownership either */
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(nO)", served, corrupt ? Py_True : Py_False);
out_views:
    release_all(views, n);
out:
    PyMem_Free(views);
    PyMem_Free(at);
    PyMem_Free(want);
    if (have_arena) PyBuffer_Release(&arena);
    Py_XDECREF(offsets);
    Py_XDECREF(sizes);
    Py_XDECREF(checksums);
    Py_XDECREF(targets);
    return result;
}

/* -- Hasher: xxh3-64 over several buffers in order (the connector's per-layer ranges) -- */

typedef struct {
    PyObject_HEAD
    void *state; /* XXH3_state_t, 64-byte aligned */
    void *memory;
} Hasher;

static int Hasher_init(Hasher *self, PyObject *args, PyObject *kwargs) {
    if (!PyArg_ParseTuple(args, ":Hasher")) return -1;
    if (self->memory == NULL) {
        self->memory = PyMem_Malloc(shoal_generic_state_size() + 64);
        if (self->memory == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->state = (void *)(((uintptr_t)self->memory + 63) & ~(uintptr_t)63);
    }
    shoal_generic_state_reset(self->state);
    return 0;
}

static void Hasher_dealloc(Hasher *self) {
    PyMem_Free(self->memory);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Hasher_update(Hasher *self, PyObject *arg) {
    if (self->state == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Hasher used before __init__");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    /* The object is not shared across threads by its users (one per chunk being loaded);
     * the GIL is released only over the bytes, never while the state could be freed. */
    if (view.len >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        kernel_update(self->state, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        kernel_update(self->state, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *Hasher_intdigest(Hasher *self, PyObject *unused) {
    if (self->state == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Hasher used before __init__");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(shoal_generic_state_digest(self->state));
}

static PyMethodDef Hasher_methods[] = {
    {"update", (PyCFunction)Hasher_update, METH_O, "Hash the next bytes."},
    {"intdigest", (PyCFunction)Hasher_intdigest, METH_NOARGS, "xxh3-64 of everything so far."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HasherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvcache._copyhash.Hasher",
    .tp_doc = "Streaming xxh3-64 (seed 0), like xxhash.xxh3_64: update(), intdigest().",
    .tp_basicsize = sizeof(Hasher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hasher_init,
    .tp_dealloc = (destructor)Hasher_dealloc,
    .tp_methods = Hasher_methods,
};

static PyMethodDef methods[] = {
    {"checksum", checksum, METH_O, "xxh3-64 (seed 0) of a buffer."},
    {"copy_checksum_source", (PyCFunction)(void (*)(void))copy_checksum_source, METH_FASTCALL,
     "target[:] = source; returns the xxh3-64 of the bytes read from source."},
    {"copy_checksum_exact", (PyCFunction)(void (*)(void))copy_checksum_exact, METH_FASTCALL,
     "target[:] = source; returns the xxh3-64 of exactly the bytes target received."},
    {"copy_stream", (PyCFunction)(void (*)(void))copy_stream, METH_FASTCALL,
     "target[:] = source with streaming stores, no checksum (the benches' copy limit)."},
    {"put_into", (PyCFunction)(void (*)(void))put_into, METH_FASTCALL,
     "put_into(arena, offsets, sources) -> checksums: copy each source into its arena slot."},
    {"get_from", (PyCFunction)(void (*)(void))get_from, METH_FASTCALL,
     "get_from(arena, offsets, sizes, checksums, targets, verify) -> (served, corrupt)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvcache._copyhash",
    "Copy and xxh3-64 checksum in one pass (see kvcache/checksums.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__copyhash(void) {
#if SHOAL_DISPATCH
    __builtin_cpu_init();
    const char *forced = getenv("SHOAL_NATIVE"); /* "generic": the baseline kernels (tests) */
    if (__builtin_cpu_supports("avx2") && !(forced && strcmp(forced, "generic") == 0)) {
        kernel_hash = shoal_avx2_hash;
        kernel_copy_source = shoal_avx2_copy_hash_source;
        kernel_copy_exact = shoal_avx2_copy_hash_exact;
        kernel_update = shoal_avx2_state_update;
        kernel_stream = shoal_avx2_copy_stream;
        kernel_name = "avx2";
    }
#endif
    if (PyType_Ready(&HasherType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&HasherType);
    if (PyModule_AddObject(m, "Hasher", (PyObject *)&HasherType) < 0) {
        Py_DECREF(&HasherType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "KERNEL", kernel_name) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
