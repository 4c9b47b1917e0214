/* Memory fences for the shared-memory rings.
 *
 * Python has no way to order a store before a later load (x86 may reorder exactly that), yet
 * the rings' sleep/wake handshake needs it: the reader stores "I am going to sleep" and then
 * loads the write counter; the writer stores the write counter and then loads the flag. A full
 * fence on both sides guarantees that at least one of them sees the other's store, so no
 * wake-up is lost. On ARM, the release/acquire ordering of payload vs counter also needs real
 * fences (x86's TSO gives it for free); ipc.fences selects them by platform.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

/* A heartbeat a native runtime can call while it computes (ggml's abort callback: between the
 * nodes of a graph): store CLOCK_MONOTONIC in ns (Python's time.monotonic_ns) at `data`, an
 * aligned u64 in a ring's header, and never ask to abort. No Python, no GIL: a few tens of ns. */
static bool heartbeat(void *data) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    atomic_store_explicit((_Atomic uint64_t *)data, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec,
                          memory_order_relaxed);
    return false;
}

static PyObject *heartbeat_callback(PyObject *self, PyObject *unused) {
    return PyLong_FromVoidPtr((void *)heartbeat);
}

static PyObject *full(PyObject *self, PyObject *unused) {
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

static PyObject *release(PyObject *self, PyObject *unused) {
    atomic_thread_fence(memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *acquire(PyObject *self, PyObject *unused) {
    atomic_thread_fence(memory_order_acquire);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"full", full, METH_NOARGS, "Sequentially consistent fence (orders stores before later loads)."},
    {"release", release, METH_NOARGS, "Release fence: earlier stores become visible before later ones."},
    {"acquire", acquire, METH_NOARGS, "Acquire fence: later loads happen after earlier ones."},
    {"heartbeat_callback", heartbeat_callback, METH_NOARGS,
     "Address of a C `bool (*)(void *u64)` that stores CLOCK_MONOTONIC ns there and returns false."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fence", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fence(void) { return PyModule_Create(&module); }
