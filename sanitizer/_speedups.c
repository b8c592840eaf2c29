/* The hot path's "which thread is this", in C: threads.py uses it when it builds.
 *
 * Every guard asks for the calling thread's token (``local.token``) or ident
 * (``local.ident()``). In Python these cost a threading.local lookup (~520
 * instructions on 3.11) and a get_ident() that allocates a new int each call
 * (~380). Here both come from one per-thread slot, a (token, ident) tuple kept in
 * the thread state's dict, with the last thread's slot cached by thread-state id
 * (ids are never reused in a process, so a stale cache never matches). With the
 * GIL disabled there is no shared cache: each lookup reads the thread's own dict.
 *
 * threads.py holds the pure-Python version of the same object (_TokenLocal); the
 * core tests run over both (SANITIZE_THREADS_CORE=python selects it).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "pythread.h"

typedef struct {
    PyObject_HEAD
    PyObject *factory;  /* makes a thread's token the first time it is asked for */
    PyObject *key;      /* this object's key in each thread state's dict */
#ifndef Py_GIL_DISABLED
    uint64_t cached_id; /* the thread state whose slot is cached */
    PyObject *cached;   /* that slot (a strong reference) */
#endif
} LocalObject;

/* Note ``slot`` as the calling thread's (the thread state ``id``). */
static void
remember(LocalObject *self, PyObject *slot, uint64_t id)
{
#ifndef Py_GIL_DISABLED
    Py_INCREF(slot);
    Py_XSETREF(self->cached, slot);
    self->cached_id = id;
#else
    (void)self, (void)slot, (void)id;  /* no shared cache without the GIL */
#endif
}

/* Store (token, ident) as the calling thread's slot in its ``dict``: a borrowed
 * reference (the dict holds it), or NULL with an exception set. */
static PyObject *
store(LocalObject *self, PyObject *dict, PyObject *token)
{
    PyObject *ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    if (ident == NULL) {
        return NULL;
    }
    PyObject *slot = PyTuple_Pack(2, token, ident);
    Py_DECREF(ident);
    if (slot == NULL) {
        return NULL;
    }
    int failed = PyDict_SetItem(dict, self->key, slot);
    Py_DECREF(slot);
    return failed ? NULL : slot;
}

static PyObject *
thread_dict(void)
{
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sanitizer: no thread state dict");
    }
    return dict;
}

/* The calling thread's (token, ident) slot, made on first use: a borrowed reference. */
static PyObject *
slot_of(LocalObject *self)
{
    uint64_t id = PyThreadState_GetID(PyThreadState_Get());
#ifndef Py_GIL_DISABLED
    if (self->cached != NULL && self->cached_id == id) {
        return self->cached;
    }
#endif
    PyObject *dict = thread_dict();
    if (dict == NULL) {
        return NULL;
    }
    PyObject *slot = PyDict_GetItemWithError(dict, self->key);
    if (slot == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        PyObject *token = PyObject_CallNoArgs(self->factory);
        if (token == NULL) {
            return NULL;
        }
        slot = store(self, dict, token);
        Py_DECREF(token);
        if (slot == NULL) {
            return NULL;
        }
    }
    remember(self, slot, id);
    return slot;
}

static PyObject *
local_get_token(LocalObject *self, void *closure)
{
    PyObject *slot = slot_of(self);
    if (slot == NULL) {
        return NULL;
    }
    return Py_NewRef(PyTuple_GET_ITEM(slot, 0));
}

static int
local_set_token(LocalObject *self, PyObject *token, void *closure)
{
    if (token == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the token cannot be deleted");
        return -1;
    }
    PyObject *dict = thread_dict();
    PyObject *slot = dict == NULL ? NULL : store(self, dict, token);
    if (slot == NULL) {
        return -1;
    }
    remember(self, slot, PyThreadState_GetID(PyThreadState_Get()));
    return 0;
}

/* METH_FASTCALL rather than METH_NOARGS: CPython 3.12+ specializes calls of fastcall
 * builtins (CALL_BUILTIN_FAST), not of bound noargs ones. */
static PyObject *
local_ident(LocalObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 0) {
        PyErr_Format(PyExc_TypeError, "ident() takes no arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *slot = slot_of(self);
    if (slot == NULL) {
        return NULL;
    }
    return Py_NewRef(PyTuple_GET_ITEM(slot, 1));
}

static int
local_init(LocalObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *factory;
    static char *names[] = {"factory", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:Local", names, &factory)) {
        return -1;
    }
    PyObject *key = PyUnicode_FromFormat("sanitizer._speedups.Local at %p", (void *)self);
    if (key == NULL) {
        return -1;
    }
    Py_XSETREF(self->factory, Py_NewRef(factory));
    Py_XSETREF(self->key, key);
    return 0;
}

static int
local_traverse(LocalObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->factory);
#ifndef Py_GIL_DISABLED
    Py_VISIT(self->cached);
#endif
    return 0;
}

static int
local_clear(LocalObject *self)
{
    Py_CLEAR(self->factory);
#ifndef Py_GIL_DISABLED
    Py_CLEAR(self->cached);
#endif
    return 0;
}

static void
local_dealloc(LocalObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    local_clear(self);
    Py_CLEAR(self->key);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyGetSetDef local_getset[] = {
    {"token", (getter)local_get_token, (setter)local_set_token,
     "The calling thread's token, made by the factory on the thread's first read.", NULL},
    {NULL},
};

static PyMethodDef local_methods[] = {
    {"ident", (PyCFunction)(void (*)(void))local_ident, METH_FASTCALL,
     "The calling thread's ident (threading.get_ident()), without making a new int."},
    {NULL},
};

static PyType_Slot local_slots[] = {
    {Py_tp_doc, "Local(factory): one token per thread, as threads._TokenLocal keeps them."},
    {Py_tp_init, local_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_getset, local_getset},
    {Py_tp_methods, local_methods},
    {Py_tp_traverse, local_traverse},
    {Py_tp_clear, local_clear},
    {Py_tp_dealloc, local_dealloc},
    {0, NULL},
};

static PyType_Spec local_spec = {
    .name = "sanitizer._speedups.Local",
    .basicsize = sizeof(LocalObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = local_slots,
};

static int
speedups_exec(PyObject *module)
{
    PyObject *type = PyType_FromModuleAndSpec(module, &local_spec, NULL);
    if (type == NULL) {
        return -1;
    }
    int failed = PyModule_AddObjectRef(module, "Local", type);
    Py_DECREF(type);
    return failed;
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sanitizer._speedups",
    .m_doc = "The hot path's thread identity in C (see threads.py for the Python version).",
    .m_size = 0,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
