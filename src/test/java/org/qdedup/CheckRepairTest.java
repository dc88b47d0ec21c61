package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;
import static org.junit.jupiter.api.DynamicTest.dynamicTest;

import java.io.ByteArrayOutputStream;
import java.io.Closeable;
import java.io.IOException;
import java.io.PrintStream;
import java.io.RandomAccessFile;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.function.LongPredicate;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Stream;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.TestFactory;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.cli.Main;

/**
 * A corpus of damaged qcow2 images: each starts as an image qemu-img / qemu-io made (some data, a compressed
 * cluster, sometimes an internal snapshot), then gets a few bytes changed. For each one:
 * <ol>
 *   <li>our {@code check --output=json} must give the counts and exit code {@code qemu-img check} gives;</li>
 *   <li>our {@code check -r leaks} and QEMU's, each on a copy, must agree (exit code, counts, fixed counts);</li>
 *   <li>our {@code check -r} ({@code leaks} for the pure-leak cases, else {@code all}) on a copy must say what it
 *       repaired and leave an image {@code qemu-img check} finds clean, with the guest-visible data (qemu-img
 *       convert -O raw) unchanged;</li>
 *   <li>{@code qemu-img check -r all} runs on another copy to record (in the summary printed at the end) whether
 *       QEMU itself can mend that damage; where it can, its result must hold the same guest data as ours.</li>
 * </ol>
 * As recorded with QEMU 7.2: its {@code -r all} leaves these still broken (exit 2, or 1 where it gives up):
 * copied-on-compressed, l1/l2/snapshot-l2 reserved bits, l2-past-eof, truncated, refblock-unaligned,
 * reftable-entry-reserved-bits and snapshot-l1-unaligned; it mends all the others.
 */
class CheckRepairTest {
    private static final long OFFSET_MASK = 0x00ff_ffff_ffff_fe00L;
    private static final long COPIED = 1L << 63;
    private static final long COMPRESSED = 1L << 62;
    private static final List<String> COUNT_KEYS = List.of("corruptions", "leaks", "check-errors", "allocated-clusters",
            "fragmented-clusters", "compressed-clusters", "image-end-offset", "total-clusters");
    private static final Pattern REPAIRED = Pattern.compile(
            "The following inconsistencies were found and repaired:\\s+(\\d+) leaked clusters\\s+(\\d+) corruptions");
    private static final List<String> SUMMARY = Collections.synchronizedList(new ArrayList<>());

    @TempDir
    Path dir;

    enum Repair { LEAKS, ALL }

    @FunctionalInterface
    interface Damage {
        void apply(Img m) throws IOException;
    }

    /**
     * One damaged image: {@code opts} are extra qemu-img create options, {@code snapshot} takes a qemu-img snapshot
     * (and then rewrites one cluster so that the active layer has refcount-1 and refcount-2 clusters),
     * {@code qemuExit} is what qemu-img check must say (a sanity check that the damage is what we meant).
     */
    record Case(String name, int cs, String opts, boolean snapshot, int qemuExit, Repair repair, Damage damage) {
        String id() {
            return name + "-" + (cs / 1024) + "k";
        }
    }

