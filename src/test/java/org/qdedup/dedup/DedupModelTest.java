package org.qdedup.dedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Random;
import java.util.Set;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.ImageOps;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;

/**
 * Random workload with heavy duplication on a dedup image: reads match the model, qemu-img check is clean, and
 * the active layer stores each distinct non-zero cluster content exactly once.
 */
class DedupModelTest {
    static final long SEED = Long.getLong("qdedup.seed", 20261125L);

    @TempDir
    Path dir;

    private String qemu(String... args) throws Exception {
        ProcessBuilder pb = new ProcessBuilder(args).directory(dir.toFile()).redirectErrorStream(true);
        Process p = pb.start();
        String out = new String(p.getInputStream().readAllBytes());
        assertThat(p.waitFor()).as("%s: %s", String.join(" ", args), out).isZero();
        return out;
    }

    @ParameterizedTest(name = "cluster_bits={0} refcount_order={1} snapshot={2}")
    @CsvSource({"12,4,false", "12,4,true", "16,4,false", "12,1,true", "9,6,false"})
    void sharesEachContentOnceAndStaysClean(int bits, int order, boolean snapshot) throws Exception {
        long cs = 1L << bits;
        long clusters = 512;
        long size = clusters * cs;
        Random r = new Random(SEED ^ (bits * 7L + order + (snapshot ? 100 : 0)));
        byte[][] pool = new byte[10][(int) cs];
        for (byte[] p : pool) {
            r.nextBytes(p);
        }
        byte[] model = new byte[(int) size];
        String img = dir.resolve("d.qcow2").toString();
        Qcow2Create.create(img, CreateOptions.defaults(size).withClusterBits(bits).withRefcountOrder(order));
        ImageOps.enableDedup(img);
        Qcow2Image q = Images.openWritable(img, OpenOptions.defaults());
        long hits = 0;
        try {
            for (int i = 0; i < 1500; i++) {
                int k = r.nextInt(20);
                long c = r.nextInt((int) clusters);
                if (k < 12) {
                    // whole clusters from the small pool: duplicates everywhere
                    int n = 1 + r.nextInt(3);
                    n = (int) Math.min(n, clusters - c);
                    byte[] buf = new byte[(int) (n * cs)];
                    for (int j = 0; j < n; j++) {
                        System.arraycopy(pool[r.nextInt(pool.length)], 0, buf, (int) (j * cs), (int) cs);
                    }
                    q.write(ByteBuffer.wrap(buf), c * cs);
                    System.arraycopy(buf, 0, model, (int) (c * cs), buf.length);
                } else if (k < 15) {
                    // small unaligned writes: read-modify-write of the cluster, then dedup of the result
                    long off = c * cs + r.nextInt((int) cs - 8);
                    byte[] buf = new byte[1 + r.nextInt(7)];
                    r.nextBytes(buf);
                    q.write(ByteBuffer.wrap(buf), off);
                    System.arraycopy(buf, 0, model, (int) off, buf.length);
                } else if (k < 17) {
                    long n = Math.min(clusters - c, 1 + r.nextInt(4));
                    q.discard(c * cs, n * cs);
                    Arrays.fill(model, (int) (c * cs), (int) ((c + n) * cs), (byte) 0);
                } else if (k < 18) {
                    // zeros written as data become the zero flag
                    long n = Math.min(clusters - c, 1 + r.nextInt(2));
                    q.write(ByteBuffer.wrap(new byte[(int) (n * cs)]), c * cs);
                    Arrays.fill(model, (int) (c * cs), (int) ((c + n) * cs), (byte) 0);
                } else {
                    q.flush();
                }
                if (snapshot && i == 700) {
                    hits += q.writer().dedupCounters().hits;
                    q.close();
                    qemu("qemu-img", "snapshot", "-c", "s1", img);
                    Files.write(dir.resolve("s1.raw"), model);
                    q = Images.openWritable(img, OpenOptions.defaults());
                }
                if (i % 100 == 0) {
                    ByteBuffer got = ByteBuffer.allocate((int) size);
                    q.read(got, 0);
                    assertThat(Arrays.mismatch(got.array(), model)).as("read after op %d", i).isEqualTo(-1);
                }
            }
            hits += q.writer().dedupCounters().hits;
        } finally {
            q.close();
        }
        assertThat(qemu("qemu-img", "check", img)).contains("No errors were found");
        Files.write(dir.resolve("model.raw"), model);
        qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, "model.raw");
        if (snapshot) {
            qemu("qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", img, "s1-out.raw");
            assertThat(Files.mismatch(dir.resolve("s1-out.raw"), dir.resolve("s1.raw"))).isEqualTo(-1);
        }
        if (order == 1) {
            assertThat(hits).as("2-bit refcounts: sharing would leave no room for a snapshot").isZero();
            return;
        }
        assertThat(hits).as("dedup hits").isGreaterThan(100);
        assertEachContentStoredOnce(img, model, cs);
    }

    /** qemu-img check clean, qemu-img compare identical to the model, each distinct content stored once. */
    private void assertCleanIdenticalAndStoredOnce(String img, byte[] model, long cs) throws Exception {
        assertThat(qemu("qemu-img", "check", img)).contains("No errors were found");
        Files.write(dir.resolve("model-of-" + Path.of(img).getFileName() + ".raw"), model);
        qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, "model-of-" + Path.of(img).getFileName() + ".raw");
        assertEachContentStoredOnce(img, model, cs);
    }

    /** Exactness: host clusters the active layer maps equal the distinct non-zero contents of the model. */
    private void assertEachContentStoredOnce(String img, byte[] model, long cs) throws Exception {
        long clusters = model.length / cs;
        Set<String> distinct = new HashSet<>();
        for (long c = 0; c < clusters; c++) {
            byte[] part = Arrays.copyOfRange(model, (int) (c * cs), (int) ((c + 1) * cs));
            boolean zero = true;
            for (byte b : part) {
                zero &= b == 0;
            }
            if (!zero) {
                distinct.add(Arrays.toString(Sha256.of(part, 0, part.length)));
            }
        }
        Set<Long> hosts = new HashSet<>();
        Matcher m = Pattern.compile("\"length\": (\\d+),.*\"data\": true, \"offset\": (\\d+)")
                .matcher(qemu("qemu-img", "map", "--output=json", img));
        while (m.find()) {
            long len = Long.parseLong(m.group(1)), off = Long.parseLong(m.group(2));
            for (long o = off; o < off + len; o += cs) {
                hosts.add(o / cs);
            }
        }
        assertThat(hosts).as("host clusters mapped by the active layer").hasSize(distinct.size());
    }

    /**
     * Writers on several threads storing the same new contents at once (each in its own part of the disk, with
     * discards and flushes between): a write waits for one in flight that stores its content, so each
     * content is still stored exactly once, and reads, qemu-img check and the index are right.
     */
    @org.junit.jupiter.api.Test
    void concurrentWritersOfTheSameContentsStoreEachOnce() throws Exception {
        int threads = 4, perThread = 128, cs = 4096;
        long size = (long) threads * perThread * cs;
        String img = dir.resolve("m.qcow2").toString();
        Qcow2Create.create(img, CreateOptions.defaults(size).withClusterBits(12));
        ImageOps.enableDedup(img);
        byte[][] pool = new byte[6][];
        for (int k = 0; k < pool.length; k++) {
            pool[k] = cluster(1000 + k);
        }
        byte[] model = new byte[(int) size];
        long hits;
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            java.util.concurrent.CyclicBarrier start = new java.util.concurrent.CyclicBarrier(threads);
            onThreads(threads, region -> {
                Random r = new Random(SEED + region);
                for (int step = 0; step < 200; step++) {
                    // every thread at once: the new contents of this step (or old ones) in a slot of its part
                    start.await(60, java.util.concurrent.TimeUnit.SECONDS);
                    int c = region * perThread + step % (perThread / 8) * 8;
                    int n = 1 + r.nextInt(8);
                    int k = r.nextInt(10);
                    if (k < 8) {
                        byte[] buf = new byte[n * cs];
                        for (int j = 0; j < n; j++) {
                            byte[] src = r.nextInt(4) == 0 ? pool[r.nextInt(pool.length)] : cluster(10_000 + step * 8L + j);
                            System.arraycopy(src, 0, buf, j * cs, cs);
                        }
                        q.write(ByteBuffer.wrap(buf), (long) c * cs);
                        System.arraycopy(buf, 0, model, c * cs, buf.length);
                    } else if (k < 9) {
                        q.discard((long) c * cs, (long) n * cs);
                        Arrays.fill(model, c * cs, (c + n) * cs, (byte) 0);
                    } else {
                        q.flush();
                    }
                }
            });
            ByteBuffer got = ByteBuffer.allocate((int) size);
            q.read(got, 0);
            assertThat(Arrays.mismatch(got.array(), model)).as("read back").isEqualTo(-1);
            assertThat(q.writer().staleDedupEntries()).as("stale index entries").isZero();
            hits = q.writer().dedupCounters().hits;
        }
        assertThat(hits).as("dedup hits").isGreaterThan(100);
        assertCleanIdenticalAndStoredOnce(img, model, cs);
    }


    @org.junit.jupiter.api.Test
    void copiedFollowsSharing() throws Exception {
        String img = dir.resolve("c.qcow2").toString();
        Qcow2Create.create(img, CreateOptions.defaults(1 << 20).withClusterBits(12));
        ImageOps.enableDedup(img);
        byte[] x = new byte[4096];
        Arrays.fill(x, (byte) 1);
        byte[] y = new byte[4096];
        Arrays.fill(y, (byte) 2);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(x), 0);
            q.write(ByteBuffer.wrap(x), 8192); // shared: 1 -> 2, the first entry loses COPIED
            q.flush();
            assertThat(q.writer().dedupCounters().hits).isEqualTo(1);
            q.write(ByteBuffer.wrap(y), 8192); // 2 -> 1: the entry at 0 gets COPIED back
            q.flush();
            q.write(ByteBuffer.wrap(x), 4096); // shared again; then the original user goes away
            q.discard(0, 4096);
            q.flush();
        }
        assertThat(qemu("qemu-img", "check", img)).contains("No errors were found");
        qemu("qemu-io", "-c", "read -P 1 4096 4096", "-c", "read -P 2 8192 4096", "-c", "read -P 0 0 4096", img);
        // QEMU writes in place only where COPIED says so: the last user's cluster is its own again.
        qemu("qemu-io", "-c", "write -P 3 4096 4096", img);
        assertThat(qemu("qemu-img", "check", img)).contains("No errors were found");
    }

    /**
     * A cluster whose owner went away, shared again before the flush and left with one user by it, must still know
     * that user: the next share has to take its COPIED away, or a partial write of that user lands in place in a
     * cluster others read (found by the NBD stress test as a wrong read of a private region, 1 run in 35).
     */
    @org.junit.jupiter.api.Test
    void aClusterSharedAgainAfterItsSharingEndedLeavesNoEntryWritableInPlace() throws Exception {
        String img = dir.resolve("o.qcow2").toString();
        Qcow2Create.create(img, CreateOptions.defaults(1 << 20).withClusterBits(12));
        ImageOps.enableDedup(img);
        byte[] p = cluster(1), other = cluster(2);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(other), 0);
            q.write(ByteBuffer.wrap(p), 4096); // host cluster C holds p, owned by guest cluster 1
            q.write(ByteBuffer.wrap(other), 4096); // guest 1 now shares 0's cluster: C's drop waits for the flush
            q.write(ByteBuffer.wrap(p), 8192); // C is still indexed: guest 2 shares it (2 references until the flush)
            q.flush(); // C is down to 1: guest 2 gets COPIED back
            q.write(ByteBuffer.wrap(p), 12288); // shared again: guest 2 must lose COPIED
            q.write(ByteBuffer.wrap(new byte[]{9, 9, 9}), 8192 + 100); // so this goes to a new cluster, not into C
            ByteBuffer got = ByteBuffer.allocate(4096);
            q.read(got, 12288);
            assertThat(got.array()).as("guest cluster 3 after a partial write of guest cluster 2").isEqualTo(p);
        }
        assertThat(qemu("qemu-img", "check", img)).contains("No errors were found");
        byte[] model = new byte[1 << 20];
        System.arraycopy(other, 0, model, 0, 4096);
        System.arraycopy(other, 0, model, 4096, 4096);
        System.arraycopy(p, 0, model, 8192, 4096);
        model[8292] = model[8293] = model[8294] = 9;
        System.arraycopy(p, 0, model, 12288, 4096);
        Files.write(dir.resolve("o.raw"), model);
        qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, "o.raw");
    }

    /**
     * Eight writers' worth of requests in one sequence, as the NBD stress test sends them but with every read
     * checked and no timing involved: whole-cluster and unaligned writes of pooled and unique contents (one in
     * three unique, on a small disk, so clusters often fall back to one reference and get shared again), discards,
     * zero writes with and without unmap, flushes. Without the owner fix above every one of 20 seeds failed. More
     * seeds by hand with -Dqdedup.seed.
     */
    @ParameterizedTest(name = "seed offset {0}")
    @org.junit.jupiter.params.provider.ValueSource(ints = {0, 1, 2, 3, 4})
    void interleavedWritersReadBackExactly(int seedOffset) throws Exception {
        int cs = 4096, regions = 8;
        long region = 256 << 10, size = regions * region;
        Random r = new Random(SEED * 31 + seedOffset);
        byte[][] pool = new byte[32][cs];
        for (byte[] b : pool) {
            r.nextBytes(b);
        }
        byte[] model = new byte[(int) size];
        String img = dir.resolve("i.qcow2").toString();
        Qcow2Create.create(img, CreateOptions.defaults(size).withClusterBits(12));
        ImageOps.enableDedup(img);
        long hits;
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            for (int i = 0; i < 20_000; i++) {
                long base = r.nextInt(regions) * region;
                int op = r.nextInt(20);
                long off = r.nextInt(4) == 0 ? r.nextLong(region - 70_000) : r.nextLong(region / cs - 17) * cs;
                int len = r.nextInt(4) == 0 ? 1 + r.nextInt(20_000) : cs * (1 + r.nextInt(16));
                int at = (int) (base + off);
                if (op < 11) {
                    byte[] d = new byte[(len + cs - 1) / cs * cs];
                    for (int j = 0; j < d.length / cs; j++) {
                        byte[] src = pool[r.nextInt(pool.length)];
                        if (r.nextInt(3) == 0) {
                            src = new byte[cs];
                            r.nextBytes(src);
                        }
                        System.arraycopy(src, 0, d, j * cs, cs);
                    }
                    q.write(ByteBuffer.wrap(d, 0, len), at);
                    System.arraycopy(d, 0, model, at, len);
                } else if (op < 13) {
                    if (op == 11) {
                        q.discard(at, len);
                    } else {
                        q.writer().writeZeroes(at, len, r.nextBoolean());
                    }
                    Arrays.fill(model, at, at + len, (byte) 0);
                } else if (op < 14) {
                    q.flush();
                } else {
                    byte[] got = new byte[len];
                    q.read(ByteBuffer.wrap(got), at);
                    assertThat(Arrays.mismatch(got, 0, len, model, at, at + len)).as("op %d: read at %d+%d, first wrong byte",
                            i, at, len).isEqualTo(-1);
                }
            }
            assertThat(q.writer().staleDedupEntries()).as("stale index entries").isZero();
            hits = q.writer().dedupCounters().hits;
        }
        assertThat(hits).as("dedup hits").isGreaterThan(10_000);
        assertCleanIdenticalAndStoredOnce(img, model, cs);
    }

    @org.junit.jupiter.api.Test
    void contentsSharingTheInRamKeyAreNotShared() throws Exception {
        // Birthday search for two different 4 KiB clusters whose SHA-256 share the index's 32-bit fragment.
        java.util.Map<Integer, Long> seen = new java.util.HashMap<>();
        byte[] a = null, b = null;
        for (long v = 0; a == null; v++) {
            byte[] c = cluster(v);
            Long prev = seen.putIfAbsent(DedupIndex.fragment(Sha256.of(c, 0, c.length)), v);
            if (prev != null) {
                a = cluster(prev);
                b = c;
            }
        }
        String img = dir.resolve("k.qcow2").toString();
        Qcow2Create.create(img, CreateOptions.defaults(1 << 20).withClusterBits(12));
        ImageOps.enableDedup(img);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 0);
            q.write(ByteBuffer.wrap(b), 4096);
            assertThat(q.writer().dedupCounters().hits).isZero();
            assertThat(q.writer().dedupCounters().fragmentCollisions).isEqualTo(1);
        }
        try (var d = Images.open(img, OpenOptions.defaults())) {
            ByteBuffer got = ByteBuffer.allocate(8192);
            d.read(got, 0);
            assertThat(Arrays.copyOfRange(got.array(), 0, 4096)).isEqualTo(a);
            assertThat(Arrays.copyOfRange(got.array(), 4096, 8192)).isEqualTo(b);
        }
        assertThat(qemu("qemu-img", "check", img)).contains("No errors were found");
    }

    /** Work of one of several threads, given its number. */
    private interface ThreadBody {
        void run(int thread) throws Exception;
    }

    /** Runs {@code body} on {@code threads} threads at once; fails with the first failure of any. */
    private static void onThreads(int threads, ThreadBody body) throws Exception {
        java.util.concurrent.atomic.AtomicReference<Throwable> err = new java.util.concurrent.atomic.AtomicReference<>();
        Thread[] ts = new Thread[threads];
        for (int t = 0; t < threads; t++) {
            int k = t;
            ts[t] = new Thread(() -> {
                try {
                    body.run(k);
                } catch (Throwable e) {
                    err.compareAndSet(null, e);
                }
            });
            ts[t].start();
        }
        for (Thread t : ts) {
            t.join();
        }
        assertThat(err.get()).isNull();
    }

    private static byte[] cluster(long v) {
        byte[] c = new byte[4096];
        new Random(v).nextBytes(c);
        return c;
    }

    @org.junit.jupiter.api.Test
    void twoWritersStoringTheSameNewContentShareOneCluster() throws Exception {
        String img = dir.resolve("t.qcow2").toString();
        Qcow2Create.create(img, CreateOptions.defaults(8 << 20).withClusterBits(12));
        ImageOps.enableDedup(img);
        byte[] content = cluster(42);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            java.util.concurrent.CyclicBarrier start = new java.util.concurrent.CyclicBarrier(2);
            onThreads(2, base -> {
                start.await();
                for (int i = 0; i < 500; i++) {
                    q.write(ByteBuffer.wrap(content), (long) (2 * i + base) * 4096);
                }
            });
        }
        assertThat(qemu("qemu-img", "check", img)).contains("No errors were found");
        Set<Long> hosts = new HashSet<>();
        Matcher m = Pattern.compile("\"data\": true, \"offset\": (\\d+)").matcher(qemu("qemu-img", "map", "--output=json", img));
        while (m.find()) {
            hosts.add(Long.parseLong(m.group(1)));
        }
        assertThat(hosts).as("one host cluster for 1000 copies written by two threads").hasSize(1);
        byte[] all = new byte[1000 * 4096];
        for (int i = 0; i < 1000; i++) {
            System.arraycopy(content, 0, all, i * 4096, 4096);
        }
        Files.write(dir.resolve("t.raw"), Arrays.copyOf(all, 8 << 20));
        qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, "t.raw");
    }

    @org.junit.jupiter.api.Test
    void convertDedupOfQemuImages() throws Exception {
        qemu("qemu-img", "create", "-f", "raw", "base.raw", "3M");
        qemu("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", "base.raw");
        qemu("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw", "mid.qcow2", "4M");
        qemu("qemu-io", "-c", "write -P 2 512k 64k", "-c", "write -c -P 1 2M 64k", "-c", "write -z 3M 64k", "mid.qcow2");
        qemu("qemu-img", "snapshot", "-c", "s1", "mid.qcow2");
        qemu("qemu-io", "-c", "write -P 1 3M 128k", "mid.qcow2");
        qemu("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "-b", "mid.qcow2", "-F", "qcow2",
                "top.qcow2", "4M");
        qemu("qemu-io", "-c", "write -P 1 3k 5k", "-c", "write -P 2 70k 8k", "top.qcow2");
        for (String src : new String[]{"mid.qcow2", "top.qcow2"}) {
            String dst = dir.resolve("dd-" + src).toString();
            java.io.ByteArrayOutputStream err = new java.io.ByteArrayOutputStream();
            int rc = org.qdedup.cli.Main.run(new String[]{"convert", "--dedup", "-O", "qcow2", dir.resolve(src).toString(), dst},
                    new java.io.PrintStream(new java.io.ByteArrayOutputStream()), new java.io.PrintStream(err));
            assertThat(rc).as("convert --dedup %s: %s", src, err).isZero();
            assertThat(qemu("qemu-img", "check", dst)).contains("No errors were found");
            qemu("qemu-img", "compare", dir.resolve(src).toString(), dst);
            // 1 MiB of pattern 1 from the backing file and the other copies of it become one cluster.
            assertThat(Files.size(Path.of(dst))).isLessThan(1L << 20);
        }
    }
}
