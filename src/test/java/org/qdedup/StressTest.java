package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/**
 * Concurrency stress of `serve --dedup`: eight NBD connections at once (plus a fio job at iodepth 16 with
 * --dedupe_percentage) write duplicate-heavy data, zero, trim, flush and read, each client in a region of its
 * own and all of them, overlapping, in a shared one, for {@code -Dqdedup.stress.seconds=N} (15 in CI). While it
 * runs every read of a private region is checked; at the end the server stops cleanly and: each private region holds exactly what its
 * client wrote, each shared cluster one of the contents written there (or zeros), qemu-img check is clean, the
 * stored clusters are exactly the distinct non-zero clusters, and the dedup index has no stale entry.
 */
class StressTest {
    @TempDir
    Path dir;

    static final int SECONDS = Integer.getInteger("qdedup.stress.seconds", 15);
    static final int CLIENTS = 8, CS = 4096;
    static final long PRIVATE = 4L << 20, SHARED_OFF = CLIENTS * PRIVATE, SHARED = 16L << 20;
    static final long FIO_OFF = SHARED_OFF + SHARED, FIO = 16L << 20, SIZE = FIO_OFF + FIO;
    static final int READ = 0, WRITE = 1, FLUSH = 3, TRIM = 4, WRITE_ZEROES = 6, NO_HOLE = 2;

    /** Counters for the summary line. */
    private static final class Counts {
        final AtomicLong requests = new AtomicLong(), bytesWritten = new AtomicLong(), reads = new AtomicLong(),
                racingReads = new AtomicLong();
    }

    private static long key(byte[] b, int off) {
        try {
            MessageDigest md = MessageDigest.getInstance("SHA-256");
            md.update(b, off, CS);
            return ByteBuffer.wrap(md.digest()).getLong();
        } catch (java.security.NoSuchAlgorithmException e) {
            throw new AssertionError(e);
        }
    }

