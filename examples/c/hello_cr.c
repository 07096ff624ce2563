/* The smallest complete BLCR-style C rank (docs/design.md, section 7b).
 * cc hello_cr.c $(pkg-config --cflags --libs lamcr) -o hello_cr && lamcr run -n 2 ./hello_cr */
#include <libcr.h>
#include <stdio.h>
#include <unistd.h>

static long step;

static int on_checkpoint(void *arg) {
    (void)arg;
    lamcr_save_state(&step, sizeof step); /* used by the self engine */
    int rc = cr_checkpoint(CR_CHECKPOINT_READY);
    fprintf(stderr, rc > 0 ? "restarted\n" : rc == 0 ? "checkpoint taken\n" : "no checkpoint\n");
    return 0;
}

int main(void) {
    cr_client_id_t id = cr_init();
    if (id < 0) {
        perror("cr_init");
        return 1;
    }
    if (lamcr_restarted()) { /* self engine: start again from the saved state */
        size_t n;
        const long *saved = lamcr_restored_state(&n);
        if (saved && n == sizeof step) step = *saved;
    }
    cr_register_callback(on_checkpoint, NULL, CR_THREAD_CONTEXT);
    while (step < 100) {
        cr_enter_cs(id); /* no checkpoint in the middle of a step */
        printf("step %ld\n", step++);
        fflush(stdout);
        cr_leave_cs(id);
        usleep(100000);
    }
    return 0;
}
