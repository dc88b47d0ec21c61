package org.qdedup.ops;

import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicLong;
import java.util.function.Supplier;

/** Runs a job over a byte range in fixed-size chunks on several threads, each taking the next chunk when free. */
final class ParallelChunks {
    /** One thread's work: called for each chunk it takes, then once when no chunk is left. */
    interface Worker {
        void chunk(long start, long end) throws IOException;

        default void done() {
        }
    }

    private ParallelChunks() {
    }

    static void run(long size, int chunk, int threads, String name, Supplier<Worker> perThread) throws IOException {
        AtomicLong next = new AtomicLong();
        ExecutorService pool = Executors.newFixedThreadPool(threads, r -> {
            Thread t = new Thread(r, name);
            t.setDaemon(true);
            return t;
        });
        try {
            List<Future<?>> fs = new ArrayList<>();
            for (int i = 0; i < threads; i++) {
                fs.add(pool.submit(() -> {
                    Worker w = perThread.get();
                    for (long start; (start = next.getAndAdd(chunk)) < size; ) {
                        w.chunk(start, Math.min(size, start + chunk));
                    }
                    w.done();
                    return null;
                }));
            }
            for (Future<?> f : fs) {
                f.get();
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IOException("interrupted", e);
        } catch (ExecutionException e) {
            Throwable c = e.getCause();
            if (c instanceof IOException io) {
                throw io;
            }
            if (c instanceof RuntimeException re) {
                throw re;
            }
            throw new IOException(c);
        } finally {
            pool.shutdownNow();
        }
    }
}
