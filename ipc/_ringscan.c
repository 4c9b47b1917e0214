/* The ring consumer's frame scan (ipc.ring._pop_all) in C.
 *
 * The front reads every engine step through this loop, and in Python its per-record bytecode
 * (frame unpack, bounds, kind and sequence checks, the slice, its release) cost more than the
 * decode of a small Step record. This does the same work with the same checks; ring.py keeps
 * the pure-Python loop as the fallback and raises the same RingError messages from the status
 * returned here.
 *
 *     pop_all(ring, buf, data, decode, out, limit) -> int
 *
 * ``buf`` is the writable view of the whole mapping (header + data), ``data`` a read-only view
 * of the data area that record views are sliced from, so every view handed to ``decode`` keeps
 * the mapping alive and cannot write to it. Returns the number of records appended to ``out``,
 * or a negative status (STATUS_*): the counters are then already stored for the records before
 * the bad frame, as when ``decode`` raises (that exception propagates).
 *
 * Everything read from shared memory is validated before it is used: lengths come from another
 * process. Each frame is read with one aligned 8-byte load into a local, so the producer cannot
 * change it between the check and the use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ipc._ringscan reads little-endian frames with native loads"
#endif

/* The layout in ipc/ring.py; ring.py uses this module only if LAYOUT matches its own. */
#define W_OFFSET 128
#define R_OFFSET 256
#define HEADER_SIZE 1024
#define KIND_DATA 1
#define KIND_PAD 2

#define STATUS_COUNTERS (-1) /* w - r outside [0, capacity], or r not 8-byte aligned */
#define STATUS_FRAME (-2)    /* frame at the read counter runs past the data area or the write counter, or bad kind */
#define STATUS_SEQUENCE (-3) /* data frame at the read counter with the wrong sequence (torn or stale) */

static PyObject *str_rseq;    /* "_rseq" */
static PyObject *str_release; /* "release" */

/* Release `view` if `decode` kept a reference or an export of it, as `view.release()` does in
 * the Python loop (raises BufferError if an export is still held). */