    static List<Case> cases() {
        List<Case> l = new ArrayList<>();
        for (int cs : new int[]{65536, 4096}) {
            l.add(new Case("leaked-cluster", cs, "", false, 3, Repair.LEAKS, CheckRepairTest::leak));
            l.add(new Case("refcount-0-on-data", cs, "", false, 2, Repair.ALL,
                    m -> m.setRefcount(m.dataSlot(r -> r == 1).cluster(), 0)));
            l.add(new Case("snapshot-refcount-2-to-1", cs, "", true, 2, Repair.ALL,
                    m -> m.setRefcount(m.dataSlot(r -> r == 2).cluster(), 1)));
            l.add(new Case("refcount-1-to-2", cs, "", false, 2, Repair.ALL,
                    m -> m.setRefcount(m.dataSlot(r -> r == 1).cluster(), 2)));
            l.add(new Case("copied-missing", cs, "", false, 2, Repair.ALL, m -> {
                Slot s = m.dataSlot(r -> r == 1);
                assertThat(s.entry() & COPIED).isNotZero();
                m.put64(s.addr(), s.entry() & ~COPIED);
            }));
            l.add(new Case("copied-on-shared", cs, "", true, 2, Repair.ALL, m -> {
                Slot s = m.dataSlot(r -> r == 2);
                assertThat(s.entry() & COPIED).isZero();
                m.put64(s.addr(), s.entry() | COPIED);
            }));
            l.add(new Case("copied-on-compressed", cs, "", false, 2, Repair.ALL, m -> {
                Slot s = m.slots().stream().filter(Slot::compressed).findFirst().orElseThrow();
                m.put64(s.addr(), s.entry() | COPIED);
            }));
            l.add(new Case("l2-reserved-bit56", cs, "", false, 2, Repair.ALL, m -> {
                Slot s = m.dataSlot(r -> r == 1);
                m.put64(s.addr(), s.entry() | 1L << 56);
            }));
            l.add(new Case("truncated", cs, "", false, 2, Repair.ALL, CheckRepairTest::truncateData));
            l.add(new Case("refcount-bits-1-leak", cs, "refcount_bits=1", false, 3, Repair.LEAKS, CheckRepairTest::leak));
        }
        int cs = 65536;
        l.add(new Case("l2-past-eof", cs, "", false, 2, Repair.ALL, m -> {
            Slot s = m.dataSlot(r -> r == 1);
            long beyond = m.alignedSize() + 16L * m.cs;
            m.put64(s.addr(), (s.entry() & ~OFFSET_MASK) | beyond);
        }));
        l.add(new Case("l2-table-on-reftable", cs, "", false, 2, Repair.ALL, m -> m.put64(m.l1Off, m.rtOff | COPIED)));
        l.add(new Case("l1-reserved-bit56", cs, "", false, 2, Repair.ALL, m -> m.put64(m.l1Off, m.u64(m.l1Off) | 1L << 56)));
        l.add(new Case("reftable-entry-reserved-bits", cs, "", false, 2, Repair.ALL,
                m -> m.put64(m.rtOff, m.u64(m.rtOff) | 0x2)));
        l.add(new Case("v2-leak", cs, "compat=0.10", false, 3, Repair.LEAKS, CheckRepairTest::leak));
        l.add(new Case("refcount-bits-64-leak", cs, "refcount_bits=64", false, 3, Repair.LEAKS, CheckRepairTest::leak));
        l.add(new Case("snapshot-leak", cs, "", true, 3, Repair.LEAKS, CheckRepairTest::leak));
        // Beyond the minimum: refcount structures pointing nowhere, shared tables, header flags, snapshots.
        l.add(new Case("refblock-outside-image", cs, "", false, 2, Repair.ALL,
                m -> m.put64(m.rtOff, m.alignedSize() + 8 * m.cs)));
        l.add(new Case("refblock-unaligned", cs, "", false, 1, Repair.ALL,
                m -> m.put64(m.rtOff, m.u64(m.rtOff) + 0x1000)));
        l.add(new Case("reftable-entry-zeroed", cs, "", false, 2, Repair.ALL, m -> m.put64(m.rtOff, 0)));
        l.add(new Case("dirty-bit-leak", cs, "lazy_refcounts=on", false, 3, Repair.LEAKS, m -> {
            m.put64(72, m.u64(72) | 1);
            leak(m);
        }));
        l.add(new Case("corrupt-bit-copied-missing", cs, "", false, 2, Repair.ALL, m -> {
            m.put64(72, m.u64(72) | 2);
            Slot s = m.dataSlot(r -> r == 1);
            m.put64(s.addr(), s.entry() & ~COPIED);
        }));
        l.add(new Case("snapshot-l1-unaligned", cs, "", true, 2, Repair.ALL, m -> {
            long entry = m.u64(64);
            m.put64(entry, m.u64(entry) + 0x200);
        }));
        l.add(new Case("snapshot-l2-reserved-bit56", cs, "", true, 2, Repair.ALL, m -> {
            // An L2 table only the snapshot uses (the active one was copied on write after the snapshot).
            long snapL1 = m.u64(m.u64(64));
            long l2 = m.u64(snapL1) & OFFSET_MASK;
            assertThat(l2).isNotEqualTo(m.u64(m.l1Off) & OFFSET_MASK);
            assertThat(m.u64(l2)).isNotZero();
            m.put64(l2, m.u64(l2) | 1L << 56);
        }));
        for (int c : new int[]{65536, 4096}) {
            l.add(new Case("zero-alloc-unaligned", c, "", false, 2, Repair.ALL, m -> {
                Slot s = m.dataSlot(r -> r == 1);
                m.put64(s.addr(), (s.offset() + 0x200) | COPIED | 1);
            }));
            l.add(new Case("two-l2-entries-one-cluster", c, "", false, 2, Repair.ALL, m -> {
                Slot s = m.dataSlot(r -> r == 1);
                long free = s.addr() + 8;
                while (m.u64(free) != 0) {
                    free += 8;
                }
                m.put64(free, s.entry());
            }));
        }
        l.add(new Case("two-l1-entries-one-l2", 4096, "", false, 2, Repair.ALL, m -> {
            assertThat(m.l1Size).isEqualTo(4);
            assertThat(m.u64(m.l1Off + 24)).isZero();
            m.put64(m.l1Off + 24, m.u64(m.l1Off));
        }));
        return l;
    }

