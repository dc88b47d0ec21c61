package org.qdedup.bench;

import org.qdedup.io.Buffers;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Random;
import java.util.SplittableRandom;
import java.util.concurrent.atomic.AtomicLong;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;

/**
 * 4 KiB random-write throughput through the library API (run by hand, see bench/README.md):
 * {@code java -cp target/qdedup.jar org.qdedup.bench.RandomWrite DIR [SIZE_MB] [SECONDS] [THREADS] [CLUSTER]}.
 * Two phases on a fresh image: allocating writes (clusters new), then overwrites of the same clusters (in place).
 */
public final class RandomWrite {
    private RandomWrite() {
    }

    public static void main(String[] args) throws Exception {
        Path dir = Path.of(args.length > 0 ? args[0] : "/tmp");
        long size = (args.length > 1 ? Long.parseLong(args[1]) : 1024) << 20;
        double seconds = args.length > 2 ? Double.parseDouble(args[2]) : 10;
        int threads = args.length > 3 ? Integer.parseInt(args[3]) : 1;
        long cluster = args.length > 4 ? Long.parseLong(args[4]) : 65536;
        Path img = dir.resolve("randwrite-bench.qcow2");
        Files.deleteIfExists(img);
        Qcow2Create.create(img.toString(), CreateOptions.defaults(size).withClusterBits(Long.numberOfTrailingZeros(cluster)));
        try (Qcow2Image q = Images.openWritable(img.toString(), OpenOptions.defaults())) {
            for (String phase : new String[]{"allocating", "overwrite"}) {
                AtomicLong ops = new AtomicLong();
                long deadline = System.nanoTime() + (long) (seconds * 1e9);
                Thread[] ts = new Thread[threads];
                long t0 = System.nanoTime();
                for (int t = 0; t < threads; t++) {
                    int seed = t;
                    ts[t] = new Thread(() -> {
                        // Same offsets in both phases: the second one rewrites clusters the first allocated.
                        SplittableRandom r = new SplittableRandom(seed);
                        ByteBuffer buf = Buffers.direct(4096);
                        byte[] junk = new byte[4096];
                        new Random(seed).nextBytes(junk);
                        buf.put(junk).flip();
                        try {
                            while (System.nanoTime() < deadline) {
                                long off = (r.nextLong(size / 4096)) * 4096;
                                q.write(buf.duplicate(), off);
                                ops.incrementAndGet();
                            }
                        } catch (Exception e) {
                            throw new RuntimeException(e);
                        }
                    });
                    ts[t].start();
                }
                for (Thread t : ts) {
                    t.join();
                }
                q.flush();
                double s = (System.nanoTime() - t0) / 1e9;
                System.out.printf("%s: %d writes of 4 KiB in %.2f s (incl. final flush), %.0f IOPS, %.1f MiB/s, %d threads%n",
                        phase, ops.get(), s, ops.get() / s, ops.get() * 4096 / s / (1 << 20), threads);
            }
        }
        Files.deleteIfExists(img);
    }
}
