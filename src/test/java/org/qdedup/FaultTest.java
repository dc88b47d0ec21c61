package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.EnumSet;
import java.util.List;
import java.util.Random;
import java.util.Set;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.ImageOps;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;
import org.qdedup.io.FaultyFile;
import org.qdedup.io.FaultyFile.Errno;
import org.qdedup.io.FaultyFile.Op;
import org.qdedup.io.MemoryBlockFile;
import org.qdedup.io.PowerCutFile;

/**
 * Full disks and I/O errors, in the style of H2: a workload of writes, overwrites, zeroing, discards and flushes
 * runs once to count its file operations, then once for every N with the N-th one failing: a full disk (every
 * write and growing truncate fails with ENOSPC from the N-th on, until space returns two requests later), a
 * transient EIO on the N-th write, flush, truncate or punch-hole. Each time: the request that met the failure gets
 * an IOException naming the error (no other request fails, nothing hangs); no cluster it touched is published
 * without its data; a failed fsync (or header write) makes the image refuse writes, anything else leaves it
 * working; then the image reopened from what reached the file checks clean under qemu-img (leaks repaired by
 * {@code check -r leaks} only after a fatal failure on an image without the dirty bit), keeps every write
 * acknowledged before the last successful flush, and its dedup index has no stale entry.
 * {@code -Dqdedup.faults.stride=K} tries every K-th fault point (1 by default: all of them).
 */
class FaultTest {
    @TempDir
    Path dir;

    static final int CS = 4096;
    static final long SIZE = 4L << 20;
    static final int STRIDE = Integer.getInteger("qdedup.faults.stride", 1);

    /** A guest request: WRITE data at off, ZERO (unmap or not), DISCARD, FLUSH. */
    private record Req(String kind, long off, long len, byte[] data, boolean unmap) {
    }

    /** A fault to inject: which calls fail, with what, and whether the disk stays full until lifted. */
    private record Fault(String name, Errno errno, boolean persistent, Set<Op> kinds) {
    }

    private static final List<Fault> FAULTS = List.of(
            new Fault("full disk", Errno.ENOSPC, true, EnumSet.of(Op.WRITE, Op.TRUNCATE)),
            new Fault("EIO on a write", Errno.EIO, false, EnumSet.of(Op.WRITE)),
            new Fault("EIO on a flush", Errno.EIO, false, EnumSet.of(Op.FLUSH)),
            new Fault("EIO on a truncate", Errno.EIO, false, EnumSet.of(Op.TRUNCATE)),
            new Fault("EIO on a punch-hole", Errno.EIO, false, EnumSet.of(Op.PUNCH_HOLE)));

    /**
     * What the guest may read: {@code now} per byte, or for bytes of a failed request also {@code alt} (what it
     * would have written), or anything where it failed writing in place ({@code any}).
     */
    private static final class Model {
        final byte[] now;
        final byte[] alt;
        final boolean[] hasAlt;
        final boolean[] any;

        Model(byte[] initial) {
            now = initial.clone();
            alt = new byte[initial.length];
            hasAlt = new boolean[initial.length];
            any = new boolean[initial.length];
        }

        Model(Model m) {
            now = m.now.clone();
            alt = m.alt.clone();
            hasAlt = m.hasAlt.clone();
            any = m.any.clone();
        }

        void done(Req q) {
            int a = (int) q.off(), b = (int) (q.off() + q.len());
            if (q.kind().equals("WRITE") || q.kind().equals("CWRITE")) {
                System.arraycopy(q.data(), 0, now, a, q.data().length);
            } else if (!q.kind().equals("FLUSH")) {
                Arrays.fill(now, a, b, (byte) 0);
            }
            if (!q.kind().equals("FLUSH")) {
                Arrays.fill(hasAlt, a, b, false);
                Arrays.fill(any, a, b, false);
            }
        }

