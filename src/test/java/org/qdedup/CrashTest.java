package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;
import org.qdedup.io.MemoryBlockFile;
import org.qdedup.io.PowerCutFile;

/**
 * Power cuts at hundreds of points of a random workload: every crash state must be free of corruption under
 * qemu-img check (leaks allowed), keep every write that completed before the last guest flush and, for dedup
 * images, reopen with no stale index entry (every entry's cluster re-hashed). {@code -Dqdedup.crash.points=N}
 * (default 240 per variant) runs more by hand; every state is checked and the counts are printed and must be 0.
 */
class CrashTest {
    /** Cut points per variant (dedup variants add 16 per mode around the end of their first session). */
    static final int POINTS = Integer.getInteger("qdedup.crash.points", 240);

    @TempDir
    Path dir;

    /** What went wrong across the crash states of one variant; the first few failures are described. */
    private static final class Damage {
        long states, corruptions, flushedBytesLost, staleEntries, trusted;
        final List<String> first = new ArrayList<>();

        void note(String what) {
            if (first.size() < 5) {
                first.add(what);
            }
        }
    }

    /** A guest operation: its range, and the file operation count when it started. */
    private record GuestOp(long off, long len, int startOp) {
    }

    /** Model after a guest flush that ended at file operation {@code endOp}. */
    private record Flushed(int endOp, byte[] model, int guestOpsBefore) {
    }

