package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/**
 * kill -9 of `serve --dedup` in the middle of a fio dedup workload (--dedupe_percentage, iodepth 8) and of a
 * verifying writer on a second connection that knows which of its writes were made durable (acknowledged with FUA,
 * or before a FLUSH that completed). Then the server is started again on the same image (dirty: repaired at open),
 * and: every durable write reads back (each cluster holds its durable content or that of a later write that may
 * have reached the file), the server stops cleanly, qemu-img check is clean, the dedup index has no stale entry,
 * and the stored clusters are exactly the distinct non-zero clusters. {@code -Dqdedup.kill9.rounds=N} (3 in CI).
 */
class Kill9Test {
    @TempDir
    Path dir;

    static final int ROUNDS = Integer.getInteger("qdedup.kill9.rounds", 3);
    static final int CS = 4096, SLOT = 64 << 10, SLOTS = 256;
    static final long SIZE = 64L << 20, FIO_END = 32L << 20, REGION = 32L << 20;
    static final int WRITE = 1, FLUSH = 3, FUA = 1;

    /** The verifier's model of one 64 KiB slot: what is durable, and what was sent since (may have landed). */
    private static final class Slot {
        byte[] durable = new byte[SLOT];
        final List<byte[]> since = new ArrayList<>();
    }

    @Test
    @Timeout(900)
    void killedMidWorkloadTheServerComesBackWithEveryFlushedWrite() throws Exception {
        String img = dir.resolve("k.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, Long.toString(SIZE)).rc()).isZero();
        Random r = new Random(WriterModelTest.SEED ^ 0x9);
        byte[][] pool = new byte[24][CS];
        for (byte[] p : pool) {
            r.nextBytes(p);
        }
        Slot[] slots = new Slot[SLOTS];
        for (int i = 0; i < SLOTS; i++) {
            slots[i] = new Slot();
        }
        Path sock = dir.resolve("k.sock");
        long ackedWrites = 0, checkedClusters = 0;
        for (int round = 0; round < ROUNDS; round++) {
            String at = "round " + round;
            AtomicLong acked = new AtomicLong();
            try (ServeProcess s = new ServeProcess(dir, "--socket", sock.toString(), img)) {
                Process fio = new ProcessBuilder("fio", "--name=kill9", "--thread", "--ioengine=nbd", "--uri=" + s.uri,
                        "--rw=randwrite", "--bs=4k", "--size=" + FIO_END, "--iodepth=8", "--dedupe_percentage=70",
                        "--randseed=" + (round + 1), "--time_based", "--runtime=60", "--output=/dev/null")
                        .redirectErrorStream(true).redirectOutput(ProcessBuilder.Redirect.DISCARD).start();
                Thread writer = Thread.ofPlatform().start(() -> verifyingWriter(sock, slots, pool, new Random(r.nextLong()), acked));
                Thread.sleep(700 + r.nextInt(2500));
                assertThat(fio.isAlive()).as(at + ": fio still writing at the kill").isTrue();
                s.kill9();
                writer.join(30_000);
                assertThat(writer.isAlive()).as(at + ": verifying writer ends when the server dies").isFalse();
                fio.waitFor(30, TimeUnit.SECONDS);
                fio.destroyForcibly();
            }
            // The image is dirty (no clean close): the next read-write open repairs it. Verify over NBD.
            try (ServeProcess s = new ServeProcess(dir, "--socket", sock.toString(), img);
                 NbdServeTest.RawClient c = new NbdServeTest.RawClient(sock)) {
                for (int i = 0; i < SLOTS; i++) {
                    c.request(0, REGION + (long) i * SLOT, SLOT, null);
                    assertThat(c.replyError()).isZero();
                    byte[] got = c.read(SLOT).array();
                    for (int k = 0; k < SLOT / CS; k++) {
                        assertThat(clusterMatches(got, k, slots[i]))
                                .as("%s: slot %d cluster %d holds neither its durable content nor a later write", at, i, k)
                                .isTrue();
                        checkedClusters++;
                    }
                    // What the file holds now is durable from here on (the next round's crash may keep it).
                    slots[i].durable = got;
                    slots[i].since.clear();
                }
                c.request(FLUSH, 0, 0, null);
                assertThat(c.replyError()).isZero();
                assertThat(s.stop()).as(at + ": server restarted after kill -9 stops cleanly").isZero();
            }
            ackedWrites += acked.get();
            FormatMatrixTest.assertClean(dir, img);
            try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
                assertThat(q.writer().staleDedupEntries()).as(at + ": stale index entries").isZero();
            }
            Qemu.img(dir, "convert", "-f", "qcow2", "-O", "raw", img, dir.resolve("k.raw").toString());
            long stored = Qemu.hostClusters(dir, img, CS), distinct = NbdServeTest.distinctNonZero(dir.resolve("k.raw"), CS);
            // More stored than distinct: data clusters of zeros, or copies, which only entries that lost their data
            // (or a missed share) leave behind.
            assertThat(stored).as(at + ": stored clusters = distinct non-zero clusters").isEqualTo(distinct);
            Files.delete(dir.resolve("k.raw"));
        }
        System.out.printf("kill -9 rounds: %d, verifier writes acknowledged %d, clusters verified %d: corruptions 0, "
                + "flushed bytes lost 0, stale index entries 0%n", ROUNDS, ackedWrites, checkedClusters);
    }

    private static boolean clusterMatches(byte[] got, int k, Slot s) {
        int a = k * CS, b = a + CS;
        if (Arrays.equals(got, a, b, s.durable, a, b)) {
            return true;
        }
        for (byte[] v : s.since) {
            if (Arrays.equals(got, a, b, v, a, b)) {
                return true;
            }
        }
        return false;
    }

    /**
     * Writes 64 KiB slots of pool clusters one request at a time, a quarter with FUA and a FLUSH every eight, until
     * the connection breaks; keeps the model exact: sent means "may have landed", FUA or a completed FLUSH means
     * durable.
     */
    private static void verifyingWriter(Path sock, Slot[] slots, byte[][] pool, Random r, AtomicLong acked) {
        try (NbdServeTest.RawClient c = new NbdServeTest.RawClient(sock)) {
            for (int n = 0; ; n++) {
                if (n % 8 == 7) {
                    c.request(FLUSH, 0, 0, null);
                    if (c.replyError() != 0) {
                        return;
                    }
                    for (Slot s : slots) {
                        if (!s.since.isEmpty()) {
                            s.durable = s.since.getLast();
                            s.since.clear();
                        }
                    }
                    continue;
                }
                int i = r.nextInt(SLOTS);
                byte[] v = new byte[SLOT];
                for (int k = 0; k < SLOT / CS; k++) {
                    System.arraycopy(pool[r.nextInt(pool.length)], 0, v, k * CS, CS);
                }
                boolean fua = r.nextInt(4) == 0;
                slots[i].since.add(v);
                c.request(WRITE, fua ? FUA : 0, REGION + (long) i * SLOT, SLOT, v);
                if (c.replyError() != 0) {
                    return;
                }
                acked.incrementAndGet();
                if (fua) {
                    slots[i].durable = v;
                    slots[i].since.clear();
                }
            }
        } catch (Exception e) {
            // the server was killed: the request in flight stays "may have landed"
        }
    }
}