    /** Appends a cluster of garbage to the file and gives it refcount 1: nothing references it. */
    static void leak(Img m) throws IOException {
        long off = m.alignedSize();
        byte[] junk = new byte[(int) m.cs];
        Arrays.fill(junk, (byte) 0xab);
        m.f.seek(off);
        m.f.write(junk);
        m.setRefcount(off >>> m.clusterBits, 1);
    }

    /** Cuts off the two data clusters written last (at guest 5 MiB), which qemu put at the end of the file. */
    static void truncateData(Img m) throws IOException {
        long last = 0;
        for (Slot s : m.slots()) {
            if (!s.compressed()) {
                last = Math.max(last, s.offset());
            }
        }
        assertThat(last + m.cs).as("the last data cluster ends the file").isEqualTo(m.f.length());
        long cut = last - m.cs;
        assertThat(m.slots().stream().anyMatch(s -> !s.compressed() && s.offset() == cut)).isTrue();
        m.f.setLength(cut);
    }

    // ------------------------------------------------------------------------------------------------ the test

    @TestFactory
    Stream<DynamicTest> damagedImages() {
        return cases().stream().map(c -> dynamicTest(c.id(), () -> run(c)));
    }

    @AfterAll
    static void printSummary() {
        System.out.println("CheckRepairTest summary (qemu = qemu-img check, ours = qdedup check; "
                + "c/l/e = corruptions/leaks/check-errors; alloc/frag/comp/end/total):");
        List<String> s = new ArrayList<>(SUMMARY);
        Collections.sort(s);
        s.forEach(line -> System.out.println("  " + line));
    }

