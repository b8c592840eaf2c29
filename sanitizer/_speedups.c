/* The hot path in C: which thread is this (Local), and who is inside a call (Claims).
 *
 * threads.py and claims.py use them when the module builds.
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
#include "structmember.h"  /* T_OBJECT_EX, READONLY (3.10, 3.11) */

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

/* -- Claims: who is inside an exclusive object's calls ------------------------------
 *
 * An owner record's ``busy`` slot holds the first thread inside a call (None when
 * idle, CROWD when that thread left while others were still inside) and ``inside``
 * counts the other calls in progress. Guards on free-threaded builds (and 3.10, whose
 * eval loop may switch threads between a read and a write) claim and release through
 * here: each is one critical section on the record, so two threads never both see it
 * idle. The slots are read and written at their offsets, not through getattr, which
 * could take another lock and so suspend the critical section. claims.py holds the
 * pure-Python version; under the GIL on 3.11+ the guards inline the same steps.
 */

#if PY_VERSION_HEX < 0x030D0000
#define Py_BEGIN_CRITICAL_SECTION(op) {
#define Py_END_CRITICAL_SECTION() }
#endif

typedef struct {
    PyObject_HEAD
    PyTypeObject *type;  /* the record type (OwnerRecord) */
    Py_ssize_t busy;     /* offsets of its two slots */
    Py_ssize_t inside;
    PyObject *crowd;
} ClaimsObject;

#define SLOT(record, offset) ((PyObject **)((char *)(record) + (offset)))

/* Put ``value`` (a new reference) in ``*slot``; the old value goes in ``*old`` so that
 * it is released after the critical section (releasing it may run code). */
static void
put(PyObject **slot, PyObject *value, PyObject **old)
{
    *old = *slot;
#if defined(Py_GIL_DISABLED) && (defined(__GNUC__) || defined(__clang__))
    __atomic_store_n(slot, value, __ATOMIC_RELEASE);  /* as PyMember_SetOne stores */
#else
    *slot = value;
#endif
}

static Py_ssize_t
count_of(PyObject *value)
{
    if (value == NULL || !PyLong_CheckExact(value)) {
        return 0;
    }
    Py_ssize_t n = PyLong_AsSsize_t(value);
    if (n < 0) {
        PyErr_Clear();
        return 0;
    }
    return n;
}

static int
check_record(ClaimsObject *self, PyObject *const *args, Py_ssize_t nargs, const char *name)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    if (!PyObject_TypeCheck(args[0], self->type)) {
        PyErr_Format(PyExc_TypeError, "%s(): expected a %s, not %.200s", name,
                     self->type->tp_name, Py_TYPE(args[0])->tp_name);
        return -1;
    }
    return 0;
}

/* claim(record, me): None if ``me`` is now the first inside; else who is (the first
 * thread, or CROWD), with this call counted in ``inside``. */
static PyObject *
claims_claim(ClaimsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_record(self, args, nargs, "claim") < 0) {
        return NULL;
    }
    PyObject *record = args[0], *me = args[1], *holder, *old = NULL;
    int failed = 0;
    Py_BEGIN_CRITICAL_SECTION(record);
    PyObject **busy = SLOT(record, self->busy);
    holder = *busy;
    if (holder == NULL || holder == Py_None) {
        put(busy, Py_NewRef(me), &old);
        holder = Py_None;
    }
    else {
        PyObject **inside = SLOT(record, self->inside);
        PyObject *count = PyLong_FromSsize_t(count_of(*inside) + 1);
        if (count == NULL) {
            failed = 1;
        }
        else {
            put(inside, count, &old);
        }
    }
    Py_INCREF(holder);
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(old);
    if (failed) {
        Py_DECREF(holder);
        return NULL;
    }
    return holder;
}

/* release(record, me): the end of a call claim() let in. The first thread leaving
 * leaves CROWD behind if others are inside; the last of those leaves it idle. */
static PyObject *
claims_release(ClaimsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_record(self, args, nargs, "release") < 0) {
        return NULL;
    }
    PyObject *record = args[0], *me = args[1], *old_busy = NULL, *old_inside = NULL;
    int failed = 0;
    Py_BEGIN_CRITICAL_SECTION(record);
    PyObject **busy = SLOT(record, self->busy);
    PyObject **inside = SLOT(record, self->inside);
    Py_ssize_t others = count_of(*inside);
    if (*busy == me) {
        put(busy, Py_NewRef(others ? self->crowd : Py_None), &old_busy);
    }
    else if (others > 0) {
        PyObject *count = PyLong_FromSsize_t(others - 1);
        if (count == NULL) {
            failed = 1;
        }
        else {
            put(inside, count, &old_inside);
            if (others == 1 && *busy == self->crowd) {
                put(busy, Py_NewRef(Py_None), &old_busy);
            }
        }
    }
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(old_busy);
    Py_XDECREF(old_inside);
    return failed ? NULL : Py_NewRef(Py_None);
}

