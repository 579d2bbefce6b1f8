/* A set of objects by identity, for the shutdown's "tasks already seen".
 *
 * The shutdown must remember every task it has handled, a million of them
 * at times, without calling their __hash__ or __eq__ (a task class of the
 * app's own may define them, and they may run any code).  A dict keyed by
 * id() did that at about 90 bytes a task (the int key and the entry); this
 * open-addressing table of pointers costs 16 to 32.  Each member is held
 * by a strong reference, so its address cannot be reused by a new task
 * while the set lives. */
#include "aiorun.h"

#include <stdint.h>

#define IDSET_MIN_SLOTS 64

static size_t
slot_of(const aiorun_idset *set, PyObject *obj)
{
    /* Objects are 16-byte aligned: the low bits say nothing.  Fibonacci
     * hashing spreads the rest over the table. */
    uint64_t h = ((uint64_t)(uintptr_t)obj >> 4) * UINT64_C(0x9E3779B97F4A7C15);
    return (size_t)(h >> 32) & set->mask;
}

/* Put obj (already counted) in a table with room; no check for presence. */
static void
place(aiorun_idset *set, PyObject *obj)
{
    size_t i = slot_of(set, obj);
    while (set->slots[i] != NULL) {
        i = (i + 1) & set->mask;
    }
    set->slots[i] = obj;
}

static int
grow(aiorun_idset *set)
{
    size_t old_size = set->slots ? set->mask + 1 : 0;
    size_t size = old_size ? old_size * 2 : IDSET_MIN_SLOTS;
    PyObject **old = set->slots;
    PyObject **slots = PyMem_Calloc(size, sizeof(PyObject *));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    set->slots = slots;
    set->mask = size - 1;
    for (size_t i = 0; i < old_size; i++) {
        if (old[i] != NULL) {
            place(set, old[i]);
        }
    }
    PyMem_Free(old);
    return 0;
}

int
aiorun_idset_add(aiorun_idset *set, PyObject *obj)
{
    if (set->slots != NULL) {
        for (size_t i = slot_of(set, obj); set->slots[i] != NULL; i = (i + 1) & set->mask) {
            if (set->slots[i] == obj) {
                return 0;
            }
        }
    }
    /* At most half full: probes stay short. */
    if ((set->slots == NULL || (set->used + 1) * 2 > set->mask + 1) && grow(set) < 0) {
        return -1;
    }
    place(set, Py_NewRef(obj));
    set->used++;
    return 1;
}

void
aiorun_idset_clear(aiorun_idset *set)
{
    /* Out of the set first: a member's last reference may run a __del__. */
    PyObject **slots = set->slots;
    size_t size = slots ? set->mask + 1 : 0;
    set->slots = NULL;
    set->mask = 0;
    set->used = 0;
    for (size_t i = 0; i < size; i++) {
        Py_XDECREF(slots[i]);
    }
    PyMem_Free(slots);
}
