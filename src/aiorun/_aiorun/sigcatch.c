/* Holding SIGINT and SIGTERM back while run() swaps their handlers.
 *
 * signal.signal() runs the pending Python handlers before it swaps, so a
 * signal landing just before a swap would reach the old handler (a
 * KeyboardInterrupt out of run()'s set-up, or death by SIGTERM), and one
 * landing between that check and the swap would be "ignored due to race
 * condition".  Two things hold it back:
 *   - this thread's signal mask: a signal for this thread waits in the
 *     kernel until the hold ends;
 *   - a catcher: the kernel gives a process-directed signal to any thread
 *     that does not block it, and there CPython's C handler would mark it
 *     for the old Python handler.  For the window, a C handler of ours
 *     takes its place and only notes the signal.  signal.signal() puts
 *     CPython's handler back as it swaps, so the catcher is gone as soon as
 *     the new Python handler is in.
 * When the hold ends, a signal the catcher noted is raised again in this
 * thread (still masked), so it goes to whichever handler is in place once
 * the mask is lifted; or, when asked, dropped: at the end of run() a
 * SIGINT/SIGTERM is run()'s own, ignored like every repeated one, and so is
 * one left pending because every thread blocked it.
 *
 * The catcher is installed only from the main thread of the main
 * interpreter, the only one that swaps handlers.  Its note is the one
 * static mutable variable here, because a signal handler can reach
 * nothing else; everything it does is async-signal-safe. */
#include "aiorun.h"

#ifndef MS_WINDOWS

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

static const int held_signals[] = {SIGINT, SIGTERM};
#define N_HELD (sizeof(held_signals) / sizeof(held_signals[0]))

/* The first SIGINT/SIGTERM caught during the window, 0 if none. */
static atomic_int caught_signum;

static void
catch_signal(int signum)
{
    int saved_errno = errno;
    int none = 0;
    atomic_compare_exchange_strong(&caught_signum, &none, signum);
    errno = saved_errno;
}

static int
is_catcher(int signum)
{
    struct sigaction current;
    return sigaction(signum, NULL, &current) == 0 && !(current.sa_flags & SA_SIGINFO)
        && current.sa_handler == catch_signal;
}

void
aiorun_signals_hold(aiorun_held_signals *held, int catch_others)
{
    sigset_t block;
    sigemptyset(&block);
    for (size_t i = 0; i < N_HELD; i++) {
        sigaddset(&block, held_signals[i]);
    }
    held->holding = pthread_sigmask(SIG_BLOCK, &block, &held->previous) == 0;
    held->catching = 0;
    if (!catch_others) {
        return;
    }
    atomic_store(&caught_signum, 0);
    for (size_t i = 0; i < N_HELD; i++) {
        struct sigaction catcher;
        memset(&catcher, 0, sizeof catcher);
        catcher.sa_handler = catch_signal;
        sigfillset(&catcher.sa_mask);
        catcher.sa_flags = SA_RESTART;
        /* SIG_IGN stays: an ignored signal must not be caught for anyone. */
        if (sigaction(held_signals[i], NULL, &held->saved[i]) < 0
            || (!(held->saved[i].sa_flags & SA_SIGINFO)
                && held->saved[i].sa_handler == SIG_IGN)
            || sigaction(held_signals[i], &catcher, NULL) < 0) {
            continue;
        }
        held->catching |= 1 << i;
    }
}

/* Takes a SIGINT/SIGTERM that is pending for this thread or the process,
 * unless this thread blocked it before the hold (the app's own, to wait
 * for).  Such a signal came while every thread blocked it, so no catcher
 * saw it; unmasked, it would reach the handler put back. */
static void
take_pending(const aiorun_held_signals *held)
{
    sigset_t pending;
    if (sigpending(&pending) < 0) {
        return;
    }
    for (size_t i = 0; i < N_HELD; i++) {
        int signum = held_signals[i];
        if (sigismember(&pending, signum) == 1 && sigismember(&held->previous, signum) != 1) {
#ifndef __APPLE__
            sigset_t one;
            struct timespec now = {0, 0};
            sigemptyset(&one);
            sigaddset(&one, signum);
            /* Never waits: another thread may have taken it meanwhile. */
            (void)sigtimedwait(&one, NULL, &now);
#endif
        }
    }
}

void
aiorun_signals_release(aiorun_held_signals *held, int drop_caught)
{
    /* Only the owner's hold (the one with a catcher) takes what is
     * pending: another thread's run() must not take the owner's signal. */
    if (drop_caught && held->catching && held->holding) {
        take_pending(held);
    }
    if (held->catching) {
        /* Where signal.signal() did not replace the catcher (a failed
         * take-over), the handler from before comes back. */
        for (size_t i = 0; i < N_HELD; i++) {
            if ((held->catching & (1 << i)) && is_catcher(held_signals[i])) {
                (void)sigaction(held_signals[i], &held->saved[i], NULL);
            }
        }
        held->catching = 0;
        int signum = atomic_exchange(&caught_signum, 0);
        if (signum != 0 && !drop_caught) {
            /* Pending in this thread until the mask below is lifted. */
            (void)pthread_kill(pthread_self(), signum);
        }
    }
    if (held->holding) {
        (void)pthread_sigmask(SIG_SETMASK, &held->previous, NULL);
    }
    held->holding = 0;
}

#else /* MS_WINDOWS: no signal masks; Ctrl-C handlers are swapped at once */

void
aiorun_signals_hold(aiorun_held_signals *held, int catch_others)
{
    (void)catch_others;
    held->holding = 0;
}

void
aiorun_signals_release(aiorun_held_signals *held, int drop_caught)
{
    (void)drop_caught;
    held->holding = 0;
}

#endif