        /** The request failed: each byte it covers reads old or new (anything in a cluster written in place). */
        void failed(Req q, boolean[] inPlace) {
            if (q.kind().equals("FLUSH")) {
                return;
            }
            Model m = new Model(this);
            m.done(q);
            for (int i = (int) q.off(); i < q.off() + q.len(); i++) {
                alt[i] = m.now[i];
                hasAlt[i] = true;
                any[i] |= inPlace[(int) (i / CS - q.off() / CS)];
            }
        }

        /** The first byte (from {@code from}, where {@code free} is false) that is none of the allowed values. */
        int mismatch(byte[] got, boolean[] free) {
            for (int i = 0; i < got.length; i++) {
                if ((free == null || !free[i]) && got[i] != now[i] && !(hasAlt[i] && got[i] == alt[i]) && !any[i]) {
                    return i;
                }
            }
            return -1;
        }
    }

    private static List<Req> workload(Random r, byte[][] pool, boolean dedup, boolean compressed) {
        List<Req> out = new ArrayList<>();
        for (int i = 0; i < 44; i++) {
            int k = r.nextInt(16);
            long off = r.nextInt(4) == 0 ? r.nextInt((int) SIZE - 3 * CS) : (long) r.nextInt(640) * CS;
            long len = Math.min(SIZE - off, switch (r.nextInt(4)) {
                case 0 -> 1 + r.nextInt(3000);
                case 1 -> CS;
                default -> (long) CS * (1 + r.nextInt(6));
            });
            if (k < 9 && compressed && r.nextBoolean()) {
                // One whole cluster written compressed (as convert -c does): a short random run repeated, so that
                // it compresses.
                off = off / CS * CS;
                byte[] data = new byte[CS];
                byte[] run = new byte[8 + r.nextInt(56)];
                r.nextBytes(run);
                for (int b = 0; b < CS; b++) {
                    data[b] = run[b % run.length];
                }
                out.add(new Req("CWRITE", off, CS, data, false));
            } else if (k < 9) {
                byte[] data = new byte[(int) len];
                r.nextBytes(data);
                if (dedup) {
                    for (long c = (off + CS - 1) / CS * CS; c + CS <= off + len; c += CS) {
                        System.arraycopy(pool[r.nextInt(pool.length)], 0, data, (int) (c - off), CS);
                    }
                }
                out.add(new Req("WRITE", off, len, data, false));
            } else if (k < 11) {
                out.add(new Req("ZERO", off, len, null, r.nextBoolean()));
            } else if (k < 13) {
                out.add(new Req("DISCARD", off, len, null, true));
            } else {
                out.add(new Req("FLUSH", 0, 0, null, false));
            }
        }
        return out;
    }

    private static void apply(Qcow2Image q, Req r) throws IOException {
        switch (r.kind()) {
            case "WRITE" -> q.write(ByteBuffer.wrap(r.data()), r.off());
            case "CWRITE" -> q.writer().writeCompressed(ByteBuffer.wrap(r.data()), r.off());
            case "ZERO" -> q.writeZeroes(r.off(), r.len(), r.unmap());
            case "DISCARD" -> q.discard(r.off(), r.len());
            default -> q.flush();
        }
    }

    /** Where each cluster the request covers is mapped (type and host offset), as the open image says. */
    private static long[] mapping(Qcow2Image q, Req r) throws IOException {
        if (r.kind().equals("FLUSH")) {
            return new long[0];
        }
        long first = r.off() / CS, last = (r.off() + r.len() - 1) / CS;
        long[] m = new long[(int) (last - first + 1)];
        for (long c = first; c <= last; c++) {
            Qcow2Image.Mapping x = q.map(c * CS, CS);
            m[(int) (c - first)] = x.hostOffset() * 16 + x.type().ordinal();
        }
        return m;
    }