    private void run(Case c) throws Exception {
        Path d = Files.createDirectories(dir.resolve(c.id()));
        Path img = d.resolve("damaged.qcow2");
        build(img, c);
        try (Img m = new Img(img)) {
            c.damage().apply(m);
        }

        // 1. Counts and exit code against qemu-img check.
        Qemu.Result q = Qemu.imgRaw(d, "check", "--output=json", img.toString());
        Ours o = ours("check", "--output=json", img.toString());
        assertThat(q.exit()).as("qemu-img check exit on %s (is the damage what we meant?)\n%s", c.id(), q.err())
                .isEqualTo(c.qemuExit());
        assertThat(o.exit).as("our check exit vs qemu-img's on %s\nqemu: %s\nours: %s%s", c.id(), q.err(), o.err, o.out)
                .isEqualTo(q.exit());
        Map<String, Object> qj = q.out().isBlank() ? null : obj(q.out());
        Map<String, Object> oj = o.out.isBlank() ? null : obj(o.out);
        if (qj != null) {
            assertThat(oj).as("our JSON on %s", c.id()).isNotNull();
            List<String> diffs = new ArrayList<>();
            for (String k : COUNT_KEYS) {
                if (get(qj, k) != get(oj, k)) {
                    diffs.add(k + ": qemu " + get(qj, k) + ", ours " + get(oj, k));
                }
            }
            assertThat(diffs).as("counts on %s\nqemu stderr:\n%s\nour stderr:\n%s", c.id(), q.err(), o.err).isEmpty();
        }

        // 2. -r leaks repairs what QEMU's -r leaks repairs (refcounts that are too high; COPIED once all else is
        //    right) and refuses what it refuses (anything that needs a refcount rebuild): same exit code, same counts
        //    left, same leaks-fixed / corruptions-fixed, and qemu-img check then judges both copies alike.
        Path ql = Files.copy(img, d.resolve("qemu-leaks.qcow2"));
        Path ol = Files.copy(img, d.resolve("ours-leaks.qcow2"));
        Qemu.Result qlr = Qemu.imgRaw(d, "check", "-r", "leaks", "--output=json", ql.toString());
        Ours olr = ours("check", "-r", "leaks", "--output=json", ol.toString());
        assertThat(olr.exit).as("our check -r leaks exit vs qemu-img's on %s\nqemu: %s%s\nours: %s%s", c.id(),
                qlr.out(), qlr.err(), olr.out, olr.err).isEqualTo(qlr.exit());
        if (!qlr.out().isBlank()) {
            Map<String, Object> a = obj(qlr.out());
            Map<String, Object> b = obj(olr.out);
            for (String k : List.of("corruptions", "leaks", "check-errors", "leaks-fixed", "corruptions-fixed")) {
                assertThat(get(b, k)).as("%s after -r leaks on %s\nqemu: %s%s\nours: %s%s", k, c.id(), qlr.out(),
                        qlr.err(), olr.out, olr.err).isEqualTo(get(a, k));
            }
        }
        Qemu.Result qlc = Qemu.imgRaw(d, "check", ql.toString());
        Qemu.Result olc = Qemu.imgRaw(d, "check", ol.toString());
        assertThat(olc.exit()).as("qemu-img check after our / qemu's -r leaks on %s\nours: %s%s\nqemu's: %s%s", c.id(),
                olc.out(), olc.err(), qlc.out(), qlc.err()).isEqualTo(qlc.exit());

        // 3. Guest-visible data before any repair; qemu-img may be unable to read a damaged image.
        Path raw0 = d.resolve("before.raw");
        Qemu.Result conv0 = Qemu.imgRaw(d, "convert", "-f", "qcow2", "-O", "raw", img.toString(), raw0.toString());
        boolean readable = conv0.exit() == 0;

        // 4. Our repair on a copy.
        Path mine = Files.copy(img, d.resolve("ours.qcow2"));
        String mode = c.repair() == Repair.LEAKS ? "leaks" : "all";
        Ours r = ours("check", "-r", mode, mine.toString());
        assertThat(r.exit).as("our check -r %s on %s\n%s%s", mode, c.id(), r.out, r.err).isZero();
        Matcher mt = REPAIRED.matcher(r.out);
        assertThat(mt.find()).as("our check -r %s says what it repaired:\n%s", mode, r.out).isTrue();
        long leaksFixed = Long.parseLong(mt.group(1));
        long corruptionsFixed = Long.parseLong(mt.group(2));
        // Everything the check found is repaired, and the message counts it (-r all: found minus left, which is all;
        // -r leaks, used here only where leaks are all there is, counts as QEMU does: one per refcount lowered).
        assertThat(leaksFixed).as("leaked clusters repaired on %s", c.id()).isEqualTo(get(oj, "leaks"));
        assertThat(corruptionsFixed).as("corruptions repaired on %s", c.id()).isEqualTo(get(oj, "corruptions"));
        Qemu.Result after = Qemu.imgRaw(d, "check", "--output=json", mine.toString());
        assertThat(after.exit()).as("qemu-img check after our check -r %s on %s\n%s\nour repair said:\n%s%s", mode,
                c.id(), after.err(), r.out, r.err).isZero();
        String dataNote;
        Path raw1 = d.resolve("after.raw");
        Qemu.img(d, "convert", "-f", "qcow2", "-O", "raw", mine.toString(), raw1.toString());
        if (readable) {
            assertThat(Files.mismatch(raw0, raw1)).as("guest data changed by our repair of %s", c.id()).isEqualTo(-1L);
            dataNote = "data unchanged";
        } else {
            // qemu-img cannot read the damaged image, so there is no reference for its guest data: not compared
            // (but see below: where QEMU's own repair works, both repairs must give the same data).
            dataNote = "data not compared (qemu-img convert fails on the damaged image: "
                    + conv0.err().strip().replace('\n', ' ') + ")";
        }

        // 5. QEMU's own repair: recorded; where it leaves a clean image, the guest data must equal ours.
        Path theirs = Files.copy(img, d.resolve("qemu.qcow2"));
        Qemu.Result qr = Qemu.imgRaw(d, "check", "-r", "all", theirs.toString());
        Qemu.Result qa = Qemu.imgRaw(d, "check", theirs.toString());
        Matcher qm = REPAIRED.matcher(qr.out());
        String qemuFix = qm.find() ? "fixed " + qm.group(1) + "l/" + qm.group(2) + "c" : "fixed nothing";
        if (qa.exit() == 0) {
            Path raw2 = d.resolve("qemu.raw");
            Qemu.img(d, "convert", "-f", "qcow2", "-O", "raw", theirs.toString(), raw2.toString());
            assertThat(Files.mismatch(raw2, raw1)).as("guest data after QEMU's repair vs ours on %s", c.id())
                    .isEqualTo(-1L);
            dataNote += ", same as after qemu's repair";
            Files.delete(raw2);
        }
        Files.deleteIfExists(raw0);
        Files.delete(raw1);

        SUMMARY.add(String.format("%-34s qemu exit %d %s | ours exit %d %s | our -r %s fixed %dl/%dc, %s"
                        + " | qemu -r all: exit %d, %s, recheck exit %d | -r leaks: exit %d both", c.id(), q.exit(),
                counts(qj), o.exit, counts(oj), mode, leaksFixed, corruptionsFixed, dataNote, qr.exit(), qemuFix, qa.exit(),
                qlr.exit()));
    }

