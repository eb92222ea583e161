/*
 * The sandbox ("pause") process for containerd's pod sandboxes, built by
 * devcluster/images with `gcc -static`. It holds the pod's namespaces: it
 * sleeps until SIGTERM or SIGINT (then exits 0) and, as PID 1 of a shared PID
 * namespace, reaps whatever children are re-parented to it.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signo) {
    (void)signo;
    _exit(0);
}

static void reap(int signo) {
    (void)signo;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static int on(int signo, void (*handler)(int), int flags) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("pause (bento-juicefs devcluster)");
        return 0;
    }
    if (getpid() != 1) {
        fputs("pause: not PID 1; children of other processes are not reaped\n", stderr);
    }
    if (on(SIGINT, stop, 0) != 0 || on(SIGTERM, stop, 0) != 0 ||
        on(SIGCHLD, reap, SA_NOCLDSTOP | SA_RESTART) != 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