    /** An image as the variant has it before the workload: some data, L2 tables, maybe a snapshot, maybe dedup. */
    private byte[] initial(String variant, byte[] model, byte[][] pool) throws Exception {
        Path p = dir.resolve("initial.qcow2");
        if (variant.contains("snapshot")) {
            Qemu.img(dir, "create", "-f", "qcow2", "-o", "cluster_size=4k", p.toString(), Long.toString(SIZE));
            Qemu.io(dir, "qcow2", p.toString(), List.of("write -P 0x11 0 512k", "write -P 0x22 1M 256k"));
            Qemu.img(dir, "snapshot", "-c", "before", p.toString());
            Arrays.fill(model, 0, 512 << 10, (byte) 0x11);
            Arrays.fill(model, 1 << 20, (1 << 20) + (256 << 10), (byte) 0x22);
        } else {
            MemoryBlockFile m = new MemoryBlockFile("new", new byte[0]);
            CreateOptions o = CreateOptions.defaults(SIZE).withClusterBits(12);
            Qcow2Create.write(m, variant.contains("refcount64") ? o.withRefcountOrder(6) : o);
            Files.write(p, m.contents());
        }
        if (variant.contains("refcount64")) {
            // 64-bit refcounts: a block covers 2 MiB. Fill the host file up to just below that, so that the workload's
            // allocations need a new refcount block (and fail while creating it).
            try (Qcow2Image q = Images.openWritable(p.toString(), OpenOptions.defaults())) {
                byte[] d = new byte[500 * CS];
                new Random(7).nextBytes(d);
                q.write(ByteBuffer.wrap(d), 0);
                System.arraycopy(d, 0, model, 0, d.length);
            }
        }
        if (variant.contains("dedup")) {
            ImageOps.enableDedup(p.toString());
        }
        // Some data of our own, so that the workload overwrites in place, shares and frees.
        try (Qcow2Image q = Images.openWritable(p.toString(), OpenOptions.defaults())) {
            for (int i = 0; i < 24; i++) {
                byte[] d = pool[i % pool.length];
                long off = (long) (i * 5 % 96 + 160) * CS;
                q.write(ByteBuffer.wrap(d), off);
                System.arraycopy(d, 0, model, (int) off, CS);
            }
        }
        Files.deleteIfExists(dir.resolve("initial.qcow2" + org.qdedup.dedup.DedupSidecar.SUFFIX));
        return Files.readAllBytes(p);
    }

    @ParameterizedTest(name = "{0}")
    @ValueSource(strings = {"plain", "plain-refcount64", "dedup", "dedup-snapshot", "compressed"})
    @Timeout(1200)
    void everyFailingCallFailsItsRequestCleanlyAndTheImageSurvives(String variant) throws Exception {
        Random r = new Random(variant.hashCode() * 31L + WriterModelTest.SEED);
        boolean dedup = variant.contains("dedup");
        byte[][] pool = new byte[5][CS];
        for (byte[] p : pool) {
            r.nextBytes(p);
        }
        byte[] model0 = new byte[(int) SIZE];
        byte[] initial = initial(variant, model0, pool);
        List<Req> work = workload(r, pool, dedup, variant.contains("compressed"));
        // A dry run counts the calls of each kind the workload makes (open and close included).
        FaultyFile dry = new FaultyFile(new MemoryBlockFile("dry", initial));
        dry.failAt(-1, Errno.EIO, false, EnumSet.noneOf(Op.class));
        try (Qcow2Image q = Images.openWritable(dry)) {
            for (Req q1 : work) {
                apply(q, q1);
            }
        }
        int runs = 0, failedRequests = 0, fatal = 0, reopened = 0;
        for (Fault f : FAULTS) {
            long calls = dry.trace().stream().filter(f.kinds()::contains).count();
            for (long n = 1; n <= calls; n += STRIDE) {
                Outcome o = run(variant, f, n, initial, model0, work, pool);
                runs++;
                failedRequests += o.failedRequests;
                fatal += o.fatal ? 1 : 0;
                reopened += o.statesChecked;
            }
        }
        System.out.printf("fault points (%s): %d runs over %d file calls, %d failed requests, %d fatal, %d reopened states "
                + "checked: corruptions 0, flushed bytes lost 0, stale index entries 0%n", variant, runs, dry.trace().size(),
                failedRequests, fatal, reopened);
        assertThat(runs).isGreaterThan(80); // the smallest variant (dedup) makes about 57 file calls
    }