    private static String counts(Map<String, Object> j) {
        if (j == null) {
            return "(no JSON)";
        }
        return String.format("c%d/l%d/e%d %d/%d/%d/%d/%d", get(j, "corruptions"), get(j, "leaks"), get(j, "check-errors"),
                get(j, "allocated-clusters"), get(j, "fragmented-clusters"), get(j, "compressed-clusters"),
                get(j, "image-end-offset"), get(j, "total-clusters"));
    }

    /** A key of qemu-img check's JSON; an absent key means 0. */
    private static long get(Map<String, Object> j, String key) {
        Object v = j == null ? null : j.get(key);
        return v == null ? 0 : ((BigDecimal) v).longValueExact();
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> obj(String json) {
        return (Map<String, Object>) Json.parse(json);
    }

    /** A qemu-made image: 8 MiB, data at 0 (3 clusters), 1 MiB, a compressed cluster at 2 MiB, 5 MiB (2 clusters). */
    private static void build(Path img, Case c) {
        String opts = "cluster_size=" + c.cs() + (c.opts().isEmpty() ? "" : "," + c.opts());
        Qemu.img(img.getParent(), "create", "-q", "-f", "qcow2", "-o", opts, img.toString(), "8M");
        long cs = c.cs();
        Qemu.io(img.getParent(), "qcow2", img.toString(), List.of(
                "write -P 0x11 0 " + 3 * cs,
                "write -P 0x22 1M " + cs,
                "write -c -P 0x55 2M " + cs,
                "write -P 0x33 5M " + 2 * cs));
        if (c.snapshot()) {
            Qemu.img(img.getParent(), "snapshot", "-c", "s1", img.toString());
            // Copy-on-write of one cluster: the active layer then has refcount-1 and refcount-2 data clusters.
            Qemu.io(img.getParent(), "qcow2", img.toString(), List.of("write -P 0x44 1M " + cs));
        }
        Qemu.Result ok = Qemu.imgRaw(img.getParent(), "check", img.toString());
        assertThat(ok.exit()).as("qemu-made image is clean before damage: %s", ok.out()).isZero();
    }

    private record Ours(int exit, String out, String err) {
    }

    private static Ours ours(String... args) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        ByteArrayOutputStream err = new ByteArrayOutputStream();
        int rc;
        try (PrintStream o = new PrintStream(out, true, StandardCharsets.UTF_8);
             PrintStream e = new PrintStream(err, true, StandardCharsets.UTF_8)) {
            rc = Main.run(args, o, e);
        }
        return new Ours(rc, out.toString(StandardCharsets.UTF_8), err.toString(StandardCharsets.UTF_8));
    }

