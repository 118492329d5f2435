/* kvcache._copyhash: copy a block and checksum it (xxh3-64) in one pass over memory.
 *
 * Why compiled code: in Python, a copy and its checksum are two passes (memoryview slice
 * assignment, then xxhash over what landed), each a call per 256 KiB piece; the hash then
 * costs its own time after the copy instead of hiding under it, and put/get of 1 MiB blocks
 * ran at 0.5-0.7 of memcpy. Here each 2-4 KiB chunk is hashed while it sits in L1 and
 * streamed to the destination with non-temporal stores, so DRAM sees one read of the
 * source and one write of the destination (no read-for-ownership), as a large memcpy does.
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

uint64_t shoal_generic_hash(const void *data, size_t n);
uint64_t shoal_generic_copy_hash_source(const void *src, void *dst, size_t n);
uint64_t shoal_generic_copy_hash_exact(const void *src, void *dst, size_t n);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SHOAL_DISPATCH 1
uint64_t shoal_avx2_hash(const void *data, size_t n);
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

static PyObject *copy_checksum_source(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    return copy_with(kernel_copy_source, args, n, "copy_checksum_source");
}

static PyObject *copy_checksum_exact(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    return copy_with(kernel_copy_exact, args, n, "copy_checksum_exact");
}

static PyMethodDef methods[] = {
    {"checksum", checksum, METH_O, "xxh3-64 (seed 0) of a buffer."},
    {"copy_checksum_source", (PyCFunction)(void (*)(void))copy_checksum_source, METH_FASTCALL,
     "target[:] = source; returns the xxh3-64 of the bytes read from source."},
    {"copy_checksum_exact", (PyCFunction)(void (*)(void))copy_checksum_exact, METH_FASTCALL,
     "target[:] = source; returns the xxh3-64 of exactly the bytes target received."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvcache._copyhash",
    "Copy and xxh3-64 checksum in one pass (see kvcache/checksums.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__copyhash(void) {
#if SHOAL_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        kernel_hash = shoal_avx2_hash;
        kernel_copy_source = shoal_avx2_copy_hash_source;
        kernel_copy_exact = shoal_avx2_copy_hash_exact;
        kernel_name = "avx2";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "KERNEL", kernel_name) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