    private record Outcome(int failedRequests, boolean fatal, int statesChecked) {
    }

    private Outcome run(String variant, Fault f, long n, byte[] initial, byte[] model0, List<Req> work, byte[][] pool)
            throws Exception {
        String at = variant + ", " + f.name() + " at call " + n;
        PowerCutFile pc = new PowerCutFile("f.qcow2", initial);
        FaultyFile ff = new FaultyFile(pc);
        Model model = new Model(model0);
        Model flushed = new Model(model0);
        boolean[] touched = new boolean[(int) SIZE]; // since the last successful flush
        boolean fatal = false, closed = true;
        int failedRequests = 0, sinceTrip = -1;
        Qcow2Image q = Images.openWritable(ff);
        ff.failAt(n, f.errno(), f.persistent(), f.kinds());
        try {
            for (int i = 0; i < work.size(); i++) {
                Req req = work.get(i);
                String what = at + ", request " + i + " (" + req.kind() + " " + req.off() + "+" + req.len() + ")";
                if (fatal) {
                    try {
                        apply(q, req);
                        throw new AssertionError(what + ": an image unusable for writing accepted a request");
                    } catch (IOException e) {
                        assertThat(e.getMessage()).as(what).contains("unusable for writing");
                    }
                    continue;
                }
                long[] before = mapping(q, req);
                try {
                    apply(q, req);
                    model.done(req);
                    if (req.kind().equals("FLUSH")) {
                        flushed = new Model(model);
                        Arrays.fill(touched, false);
                    }
                } catch (IOException e) {
                    assertThat(ff.tripped()).as("%s: failed without a fault: %s", what, e).isTrue();
                    assertThat(e.getMessage()).as(what).contains(f.errno().message);
                    failedRequests++;
                    long[] after = mapping(q, req);
                    boolean[] inPlace = new boolean[before.length];
                    for (int c = 0; c < before.length; c++) {
                        // Written in place (same host cluster before and after): the bytes are undefined, as on a disk.
                        inPlace[c] = before[c] == after[c] && before[c] / 16 != 0;
                    }
                    model.failed(req, inPlace);
                    fatal = !usable(q);
                    assertThat(fatal || ff.firstFailed() != Op.FLUSH)
                            .as("%s: a failed fsync must end the session (a later one that succeeds proves nothing)", what)
                            .isTrue();
                    if (fatal) {
                        boolean allowed = ff.firstFailed() == Op.FLUSH || (ff.firstFailed() == Op.WRITE && ff.firstFailedPos() == 0);
                        assertThat(allowed).as("%s: only a failed fsync or header write may end the session (%s at %d)",
                                what, ff.firstFailed(), ff.firstFailedPos()).isTrue();
                    }
                    checkPublished(q, req, before, after, model, what);
                }
                if (!req.kind().equals("FLUSH")) {
                    Arrays.fill(touched, (int) req.off(), (int) (req.off() + req.len()), true);
                }
                if (ff.tripped() && ++sinceTrip == 2) {
                    ff.lift(); // space is back: the open image goes on
                }
            }
            ff.lift();
            if (!fatal) {
                assertContent(q, model, null, at + ": open image after the workload");
                assertThat(q.writer().staleDedupEntries()).as(at + ": stale index entries").isZero();
            }
        } finally {
            try {
                q.close();
            } catch (IOException e) {
                assertThat(ff.tripped()).as("%s: close failed without a fault: %s", at, e).isTrue();
                closed = false;
            }
        }
        int states = 0;
        if (!fatal && closed) {
            byte[] disk = pc.crashImage(pc.opCount(), PowerCutFile.Mode.DROP_UNFLUSHED, new Random(0));
            reopen(disk, at + ", closed", model, null, pool, false);
            states++;
        } else {
            // A failed sync: what is on disk is any state a crash could leave since the last sync that succeeded.
            byte[] live = new byte[(int) pc.size()];
            pc.read(ByteBuffer.wrap(live), 0);
            List<byte[]> disks = List.of(live, pc.crashImage(pc.opCount(), PowerCutFile.Mode.DROP_UNFLUSHED, new Random(n)),
                    pc.crashImage(pc.opCount(), PowerCutFile.Mode.RANDOM_SUBSET, new Random(n)));
            for (byte[] disk : disks) {
                reopen(disk, at + ", crash state " + states, flushed, touched, pool, !variant.contains("dedup"));
                states++;
            }
        }
        return new Outcome(failedRequests, fatal || !closed, states);
    }