    // ------------------------------------------------------------------------------------------------ image edits

    /** An entry of an active L2 table: where it is in the file and what it holds. */
    record Slot(long addr, long entry, int clusterBits) {
        boolean compressed() {
            return (entry & COMPRESSED) != 0;
        }

        long offset() {
            return entry & OFFSET_MASK;
        }

        long cluster() {
            return offset() >>> clusterBits;
        }
    }

    /** Raw access to a qcow2 file's header, L1/L2 tables and refcounts (big-endian, any refcount_order). */
    static final class Img implements Closeable {
        final RandomAccessFile f;
        final int clusterBits;
        final long cs;
        final int order;
        final long l1Off;
        final int l1Size;
        final long rtOff;

        Img(Path p) throws IOException {
            f = new RandomAccessFile(p.toFile(), "rw");
            int version = u32(4);
            clusterBits = u32(20);
            cs = 1L << clusterBits;
            l1Size = u32(36);
            l1Off = u64(40);
            rtOff = u64(48);
            order = version >= 3 ? u32(96) : 4;
        }

        @Override
        public void close() throws IOException {
            f.close();
        }

        int u32(long off) throws IOException {
            f.seek(off);
            return f.readInt();
        }

        long u64(long off) throws IOException {
            f.seek(off);
            return f.readLong();
        }

        void put64(long off, long v) throws IOException {
            f.seek(off);
            f.writeLong(v);
        }

        long alignedSize() throws IOException {
            return (f.length() + cs - 1) & -cs;
        }

        /** Every non-zero entry of the active L2 tables. */
        List<Slot> slots() throws IOException {
            List<Slot> out = new ArrayList<>();
            for (int i = 0; i < l1Size; i++) {
                long l2 = u64(l1Off + 8L * i) & OFFSET_MASK;
                if (l2 == 0) {
                    continue;
                }
                for (int j = 0; j < cs / 8; j++) {
                    long e = u64(l2 + 8L * j);
                    if (e != 0) {
                        out.add(new Slot(l2 + 8L * j, e, clusterBits));
                    }
                }
            }
            return out;
        }

        /** The first active standard data cluster whose stored refcount matches. */
        Slot dataSlot(LongPredicate refcount) throws IOException {
            for (Slot s : slots()) {
                if (!s.compressed() && s.offset() != 0 && refcount.test(refcount(s.cluster()))) {
                    return s;
                }
            }
            throw new AssertionError("no active data cluster with the wanted refcount");
        }

        private long entryPos(long cluster, long[] shiftAndMask) throws IOException {
            int bits = 1 << order;
            long per = cs * 8 / bits;
            long block = u64(rtOff + 8 * (cluster / per)) & 0xffff_ffff_ffff_fe00L;
            assertThat(block).as("refcount block for cluster %d", cluster).isNotZero();
            long bitPos = (cluster % per) * bits;
            shiftAndMask[0] = bits >= 8 ? 0 : bitPos % 8;
            shiftAndMask[1] = bits == 64 ? -1L : (1L << bits) - 1;
            return block + bitPos / 8;
        }

        long refcount(long cluster) throws IOException {
            long[] sm = new long[2];
            long pos = entryPos(cluster, sm);
            int bytes = Math.max(1, (1 << order) / 8);
            f.seek(pos);
            long v = 0;
            for (int k = 0; k < bytes; k++) {
                v = v << 8 | f.readUnsignedByte();
            }
            return (v >>> sm[0]) & sm[1];
        }

        void setRefcount(long cluster, long value) throws IOException {
            long[] sm = new long[2];
            long pos = entryPos(cluster, sm);
            int bits = 1 << order;
            if (bits < 8) {
                f.seek(pos);
                int b = f.readUnsignedByte();
                b = (int) ((b & ~(sm[1] << sm[0])) | ((value & sm[1]) << sm[0]));
                f.seek(pos);
                f.write(b);
                return;
            }
            int bytes = bits / 8;
            byte[] be = new byte[bytes];
            for (int k = bytes - 1; k >= 0; k--) {
                be[k] = (byte) value;
                value >>>= 8;
            }
            f.seek(pos);
            f.write(be);
        }
    }
}
