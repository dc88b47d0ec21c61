package org.qdedup.ops;

import java.io.PrintStream;
import java.util.concurrent.atomic.AtomicLong;

/** Progress in qemu-img's style "    (12.34/100%)" on stderr, redrawn in place; silent when disabled. */
public final class Progress {
    private final PrintStream err;
    private final long total;
    private final AtomicLong done = new AtomicLong();
    private volatile int lastShown = -1;

    public Progress(PrintStream err, long total) {
        this.err = err;
        this.total = Math.max(1, total);
    }

    public static Progress none() {
        return new Progress(null, 1);
    }

    public void add(long bytes) {
        long d = done.addAndGet(bytes);
        if (err == null) {
            return;
        }
        int permyriad = (int) Math.min(10000, d * 10000 / total);
        if (permyriad != lastShown) {
            synchronized (this) {
                if (permyriad > lastShown) {
                    lastShown = permyriad;
                    err.printf("    (%d.%02d/100%%)\r", permyriad / 100, permyriad % 100);
                    err.flush();
                }
            }
        }
    }

    public void finish() {
        if (err != null) {
            err.printf("    (100.00/100%%)\n");
            err.flush();
        }
    }
}