static int release_if_shared(PyObject *view) {
    if (Py_REFCNT(view) == 1 && ((PyMemoryViewObject *)view)->exports == 0)
        return 0; /* the decref that follows frees it */
    PyObject *res = PyObject_CallMethodNoArgs(view, str_release);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* A view of `length` bytes at `offset` in `data` (a read-only, 1-D byte view of the data area,
 * checked by the caller): what `data[offset:offset + length]` makes, in one allocation. It
 * shares `data`'s managed buffer, so it holds the mapping's export as a slice would: a view
 * that `decode` kept (against the contract) stays safe, and keeps the ring from closing. */
static PyObject *record_view(PyObject *data, uint64_t offset, uint64_t length) {
    PyObject *view = PyMemoryView_FromObject(data); /* data is a memoryview: a new view of it */
    if (view == NULL)
        return NULL;
    Py_buffer *b = &((PyMemoryViewObject *)view)->view;
    b->buf = (char *)b->buf + offset; /* as memoryview's own slicing (init_slice) does */
    b->len = (Py_ssize_t)length;
    b->shape[0] = (Py_ssize_t)length;
    return view;
}

static PyObject *pop_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "pop_all(ring, buf, data, decode, out, limit)");
        return NULL;
    }
    PyObject *ring = args[0], *buf = args[1], *data = args[2], *decode = args[3], *out = args[4];
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return NULL;
    }
    if (!PyMemoryView_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be a memoryview");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[5]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;

    Py_buffer mem;
    if (PyObject_GetBuffer(buf, &mem, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    /* The data area: capacity a power of two >= 4096, and `data` exactly that area. */
    Py_ssize_t cap_s = mem.len - HEADER_SIZE;
    const Py_buffer *d = &((PyMemoryViewObject *)data)->view;
    if (cap_s < 4096 || (cap_s & (cap_s - 1)) || (((uintptr_t)mem.buf) & 7) ||
        ((PyMemoryViewObject *)data)->flags & _Py_MEMORYVIEW_RELEASED || d->buf != (char *)mem.buf + HEADER_SIZE ||
        d->len != cap_s || d->ndim != 1 || d->itemsize != 1 || d->shape[0] != cap_s || d->strides[0] != 1 ||
        d->suboffsets != NULL || !d->readonly || (d->format != NULL && strcmp(d->format, "B") != 0)) {
        PyBuffer_Release(&mem);
        PyErr_SetString(PyExc_ValueError, "buf must be a ring mapping and data a read-only byte view of its data area");
        return NULL;
    }
    const uint64_t cap = (uint64_t)cap_s, mask = cap - 1;
    unsigned char *base = (unsigned char *)mem.buf;
    uint64_t *wp = (uint64_t *)(base + W_OFFSET), *rp = (uint64_t *)(base + R_OFFSET);
    const unsigned char *area = base + HEADER_SIZE;

    PyObject *seq_obj = PyObject_GetAttr(ring, str_rseq);
    if (seq_obj == NULL) {
        PyBuffer_Release(&mem);
        return NULL;
    }
    unsigned long long seq0 = PyLong_AsUnsignedLongLong(seq_obj);
    Py_DECREF(seq_obj);
    if (seq0 == (unsigned long long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&mem);
        return NULL;
    }

    const uint64_t r0 = __atomic_load_n(rp, __ATOMIC_RELAXED); /* our own counter */
    const uint64_t w = __atomic_load_n(wp, __ATOMIC_ACQUIRE);  /* frames before payload bytes */
    if (r0 == w) {
        PyBuffer_Release(&mem);
        return PyLong_FromLong(0);
    }
    if (w - r0 > cap || (r0 & 7)) { /* unsigned: w < r0 is out of range too */
        PyBuffer_Release(&mem);
        return PyLong_FromLong(STATUS_COUNTERS);
    }

    uint64_t r = r0, seq = seq0;
    Py_ssize_t n = 0;
    long status = 0;
    int failed = 0; /* a Python exception is set */
    while (r != w && n < limit) {
        const uint64_t pos = r & mask; /* 8-aligned, so pos + 8 <= cap */
        const uint64_t frame = __atomic_load_n((const uint64_t *)(area + pos), __ATOMIC_RELAXED);
        const uint64_t length = frame & 0xFFFFFFFFu;
        const unsigned kind = (unsigned)(frame >> 32) & 0xFFFFu;
        const unsigned fseq = (unsigned)(frame >> 48);
        const uint64_t size = 8 + ((length + 7) & ~(uint64_t)7);
        if (size > cap - pos || size > w - r) {
            status = STATUS_FRAME;
            break;
        }
        if (kind == KIND_DATA) {
            if (fseq != (seq & 0xFFFFu)) {
                status = STATUS_SEQUENCE;
                break;
            }
            PyObject *view = record_view(data, pos + 8, length);
            if (view == NULL) {
                failed = 1;
                break;
            }
            PyObject *item = PyObject_CallOneArg(decode, view);
            int err = item == NULL || PyList_Append(out, item) < 0;
            Py_XDECREF(item);
            /* Released even when decode failed (a traceback may hold it), as the Python loop's
             * `finally` does; the decode error is the one that propagates. */
            if (err) {
                PyObject *t, *v, *tb;
                PyErr_Fetch(&t, &v, &tb);
                if (release_if_shared(view) < 0)
                    PyErr_Clear();
                PyErr_Restore(t, v, tb);
            } else {
                err = release_if_shared(view) < 0;
            }
            Py_DECREF(view);
            if (err) {
                failed = 1;
                break;
            }
            seq++;
            n++;
        } else if (kind != KIND_PAD) {
            status = STATUS_FRAME;
            break;
        }
        r += size;
    }

    /* As the Python loop's `finally`: what was consumed stays consumed. */
    PyObject *exc_type, *exc_value, *exc_tb;
    if (failed)
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    if (r != r0)
        __atomic_store_n(rp, r, __ATOMIC_RELEASE); /* done reading before the space is reused */
    PyBuffer_Release(&mem);
    PyObject *seq_new = PyLong_FromUnsignedLongLong(seq);
    int set_failed = seq_new == NULL || PyObject_SetAttr(ring, str_rseq, seq_new) < 0;
    Py_XDECREF(seq_new);
    if (failed) {
        if (set_failed)
            PyErr_Clear(); /* the decode error matters more */
        PyErr_Restore(exc_type, exc_value, exc_tb);
        return NULL;
    }
    if (set_failed)
        return NULL;
    return PyLong_FromSsize_t(status ? status : n);
}

static PyMethodDef methods[] = {
    {"pop_all", (PyCFunction)(void (*)(void))pop_all, METH_FASTCALL,
     "pop_all(ring, buf, data, decode, out, limit) -> records appended, or a negative status."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ringscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ringscan(void) {
    str_rseq = PyUnicode_InternFromString("_rseq");
    str_release = PyUnicode_InternFromString("release");
    if (str_rseq == NULL || str_release == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *layout = Py_BuildValue("(iiiii)", W_OFFSET, R_OFFSET, HEADER_SIZE, KIND_DATA, KIND_PAD);
    if (layout == NULL || PyModule_AddObject(m, "LAYOUT", layout) < 0 ||
        PyModule_AddIntConstant(m, "STATUS_COUNTERS", STATUS_COUNTERS) < 0 ||
        PyModule_AddIntConstant(m, "STATUS_FRAME", STATUS_FRAME) < 0 ||
        PyModule_AddIntConstant(m, "STATUS_SEQUENCE", STATUS_SEQUENCE) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