/* The offset of a writable object slot of ``type`` from its member descriptor. */
static int
offset_of(PyTypeObject *type, PyObject *descriptor, Py_ssize_t *offset)
{
    if (!PyObject_TypeCheck(descriptor, &PyMemberDescr_Type) ||
            ((PyDescrObject *)descriptor)->d_type != type) {
        PyErr_Format(PyExc_TypeError, "Claims: expected a slot of %s", type->tp_name);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
    if (member->type != T_OBJECT_EX || (member->flags & READONLY)) {
        PyErr_SetString(PyExc_TypeError, "Claims: expected a writable __slots__ slot");
        return -1;
    }
    *offset = member->offset;
    return 0;
}

static int
claims_init(ClaimsObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *type, *busy, *inside, *crowd;
    static char *names[] = {"type", "busy", "inside", "crowd", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOO:Claims", names, &PyType_Type,
                                     &type, &busy, &inside, &crowd)) {
        return -1;
    }
    if (offset_of((PyTypeObject *)type, busy, &self->busy) < 0 ||
            offset_of((PyTypeObject *)type, inside, &self->inside) < 0) {
        return -1;
    }
    Py_XSETREF(self->type, (PyTypeObject *)Py_NewRef(type));
    Py_XSETREF(self->crowd, Py_NewRef(crowd));
    return 0;
}

static PyObject *
claims_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    ClaimsObject *self = (ClaimsObject *)PyType_GenericNew(type, args, kwargs);
    if (self != NULL) {
        self->busy = self->inside = -1;
    }
    return (PyObject *)self;
}

static int
claims_ready(ClaimsObject *self)
{
    if (self->type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Claims: not initialised");
        return -1;
    }
    return 0;
}

static PyObject *
claims_claim_checked(ClaimsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return claims_ready(self) < 0 ? NULL : claims_claim(self, args, nargs);
}

static PyObject *
claims_release_checked(ClaimsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return claims_ready(self) < 0 ? NULL : claims_release(self, args, nargs);
}

static int
claims_traverse(ClaimsObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->type);
    Py_VISIT(self->crowd);
    return 0;
}

static int
claims_clear(ClaimsObject *self)
{
    Py_CLEAR(self->type);
    Py_CLEAR(self->crowd);
    return 0;
}

static void
claims_dealloc(ClaimsObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    claims_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMethodDef claims_methods[] = {
    {"claim", (PyCFunction)(void (*)(void))claims_claim_checked, METH_FASTCALL,
     "claim(record, me): None if me is the first inside, else who is (counted inside)."},
    {"release", (PyCFunction)(void (*)(void))claims_release_checked, METH_FASTCALL,
     "release(record, me): the end of a call that claim() let in."},
    {NULL},
};

static PyType_Slot claims_slots[] = {
    {Py_tp_doc, "Claims(type, busy, inside, crowd): atomic claims on records' slots."},
    {Py_tp_init, claims_init},
    {Py_tp_new, claims_new},
    {Py_tp_methods, claims_methods},
    {Py_tp_traverse, claims_traverse},
    {Py_tp_clear, claims_clear},
    {Py_tp_dealloc, claims_dealloc},
    {0, NULL},
};

static PyType_Spec claims_spec = {
    .name = "sanitizer._speedups.Claims",
    .basicsize = sizeof(ClaimsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = claims_slots,
};

static int
add_type(PyObject *module, PyType_Spec *spec, const char *name)
{
    PyObject *type = PyType_FromModuleAndSpec(module, spec, NULL);
    if (type == NULL) {
        return -1;
    }
    int failed = PyModule_AddObjectRef(module, name, type);
    Py_DECREF(type);
    return failed;
}

static int
speedups_exec(PyObject *module)
{
    if (add_type(module, &local_spec, "Local") < 0) {
        return -1;
    }
    return add_type(module, &claims_spec, "Claims");
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
    .m_doc = "The hot path in C: thread identity and claims (threads.py, claims.py).",
    .m_size = 0,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