    /** Whether the image still takes writes (a write of nothing checks only that). */
    private static boolean usable(Qcow2Image q) {
        try {
            q.write(ByteBuffer.allocate(0), 0);
            return true;
        } catch (IOException e) {
            return false;
        }
    }

    /** A cluster the failed request mapped anew must hold the request's data: nothing is published without it. */
    private static void checkPublished(Qcow2Image q, Req req, long[] before, long[] after, Model model, String what)
            throws IOException {
        long first = req.off() / CS;
        for (int c = 0; c < before.length; c++) {
            if (before[c] == after[c]) {
                continue;
            }
            long g = (first + c) * CS;
            ByteBuffer got = ByteBuffer.allocate(CS);
            q.read(got, g);
            Model m = new Model(model);
            for (int i = 0; i < CS; i++) {
                m.now[(int) g + i] = m.hasAlt[(int) g + i] ? m.alt[(int) g + i] : m.now[(int) g + i];
            }
            assertThat(Arrays.equals(got.array(), 0, CS, m.now, (int) g, (int) g + CS))
                    .as("%s: guest cluster %d was mapped anew (%d -> %d) but does not hold the new data", what,
                            first + c, before[c] / 16, after[c] / 16).isTrue();
        }
    }

    private static void assertContent(Qcow2Image q, Model model, boolean[] free, String what) throws IOException {
        ByteBuffer got = ByteBuffer.allocate((int) SIZE);
        q.read(got, 0);
        int bad = model.mismatch(got.array(), free);
        assertThat(bad).as("%s: guest byte %d is %d, expected %d", what, bad, bad < 0 ? 0 : got.get(bad),
                bad < 0 ? 0 : model.now[bad]).isEqualTo(-1);
    }

    /**
     * The image as the file holds it: repaired at a read-write open when dirty, qemu-img check clean (after
     * {@code check -r leaks} only when {@code leaksAllowed}), content as the model says (bytes in {@code free}
     * excepted), no stale dedup index entry, and dedup still shares what is written next.
     */
    private void reopen(byte[] disk, String what, Model model, boolean[] free, byte[][] pool, boolean leaksAllowed)
            throws Exception {
        Path img = dir.resolve("f.qcow2");
        Files.write(img, disk);
        Files.deleteIfExists(dir.resolve("f.qcow2" + org.qdedup.dedup.DedupSidecar.SUFFIX));
        Images.openWritable(img.toString(), OpenOptions.defaults()).close();
        Qemu.Result check = Qemu.imgRaw(dir, "check", img.toString());
        if (leaksAllowed && check.exit() == 3) {
            Qemu.img(dir, "check", "-r", "leaks", img.toString());
            check = Qemu.imgRaw(dir, "check", img.toString());
        }
        assertThat(check.exit()).as("%s: qemu-img check%n%s%s", what, check.out(), check.err()).isZero();
        try (Qcow2Image q = Images.openWritable(img.toString(), OpenOptions.defaults())) {
            assertContent(q, model, free, what);
            assertThat(q.writer().staleDedupEntries()).as(what + ": stale index entries").isZero();
            if (q.writer().dedupCounters() != null) {
                long hits0 = q.writer().dedupCounters().hits;
                for (int j = 0; j < 2 * pool.length; j++) {
                    q.write(ByteBuffer.wrap(pool[j % pool.length]), (long) (900 + j) * CS);
                }
                assertThat(q.writer().dedupCounters().hits - hits0).as(what + ": pool contents written twice share")
                        .isGreaterThanOrEqualTo(pool.length);
            }
        }
        FormatMatrixTest.assertClean(dir, img.toString());
    }
}