    @ParameterizedTest(name = "{0}")
    @ValueSource(strings = {"4k-refcount16", "512-refcount64", "64k-snapshot", "4k-v2-backing", "4k-lazy-refcounts",
            "4k-dedup", "4k-dedup-snapshot-refcount4"})
    void crashStatesAreCleanAndKeepFlushedData(String variant) throws Exception {
        long size = 8L << 20;
        Random r = new Random(variant.hashCode() * 31L + WriterModelTest.SEED);
        byte[] model = new byte[(int) size];
        byte[] initial;
        long cs;
        switch (variant) {
            case "4k-refcount16" -> {
                cs = 4096;
                initial = fresh(CreateOptions.defaults(size).withClusterBits(12));
            }
            case "4k-lazy-refcounts" -> {
                cs = 4096;
                initial = fresh(CreateOptions.defaults(size).withClusterBits(12).withLazyRefcounts(true));
            }
            case "512-refcount64" -> {
                cs = 512;
                size = 3L << 20;
                model = new byte[(int) size];
                initial = fresh(CreateOptions.defaults(size).withClusterBits(9).withRefcountOrder(6));
            }
            case "4k-dedup" -> {
                cs = 4096;
                initial = dedup(fresh(CreateOptions.defaults(size).withClusterBits(12)));
            }
            case "4k-dedup-snapshot-refcount4" -> {
                cs = 4096;
                Qemu.img(dir, "create", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=4", "s.qcow2", Long.toString(size));
                Qemu.io(dir, "qcow2", "s.qcow2", List.of("write -P 0x11 0 1M", "write -P 0x22 5M 1M"));
                Qemu.img(dir, "snapshot", "-c", "before", "s.qcow2");
                Arrays.fill(model, 0, 1 << 20, (byte) 0x11);
                Arrays.fill(model, 5 << 20, 6 << 20, (byte) 0x22);
                initial = dedup(Files.readAllBytes(dir.resolve("s.qcow2")));
            }
            case "64k-snapshot" -> {
                cs = 65536;
                Qemu.img(dir, "create", "-f", "qcow2", "s.qcow2", Long.toString(size));
                Qemu.io(dir, "qcow2", "s.qcow2", List.of("write -P 0x11 0 3M", "write -P 0x22 5M 1M"));
                Qemu.img(dir, "snapshot", "-c", "before", "s.qcow2");
                Arrays.fill(model, 0, 3 << 20, (byte) 0x11);
                Arrays.fill(model, 5 << 20, 6 << 20, (byte) 0x22);
                initial = Files.readAllBytes(dir.resolve("s.qcow2"));
            }
            default -> {
                cs = 4096;
                Qemu.img(dir, "create", "-f", "qcow2", "base.qcow2", Long.toString(size));
                Qemu.io(dir, "qcow2", "base.qcow2", List.of("write -P 0x44 1M 2M"));
                Arrays.fill(model, 1 << 20, 3 << 20, (byte) 0x44);
                initial = fresh(CreateOptions.defaults(size).withClusterBits(12).withVersion(2)
                        .withBacking(dir.resolve("base.qcow2").toString(), "qcow2"));
            }
        }
        String name = dir.resolve("crash.qcow2").toString();
        PowerCutFile pc = new PowerCutFile(name, initial);
        List<GuestOp> guestOps = new ArrayList<>();
        List<Flushed> flushes = new ArrayList<>();
        flushes.add(new Flushed(0, model.clone(), 0));
        boolean dedup = variant.contains("dedup");
        // Dedup variants write clusters from a small pool, so most writes share or stop sharing a cluster.
        byte[][] pool = new byte[6][(int) cs];
        for (byte[] p : pool) {
            r.nextBytes(p);
        }
        Path indexFile = dir.resolve("crash.qcow2" + org.qdedup.dedup.DedupSidecar.SUFFIX);
        byte[] indexFileBytes = null;
        int prepEnd = 0;
        if (dedup) {
            // A first session, closed cleanly, leaves an index file in sync; the workload below is its next session.
            pc.placeAt(dir.resolve("crash.qcow2"));
            try (Qcow2Image q = Images.openWritable(pc)) {
                for (int j = 0; j < 2 * pool.length; j++) {
                    guestOps.add(new GuestOp((long) (j * 7 % 64) * cs, cs, pc.opCount()));
                    q.write(ByteBuffer.wrap(pool[j % pool.length]), (long) (j * 7 % 64) * cs);
                    System.arraycopy(pool[j % pool.length], 0, model, (int) ((j * 7 % 64) * cs), (int) cs);
                }
            }
            flushes.add(new Flushed(pc.opCount(), model.clone(), guestOps.size()));
            indexFileBytes = Files.readAllBytes(indexFile);
            prepEnd = pc.opCount();
        }
        try (Qcow2Image q = Images.openWritable(pc)) {
            for (int i = 0; i < 300; i++) {
                long off = WriterModelTest.randomOffset(r, size, cs);
                long len = Math.min(size - off, WriterModelTest.randomLength(r, cs));
                int kind = r.nextInt(12);
                int start = pc.opCount();
                if (kind < 7) {
                    byte[] data = new byte[(int) len];
                    r.nextBytes(data);
                    if (dedup) {
                        for (long c = (off + cs - 1) / cs * cs; c + cs <= off + len; c += cs) {
                            System.arraycopy(pool[r.nextInt(pool.length)], 0, data, (int) (c - off), (int) cs);
                        }
                    }
                    q.write(ByteBuffer.wrap(data), off);
                    System.arraycopy(data, 0, model, (int) off, (int) len);
                } else if (kind < 9) {
                    q.writeZeroes(off, len, r.nextBoolean());
                    Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
                } else if (kind < 10) {
                    q.discard(off, len);
                    Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
                } else {
                    q.flush();
                    flushes.add(new Flushed(pc.opCount(), model.clone(), guestOps.size()));
                    continue;
                }
                guestOps.add(new GuestOp(off, len, start));
            }
        }
        int total = pc.opCount();
        assertThat(total).as("file operations recorded").isGreaterThan(300);
        PowerCutFile.Mode[] modes = PowerCutFile.Mode.values();
        Path img = dir.resolve("crash.qcow2");
        int points = POINTS;
        Damage dmg = new Damage();
        // Dedup variants add every cut around the end of the first session, where the index file is in sync.
        int extra = dedup ? 16 * modes.length : 0;
        for (int k = 0; k < points + extra; k++) {
            int cut = k < points ? (int) ((long) total * k / (points - 1))
                    : Math.min(total, Math.max(0, prepEnd - 4 + (k - points) / modes.length));
            PowerCutFile.Mode mode = modes[k % modes.length];
            byte[] crashed = pc.crashImage(cut, mode, new Random(k));
            if (dedup) {
                // The index file of the first session is there in every crash state (the worst case for trust):
                // whatever the crash left, the index the reopened image uses has no stale entry.
                Files.write(indexFile, indexFileBytes);
                org.qdedup.io.MemoryBlockFile m = new org.qdedup.io.MemoryBlockFile("crash.qcow2", crashed);
                m.placeAt(dir.resolve("crash.qcow2"));
                try (Qcow2Image q = Images.openWritable(m)) {
                    long stale = q.writer().staleDedupEntries();
                    if (stale != 0) {
                        dmg.staleEntries += stale;
                        dmg.note("cut " + cut + " (" + mode + "): " + stale + " stale index entries");
                    }
                    if (q.writer().dedupIndexSource().startsWith("index file")) {
                        dmg.trusted++;
                    }
                }
            }
            Files.write(img, crashed);
            boolean lazy = variant.contains("lazy") || dedup;
            if (lazy) {
                // A dirty image is repaired when opened for writing; afterwards it must be fully clean.
                Images.openWritable(img.toString(), OpenOptions.defaults()).close();
            }
            dmg.states++;
            Qemu.Result check = Qemu.imgRaw(dir, "check", img.toString());
            if (!(check.exit() == 0 || check.exit() == 3 && !lazy)) {
                dmg.corruptions++;
                dmg.note("cut " + cut + "/" + total + " (" + mode + "): qemu-img check exit " + check.exit() + "\n"
                        + check.out() + check.err());
                continue;
            }
            Flushed f = null;
            for (Flushed c : flushes) {
                if (c.endOp() <= cut) {
                    f = c;
                }
            }
            boolean[] touched = new boolean[(int) size];
            for (int g = f.guestOpsBefore(); g < guestOps.size(); g++) {
                GuestOp op = guestOps.get(g);
                if (op.startOp() < cut) {
                    Arrays.fill(touched, (int) op.off(), (int) (op.off() + op.len()), true);
                }
            }
            try (BlockDevice d = Images.open(img.toString(), OpenOptions.defaults())) {
                ByteBuffer got = ByteBuffer.allocate((int) size);
                d.read(got, 0);
                byte[] g = got.array();
                long lost = 0;
                for (int i = 0; i < size; i++) {
                    if (!touched[i] && g[i] != f.model()[i]) {
                        if (lost++ == 0) {
                            dmg.note("cut " + cut + "/" + total + " (" + mode + "): flushed byte at guest offset " + i
                                    + " is " + g[i] + ", expected " + f.model()[i]);
                        }
                    }
                }
                dmg.flushedBytesLost += lost;
            }
            if (dedup && k % 10 == 0) {
                // The index rebuilt after the crash must only lead writes to clusters holding their content.
                long hits;
                try (Qcow2Image q = Images.openWritable(img.toString(), OpenOptions.defaults())) {
                    for (int j = 0; j < 12; j++) {
                        q.write(ByteBuffer.wrap(pool[j % pool.length]), (long) j * cs);
                    }
                    hits = q.writer().dedupCounters().hits;
                    ByteBuffer got = ByteBuffer.allocate((int) (12 * cs));
                    q.read(got, 0);
                    for (int j = 0; j < 12; j++) {
                        assertThat(Arrays.copyOfRange(got.array(), (int) (j * cs), (int) ((j + 1) * cs)))
                                .as("cut %d: pool cluster %d written after the crash", cut, j).isEqualTo(pool[j % pool.length]);
                    }
                }
                assertThat(hits).as("cut %d: the six pool contents written twice share", cut).isGreaterThanOrEqualTo(6);
                Qemu.Result after = Qemu.imgRaw(dir, "check", img.toString());
                assertThat(after.exit()).as("cut %d: check after writing into the crashed image%n%s", cut, after.out()).isZero();
            }
        }
        System.out.printf("crash states (%s): %d, corruptions %d, flushed bytes lost %d, stale index entries %d%s%n", variant,
                dmg.states, dmg.corruptions, dmg.flushedBytesLost, dmg.staleEntries,
                dedup ? ", index file trusted in " + dmg.trusted : "");
        assertThat(dmg.corruptions + dmg.flushedBytesLost + dmg.staleEntries).as("%s: %s", variant, dmg.first).isZero();
        if (dedup) {
            // Crash states from before the workload's first write still trust the index file; later ones rebuild.
            assertThat(dmg.trusted).as("crash states that trusted the index file").isPositive();
        }
    }

    /**
     * A dedup write of new content writes its data without the metadata lock: a guest flush from another thread
     * while that data is being written syncs the new cluster's refcount but no entry pointing at it. Every power cut
     * of that sequence is clean (a leak at worst), keeps what was flushed, and shows a cluster being rewritten with
     * its old content or its new one, never a cluster whose data was not written yet.
     */
    @org.junit.jupiter.api.Test
    void aFlushWhileNewDedupDataIsWrittenLeavesALeakAtWorst() throws Exception {
        long cs = 4096;
        PowerCutFile pc = new PowerCutFile(dir.resolve("race.qcow2").toString(),
                dedup(fresh(CreateOptions.defaults(1L << 20).withClusterBits(12))));
        Random r = new Random(WriterModelTest.SEED);
        byte[] x = new byte[(int) cs], o = new byte[(int) cs], y = new byte[(int) cs];
        r.nextBytes(x);
        r.nextBytes(o);
        r.nextBytes(y);
        Thread[] flusher = new Thread[1];
        int[] flushedAt = new int[2];
        try (Qcow2Image q = Images.openWritable(new DuringWrite(pc, y, () -> {
            flusher[0] = new Thread(() -> {
                try {
                    q0[0].flush();
                } catch (java.io.IOException e) {
                    throw new java.io.UncheckedIOException(e);
                }
            });
            flusher[0].start();
            flusher[0].join(10_000);
        }))) {
            q0[0] = q;
            q.write(ByteBuffer.wrap(x), 0);
            q.write(ByteBuffer.wrap(o), cs);
            q.write(ByteBuffer.wrap(o), 3 * cs); // shared: the cluster at cs is not rewritten in place below
            q.flush();
            flushedAt[0] = pc.opCount();
            q.write(ByteBuffer.wrap(y), cs); // replaces o in a new cluster; the flush above runs during its data write
            assertThat(flusher[0]).as("flush during the data write").isNotNull();
            assertThat(flusher[0].isAlive()).as("a flush waits for a dedup data write to finish").isFalse();
            q.write(ByteBuffer.wrap(y), 2 * cs); // shares the cluster of the write above
            q.flush();
            flushedAt[1] = pc.opCount();
            assertThat(q.writer().dedupCounters().hits).isEqualTo(2);
        }
        Path img = dir.resolve("race.qcow2");
        for (int cut = 0; cut <= pc.opCount(); cut++) {
            for (PowerCutFile.Mode mode : PowerCutFile.Mode.values()) {
                Files.write(img, pc.crashImage(cut, mode, new Random(cut)));
                Images.openWritable(img.toString(), OpenOptions.defaults()).close(); // repairs the dirty image
                Qemu.Result check = Qemu.imgRaw(dir, "check", img.toString());
                assertThat(check.exit()).as("cut %d (%s): qemu-img check%n%s", cut, mode, check.out()).isZero();
                try (BlockDevice d = Images.open(img.toString(), OpenOptions.defaults())) {
                    ByteBuffer got = ByteBuffer.allocate((int) (4 * cs));
                    d.read(got, 0);
                    byte[] g = got.array();
                    if (cut >= flushedAt[0]) {
                        assertThat(Arrays.copyOfRange(g, 0, (int) cs)).as("cut %d: flushed cluster", cut).isEqualTo(x);
                        assertThat(Arrays.copyOfRange(g, (int) (3 * cs), (int) (4 * cs))).as("cut %d: flushed copy", cut)
                                .isEqualTo(o);
                        // the write in flight at the crash: the old content or the new one, nothing else
                        assertThat(Arrays.copyOfRange(g, (int) cs, (int) (2 * cs))).as("cut %d (%s): rewritten cluster", cut, mode)
                                .isIn(o, y);
                        assertThat(Arrays.copyOfRange(g, (int) (2 * cs), (int) (3 * cs))).as("cut %d: shared cluster", cut)
                                .isIn(new byte[(int) cs], y);
                    }
                    if (cut >= flushedAt[1]) {
                        assertThat(Arrays.copyOfRange(g, (int) cs, (int) (3 * cs))).as("cut %d", cut)
                                .isEqualTo(concat(y, y));
                    }
                }
            }
        }
    }

    private final Qcow2Image[] q0 = new Qcow2Image[1];

    private static byte[] concat(byte[] a, byte[] b) {
        byte[] c = Arrays.copyOf(a, a.length + b.length);
        System.arraycopy(b, 0, c, a.length, b.length);
        return c;
    }

    /** A file that runs a hook (once) in the middle of the first write of {@code content}. */
    private static final class DuringWrite implements org.qdedup.io.BlockFile {
        interface Hook {
            void run() throws Exception;
        }

        private final PowerCutFile f;
        private final byte[] content;
        private Hook hook;

        DuringWrite(PowerCutFile f, byte[] content, Hook hook) {
            this.f = f;
            this.content = content;
            this.hook = hook;
        }

        @Override
        public String name() {
            return f.name();
        }

        @Override
        public long size() {
            return f.size();
        }

        @Override
        public int read(ByteBuffer dst, long pos) {
            return f.read(dst, pos);
        }

        @Override
        public void write(ByteBuffer src, long pos) throws java.io.IOException {
            Hook h = hook;
            if (h != null && src.remaining() == content.length && src.duplicate().equals(ByteBuffer.wrap(content))) {
                hook = null;
                try {
                    h.run();
                } catch (Exception e) {
                    throw new java.io.IOException(e);
                }
            }
            f.write(src, pos);
        }

        @Override
        public void flush() {
            f.flush();
        }

        @Override
        public void truncate(long size) {
            f.truncate(size);
        }

        @Override
        public void close() {
            f.close();
        }
    }

    /** The image with dedup enabled. */
    private byte[] dedup(byte[] image) throws Exception {
        Path p = dir.resolve("dedup-initial.qcow2");
        Files.write(p, image);
        org.qdedup.image.ImageOps.enableDedup(p.toString());
        return Files.readAllBytes(p);
    }

    private byte[] fresh(CreateOptions o) throws Exception {
        MemoryBlockFile m = new MemoryBlockFile("new", new byte[0]);
        Qcow2Create.write(m, o);
        return m.contents();
    }
}
