/*
 * A BLCR-style C rank: the complete C example of docs/design.md, and a test fixture.
 *
 *   cr_app LINES INTERVAL_MS       (event log: $CR_LOG.<rank>)
 *
 * Prints "rank R seq N" for N = 0..LINES-1, each line inside a critical section. A
 * thread-context callback saves the next N (the self engine's state) and counts continues and
 * restarts; a signal-context callback interrupts the main thread's sleep.
 * Build: cc cr_app.c $(pkg-config --cflags --libs lamcr)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libcr.h>

static int logfd = -1;
static volatile long next_seq;
static volatile int continues, restarts;

static void say(const char *s) { (void)!write(logfd, s, strlen(s)); }

static int thread_cb(void *arg) {
    long saved = next_seq;
    char line[64];
    (void)arg;
    say("thread pre\n");
    lamcr_save_state(&saved, sizeof saved);
    snprintf(line, sizeof line, "saved %ld\n", saved);
    say(line);
    int rc = cr_checkpoint(CR_CHECKPOINT_READY);
    if (rc > 0) {
        restarts++;
        say("thread restarted\n");
    } else if (rc == 0) {
        continues++;
        say("thread continue\n");
    } else {
        say("thread cancelled\n");
    }
    return 0;
}

/* signal context: write(2) only */
static int signal_cb(void *arg) {
    (void)arg;
    say("signal pre\n");
    int rc = cr_checkpoint(CR_CHECKPOINT_READY);
    say(rc > 0 ? "signal restarted\n" : rc == 0 ? "signal continue\n" : "signal cancelled\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: cr_app LINES INTERVAL_MS\n");
        return 2;
    }
    long lines = atol(argv[1]);
    long ms = atol(argv[2]);
    const char *rank = getenv("LAMCR_RANK") ? getenv("LAMCR_RANK") : "0";
    const char *base = getenv("CR_LOG") ? getenv("CR_LOG") : "/tmp/cr_app";
    char path[4096];
    snprintf(path, sizeof path, "%s.%s", base, rank);
    logfd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

    cr_client_id_t id = cr_init();
    if (id < 0) {
        perror("cr_init");
        return 1;
    }
    if (cr_register_callback(thread_cb, NULL, CR_THREAD_CONTEXT) < 0 ||
        cr_register_callback(signal_cb, NULL, CR_SIGNAL_CONTEXT) < 0) {
        perror("cr_register_callback");
        return 1;
    }
    if (lamcr_restarted()) {
        size_t n = 0;
        const long *state = lamcr_restored_state(&n);
        char line[64];
        if (state == NULL || n != sizeof(long)) {
            say("restored CORRUPT\n");
            return 1;
        }
        next_seq = *state;
        snprintf(line, sizeof line, "restored %ld ok\n", next_seq);
        say(line);
    }
    for (;;) {
        cr_enter_cs(id);
        long seq = next_seq;
        if (seq >= lines) {
            cr_leave_cs(id);
            break;
        }
        printf("rank %s seq %ld\n", rank, seq);
        fflush(stdout);
        next_seq = seq + 1;
        cr_leave_cs(id);
        struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
        while (nanosleep(&t, &t) != 0 && errno == EINTR) {
        }
    }
    printf("rank %s done continues=%d restarts=%d\n", rank, continues, restarts);
    say("done\n");
    return 0;
}