    @Test
    @Timeout(3600)
    void manyClientsWritingOverlappingDuplicatesLeaveAnExactImage() throws Exception {
        String img = dir.resolve("s.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, Long.toString(SIZE)).rc()).isZero();
        Random seed = new Random(WriterModelTest.SEED ^ 0x57);
        byte[][] pool = new byte[32][CS];
        for (byte[] p : pool) {
            seed.nextBytes(p);
        }
        byte[][] priv = new byte[CLIENTS][(int) PRIVATE];
        long zeroKey = key(new byte[CS], 0);
        List<Set<Long>> shared = new ArrayList<>();
        for (int i = 0; i < SHARED / CS; i++) {
            Set<Long> s = ConcurrentHashMap.newKeySet();
            s.add(zeroKey);
            shared.add(s);
        }
        Counts counts = new Counts();
        AtomicReference<Throwable> failure = new AtomicReference<>();
        Path sock = dir.resolve("s.sock");
        try (ServeProcess s = new ServeProcess(dir, "--socket", sock.toString(), "--metrics", "m.json", img)) {
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(SECONDS);
            Process fio = new ProcessBuilder("fio", "--name=stress", "--thread", "--ioengine=nbd", "--uri=" + s.uri,
                    "--rw=randrw", "--bs=4k", "--offset=" + FIO_OFF, "--size=" + FIO, "--iodepth=16",
                    "--dedupe_percentage=70", "--randseed=5", "--time_based", "--runtime=" + SECONDS, "--output=/dev/null")
                    .redirectErrorStream(true).redirectOutput(dir.resolve("fio.log").toFile()).start();
            List<Thread> clients = new ArrayList<>();
            for (int k = 0; k < CLIENTS; k++) {
                int id = k;
                Random r = new Random(seed.nextLong());
                clients.add(Thread.ofPlatform().name("client-" + k).start(() -> {
                    try {
                        client(id, sock, deadline, r, pool, priv[id], shared, counts);
                    } catch (Throwable t) {
                        failure.compareAndSet(null, t);
                    }
                }));
            }
            for (Thread t : clients) {
                t.join(TimeUnit.SECONDS.toMillis(SECONDS + 120));
                assertThat(t.isAlive()).as("%s still waiting for a reply 2 minutes after the end: a hang", t.getName()).isFalse();
            }
            if (failure.get() != null) {
                throw new AssertionError("a client failed: " + failure.get(), failure.get());
            }
            assertThat(fio.waitFor(120, TimeUnit.SECONDS)).as("fio ends").isTrue();
            assertThat(fio.exitValue()).as("fio: %s", Files.readString(dir.resolve("fio.log"))).isZero();
            assertThat(s.p.isAlive()).as("server alive after the stress; stderr: %s", s.stderr()).isTrue();
            assertThat(s.stop()).as("server stops cleanly").isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
        Path raw = dir.resolve("s.raw");
        Qemu.img(dir, "convert", "-f", "qcow2", "-O", "raw", img, raw.toString());
        byte[] all = Files.readAllBytes(raw);
        for (int k = 0; k < CLIENTS; k++) {
            int bad = Arrays.mismatch(all, (int) (k * PRIVATE), (int) ((k + 1) * PRIVATE), priv[k], 0, (int) PRIVATE);
            assertThat(bad).as("client %d's region: first wrong byte", k).isEqualTo(-1);
        }
        for (int i = 0; i < SHARED / CS; i++) {
            assertThat(shared.get(i)).as("shared cluster %d holds one of the contents written there", i)
                    .contains(key(all, (int) (SHARED_OFF + (long) i * CS)));
        }
        long distinct = NbdServeTest.distinctNonZero(raw, CS);
        assertThat(Qemu.hostClusters(dir, img, CS)).as("stored clusters = distinct non-zero clusters").isEqualTo(distinct);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            assertThat(q.writer().staleDedupEntries()).as("stale index entries").isZero();
        }
        String metrics = Files.readString(dir.resolve("m.json"));
        System.out.printf("stress: %d s, %d clients + fio: %d requests, %d MiB written, %d reads checked (%d shared "
                + "clusters read mid-write), %d distinct clusters stored, dedup-hits %s: corruptions 0, stale index entries 0, server crashes/hangs 0%n", SECONDS,
                CLIENTS, counts.requests.get(), counts.bytesWritten.get() >> 20, counts.reads.get(), counts.racingReads.get(), distinct,
                metrics.replaceAll("(?s).*\"dedup-hits\": (\\d+).*", "$1"));
    }

    /** One connection: random requests, one at a time, until the deadline; checks every read as it comes. */
    private static void client(int id, Path sock, long deadline, Random r, byte[][] pool, byte[] mine,
            List<Set<Long>> shared, Counts counts) throws Exception {
        long base = id * PRIVATE;
        java.util.ArrayDeque<long[]> history = new java.util.ArrayDeque<>(); // recent private ops: {op, off, len, t}
        try (NbdServeTest.RawClient c = new NbdServeTest.RawClient(sock)) {
            while (System.nanoTime() < deadline) {
                int op = r.nextInt(20);
                boolean inShared = r.nextInt(3) == 0;
                counts.requests.incrementAndGet();
                if (inShared) {
                    // Cluster-aligned, over a hot 1 MiB half of the time: clients overwrite each other's clusters.
                    long span = r.nextBoolean() ? (1 << 20) : SHARED;
                    int n = 1 + r.nextInt(8);
                    long first = r.nextLong(span / CS - n + 1);
                    long off = SHARED_OFF + first * CS, len = (long) n * CS;
                    if (op < 12) {
                        byte[] data = clusters(r, pool, n);
                        for (int j = 0; j < n; j++) {
                            shared.get((int) (first + j)).add(key(data, j * CS)); // before sending: a read may see it
                        }
                        expectOk(c, WRITE, 0, off, len, data, "shared write");
                        counts.bytesWritten.addAndGet(len);
                    } else if (op < 14) {
                        expectOk(c, op == 12 ? TRIM : WRITE_ZEROES, op == 13 && r.nextBoolean() ? NO_HOLE : 0, off, len, null,
                                "shared trim/zero");
                    } else if (op < 15) {
                        expectOk(c, FLUSH, 0, 0, 0, null, "flush");
                    } else {
                        expectOk(c, READ, 0, off, len, null, "shared read");
                        byte[] got = c.read((int) len).array();
                        for (int j = 0; j < n; j++) {
                            // A read that overlaps another client's write may see part of it (NBD leaves that undefined);
                            // counted, not failed. The end state below must be exact.
                            if (!shared.get((int) (first + j)).contains(key(got, j * CS))) {
                                counts.racingReads.incrementAndGet();
                            }
                        }
                        counts.reads.incrementAndGet();
                    }
                    continue;
                }
                // Its own region: any alignment, content known exactly.
                long off = r.nextInt(4) == 0 ? r.nextLong(PRIVATE - 70_000) : r.nextLong(PRIVATE / CS - 17) * CS;
                int len = r.nextInt(4) == 0 ? 1 + r.nextInt(20_000) : CS * (1 + r.nextInt(16));
                if (op < 11) {
                    byte[] data = clusters(r, pool, (len + CS - 1) / CS);
                    data = Arrays.copyOf(data, len);
                    expectOk(c, WRITE, 0, base + off, len, data, "private write");
                    System.arraycopy(data, 0, mine, (int) off, len);
                    remember(history, WRITE, off, len);
                    counts.bytesWritten.addAndGet(len);
                } else if (op < 13) {
                    expectOk(c, op == 11 ? TRIM : WRITE_ZEROES, op == 12 && r.nextBoolean() ? NO_HOLE : 0, base + off, len,
                            null, "private trim/zero");
                    Arrays.fill(mine, (int) off, (int) off + len, (byte) 0);
                    remember(history, op == 11 ? TRIM : WRITE_ZEROES, off, len);
                } else if (op < 14) {
                    expectOk(c, FLUSH, 0, 0, 0, null, "flush");
                    remember(history, FLUSH, 0, 0);
                } else {
                    expectOk(c, READ, 0, base + off, len, null, "private read");
                    byte[] got = c.read(len).array();
                    int bad = Arrays.mismatch(got, 0, len, mine, (int) off, (int) off + len);
                    assertThat(bad).as("client %d: private read at %d+%d, first wrong byte %d%s", id, off, len, bad,
                            bad < 0 ? "" : explain(got, bad, off, mine, pool, history)).isEqualTo(-1);
                    counts.reads.incrementAndGet();
                }
            }
        }
    }

    private static void remember(java.util.ArrayDeque<long[]> history, int op, long off, long len) {
        if (history.size() == 400) {
            history.removeFirst();
        }
        history.addLast(new long[]{op, off, len, System.nanoTime()});
    }

    /** What a wrong private read got and should have got in the cluster of its first wrong byte, and its history. */
    private static String explain(byte[] got, int bad, long off, byte[] mine, byte[][] pool, java.util.ArrayDeque<long[]> history) {
        long abs = off + bad;
        long cl = abs / CS;
        int wrongInCluster = 0;
        for (long b = cl * CS; b < Math.min((cl + 1) * CS, off + got.length); b++) {
            if (b >= off && got[(int) (b - off)] != mine[(int) b]) {
                wrongInCluster++;
            }
        }
        StringBuilder sb = new StringBuilder(String.format("; cluster %d of the region (%d wrong bytes of it in the read)", cl, wrongInCluster));
        if (cl * CS >= off && (cl + 1) * CS <= off + got.length) {
            sb.append("; got ").append(identify(got, (int) (cl * CS - off), pool));
        }
        sb.append("; expected ").append(identify(mine, (int) (cl * CS), pool)).append("; ops on it, oldest first:");
        long now = System.nanoTime();
        for (long[] h : history) {
            if (h[0] == FLUSH || (h[1] < (cl + 1) * CS && h[1] + h[2] > cl * CS)) {
                sb.append(h[0] == FLUSH ? String.format(" flush (%d ms ago)", (now - h[3]) / 1_000_000)
                        : String.format(" %s %d+%d (%d ms ago)", h[0] == WRITE ? "write" : h[0] == TRIM ? "trim" : "zero",
                                h[1], h[2], (now - h[3]) / 1_000_000));
            }
        }
        return sb.toString();
    }

    private static String identify(byte[] b, int at, byte[][] pool) {
        if (Arrays.equals(b, at, at + CS, new byte[CS], 0, CS)) {
            return "zeros";
        }
        for (int k = 0; k < pool.length; k++) {
            if (Arrays.equals(b, at, at + CS, pool[k], 0, CS)) {
                return "pool cluster " + k;
            }
        }
        for (int k = 0; k < pool.length; k++) {
            for (int s = 512; s < CS; s += 512) {
                if (Arrays.equals(b, at, at + CS - s, pool[k], s, CS) || Arrays.equals(b, at + s, at + CS, pool[k], 0, CS - s)) {
                    return "pool cluster " + k + " shifted by " + s;
                }
            }
        }
        return "other content (key " + Long.toHexString(key(b, at)) + ")";
    }

    /** {@code n} clusters, nine in ten from the pool (duplicates), the others random. */
    private static byte[] clusters(Random r, byte[][] pool, int n) {
        byte[] d = new byte[n * CS];
        for (int j = 0; j < n; j++) {
            if (r.nextInt(10) == 0) {
                byte[] u = new byte[CS];
                r.nextBytes(u);
                System.arraycopy(u, 0, d, j * CS, CS);
            } else {
                System.arraycopy(pool[r.nextInt(pool.length)], 0, d, j * CS, CS);
            }
        }
        return d;
    }

    private static void expectOk(NbdServeTest.RawClient c, int type, int flags, long off, long len, byte[] data, String what)
            throws Exception {
        c.request(type, flags, off, len, data);
        assertThat(c.replyError()).as("%s at %d+%d: NBD error", what, off, len).isZero();
    }
}
