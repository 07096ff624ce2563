/*
 * libcr.h: lamcr's C interface for applications that take part in their checkpoints.
 *
 * The names and meanings are BLCR's libcr (0.8.x) where they fit, so BLCR-era code builds with
 * few or no changes:  cc app.c $(pkg-config --cflags --libs lamcr)
 * lamcr_* functions are extensions for the `self` engine (no CRIU, no root).
 *
 * Semantics (see docs/design.md, "Application callbacks"):
 *  - Thread-context callbacks run in the library's checkpoint thread, newest first, nested:
 *    each one's cr_checkpoint() runs the next older one. All of them reach cr_checkpoint()
 *    before any signal-context callback runs.
 *  - Signal-context callbacks run in a signal handler of the thread that registered them,
 *    newest first, nested. They may only do async-signal-safe work.
 *  - cr_checkpoint() returns 0 (continue), > 0 (restarted) or -CR_E* (failure).
 *  - A checkpoint requested while a critical section is held waits until the last one is left,
 *    and is taken before cr_leave_cs() returns.
 */
#ifndef LAMCR_LIBCR_H
#define LAMCR_LIBCR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int cr_client_id_t;
typedef int cr_callback_id_t;
typedef int cr_checkpoint_handle_t;
typedef int (*cr_callback_t)(void *arg);

/* cr_register_callback() flags */
#define CR_SIGNAL_CONTEXT 0x0
#define CR_THREAD_CONTEXT 0x1

/* cr_checkpoint() flags; the *_CODE(v) forms carry a user code in the high 16 bits */
#define CR_CHECKPOINT_READY 0
#define CR_CHECKPOINT_TEMP_FAILURE 1
#define CR_CHECKPOINT_PERM_FAILURE 2
#define CR_CHECKPOINT_OMIT 4
#define CR_CHECKPOINT_TEMP_FAILURE_CODE(v) (CR_CHECKPOINT_TEMP_FAILURE | ((v) << 16))
#define CR_CHECKPOINT_PERM_FAILURE_CODE(v) (CR_CHECKPOINT_PERM_FAILURE | ((v) << 16))

/* negated in cr_checkpoint()'s return value */
#define CR_ETEMPFAIL 1001 /* the checkpoint was cancelled; the job goes on */
#define CR_EPERMFAIL 1002 /* the checkpoint failed permanently; the job ends */
#define CR_EOMITTED 1003  /* this process was left out (CR_CHECKPOINT_OMIT) */
#define CR_ENOTCB 1004    /* cr_checkpoint() called outside a callback */
#define CR_ENOINIT 1005   /* cr_init() was not called or failed */

/* cr_status() */
#define CR_STATE_IDLE 0
#define CR_STATE_PENDING 1
#define CR_STATE_ACTIVE 2

typedef struct {
    int cr_version;
    int cr_scope;
    int cr_target;
    int cr_fd;
    int cr_signal;
    int cr_timeout;
    unsigned int cr_flags;
    char reserved[36];
} cr_checkpoint_args_t; /* accepted for compatibility: lamcr always checkpoints the whole job */

/* Connects to the lamd that started this process. -1 with errno ENOSYS outside lamcr. */
cr_client_id_t cr_init(void);
cr_callback_id_t cr_register_callback(cr_callback_t func, void *arg, int flags);
int cr_checkpoint(int flags);
void cr_enter_cs(cr_client_id_t id);
int cr_tryenter_cs(cr_client_id_t id); /* 0, or -1 with errno EAGAIN if a checkpoint is pending */
void cr_leave_cs(cr_client_id_t id);
int cr_status(void);
int cr_initialize_checkpoint_args_t(cr_checkpoint_args_t *args);
/* Asks for a checkpoint of the whole job; it is taken asynchronously. */
int cr_request_checkpoint(cr_checkpoint_args_t *args, cr_checkpoint_handle_t *handle);

/* self engine: inside a thread-context callback, the state to save for this process */
int lamcr_save_state(const void *data, size_t len);
/* 1 if a self-engine restart started this process (after cr_init) */
int lamcr_restarted(void);
/* the state saved at that checkpoint, or NULL; valid for the life of the process */
const void *lamcr_restored_state(size_t *len);

#ifdef __cplusplus
}
#endif

#endif /* LAMCR_LIBCR_H */
