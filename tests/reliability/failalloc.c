/* Fails the n-th memory allocation, as _testcapi.set_nomemory(n - 1, n)
 * does, and writes the C stack of that allocation to a file descriptor
 * at the moment it fails (no allocation of its own: backtrace() and
 * dladdr() work on the stack).  nomemory.py loads it with ctypes.PyDLL into each
 * forked child: the stack is the one of the run that crashed or hung, not
 * of a rerun, whose allocation numbers can differ (free lists, timing).
 *
 *   failalloc_set(n, fd)    hook every domain; allocation n fails; a
 *                           crash (SIGSEGV, SIGABRT, ...) writes its stack
 *   failalloc_remove()      restore the allocators
 *
 * Allocations are counted across the raw, mem and object domains, in every
 * thread (raw ones may come without the GIL), so the count is atomic. */
#include <Python.h>
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static PyMemAllocatorEx saved[3];
static const PyMemAllocatorDomain domains[3] = {
    PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
static atomic_long count;
static long fail_at;
static int stack_fd = -1;
static int installed;

static void
emit(const char *text, int len)
{
    if (len > 0 && write(stack_fd, text, (size_t)len) < 0) {
        /* best effort: the log is all there is to tell */
    }
}

/* Writes the C stack of the caller, one line per frame,
 * "FRAME <object file> <address> <offset in it>", between a header and
 * "@@END"; nomemory.py turns the frames into function, file and line with
 * addr2line.  No allocation: backtrace() (loaded beforehand), dladdr() and
 * snprintf() into a stack buffer. */
static void
write_stack(const char *header)
{
    void *frames[64];
    int depth = backtrace(frames, 64);
    char line[4200];
    emit(header, (int)strlen(header));
    for (int i = 1; i < depth; i++) {   /* frame 0 is this function */
        Dl_info info;
        uintptr_t pc = (uintptr_t)frames[i] - 1;   /* inside the call, not after */
        int len;
        if (dladdr((void *)pc, &info) && info.dli_fname != NULL) {
            len = snprintf(line, sizeof line, "FRAME %s %#lx %#lx\n", info.dli_fname,
                           (unsigned long)pc,
                           (unsigned long)(pc - (uintptr_t)info.dli_fbase));
        }
        else {
            len = snprintf(line, sizeof line, "FRAME ? %#lx 0\n", (unsigned long)pc);
        }
        emit(line, len);
    }
    emit("@@END\n", 6);
}

/* True for the one allocation to fail; writes its stack first. */
static int
should_fail(void)
{
    if (atomic_fetch_add(&count, 1) + 1 != fail_at) {
        return 0;
    }
    write_stack("\n@@FAILED-ALLOCATION\n");
    return 1;
}

/* A crash writes its stack too, then dies of the same signal (the
 * disposition is reset on entry), so the stack is the crash's own, with no
 * core file and no rerun needed. */
static void
on_crash(int signum)
{
    (void)signum;
    write_stack("\n@@CRASH\n");
}

static void *
hook_malloc(void *ctx, size_t size)
{
    PyMemAllocatorEx *alloc = ctx;
    return should_fail() ? NULL : alloc->malloc(alloc->ctx, size);
}

static void *
hook_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *alloc = ctx;
    return should_fail() ? NULL : alloc->calloc(alloc->ctx, nelem, elsize);
}

static void *
hook_realloc(void *ctx, void *ptr, size_t size)
{
    PyMemAllocatorEx *alloc = ctx;
    return should_fail() ? NULL : alloc->realloc(alloc->ctx, ptr, size);
}

static void
hook_free(void *ctx, void *ptr)
{
    PyMemAllocatorEx *alloc = ctx;
    alloc->free(alloc->ctx, ptr);
}

int
failalloc_set(long n, int fd)
{
    void *warm[1];
    if (installed) {
        return -1;
    }
    backtrace(warm, 1);   /* loads libgcc's unwinder now, not when failing */
    struct sigaction crash = {0};
    crash.sa_handler = on_crash;
    crash.sa_flags = SA_RESETHAND | SA_NODEFER;
    sigemptyset(&crash.sa_mask);
    static const int fatal[] = {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL};
    for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++) {
        sigaction(fatal[i], &crash, NULL);
    }
    atomic_store(&count, 0);
    fail_at = n;
    stack_fd = fd;
    for (int i = 0; i < 3; i++) {
        PyMem_GetAllocator(domains[i], &saved[i]);
        PyMemAllocatorEx hook = {&saved[i], hook_malloc, hook_calloc, hook_realloc,
                                 hook_free};
        PyMem_SetAllocator(domains[i], &hook);
    }
    installed = 1;
    return 0;
}

void
failalloc_remove(void)
{
    if (installed) {
        for (int i = 0; i < 3; i++) {
            PyMem_SetAllocator(domains[i], &saved[i]);
        }
        installed = 0;
    }
}
