package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;
import static org.assertj.core.api.Assertions.fail;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.LinkOption;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.MethodSource;
import org.junit.jupiter.params.provider.ValueSource;
import org.qdedup.cli.Main;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/**
 * The format matrix against QEMU 7.2: every image our engine writes (cluster sizes, v2/v3, refcount widths, extended
 * L2, compression, backing files, internal snapshots) is clean and reads as an in-memory model says; snapshots,
 * commit, rebase, resize and {@code convert -c} agree with what qemu-img does on identical inputs.
 */
class FormatMatrixTest {
    static final long SEED = Long.getLong("qdedup.seed", 20261125L);

    @TempDir
    Path dir;

    // ---- helpers ------------------------------------------------------------------------------------------------

    record Run(List<String> args, int rc, String out, String err) {
        Run ok() {
            assertThat(rc).as("qdedup %s exit; stderr: %s", String.join(" ", args), err).isZero();
            return this;
        }

        /** Exit 1 and exactly one line on stderr, "qdedup: ...". */
        Run failsWithOneLine() {
            assertThat(rc).as("qdedup %s exit; stdout: %s; stderr: %s", String.join(" ", args), out, err).isEqualTo(1);
            assertThat(err).as("stderr of qdedup %s", String.join(" ", args)).startsWith("qdedup: ").endsWith("\n");
            assertThat(err.strip()).as("one line").doesNotContain("\n");
            return this;
        }
    }

    static Run cli(String... args) {
        ByteArrayOutputStream o = new ByteArrayOutputStream(), e = new ByteArrayOutputStream();
        int rc = Main.run(args, new PrintStream(o, true, StandardCharsets.UTF_8), new PrintStream(e, true, StandardCharsets.UTF_8));
        return new Run(List.of(args), rc, o.toString(StandardCharsets.UTF_8), e.toString(StandardCharsets.UTF_8));
    }

    private String p(String name) {
        return dir.resolve(name).toString();
    }

    static void assertClean(Path d, String img) {
        Qemu.Result r = Qemu.imgRaw(d, "check", img);
        assertThat(r.exit()).as("qemu-img check %s exit (0 clean, 2 corrupt, 3 leaks):%n%s%s", img, r.out(), r.err()).isZero();
    }

    static Object infoJson(Path d, String img) {
        return Json.parse(Qemu.img(d, "info", "--output=json", img));
    }

    static long virtualSize(Path d, String img) {
        return ((BigDecimal) Json.at(infoJson(d, img), "virtual-size")).longValueExact();
    }

    /** qemu-img compare against the model (as a raw file) and the same virtual size. */
    void assertContent(String img, byte[] model, String what) throws IOException {
        Path raw = dir.resolve("expect.raw");
        Files.write(raw, model);
        Qemu.Result r = Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", img, raw.toString());
        assertThat(r.exit()).as("%s: qemu-img compare %s with the model: %s%s", what, img, r.out(), r.err()).isZero();
        assertThat(virtualSize(dir, img)).as("%s: virtual size of %s", what, img).isEqualTo(model.length);
        Files.delete(raw);
    }

    /** An internal snapshot read by qemu-img ({@code convert -l snapshot.name=}) equals the model taken with it. */
    void assertSnapshot(String img, String name, byte[] model) throws IOException {
        Path out = dir.resolve("snap-out.raw");
        Files.deleteIfExists(out);
        Qemu.img(dir, "convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=" + name, img, out.toString());
        long m = Files.mismatch(out, writeTemp(model));
        assertThat(m).as("snapshot %s of %s: first mismatch with the model taken with it", name, img).isEqualTo(-1);
        Files.delete(out);
    }

    private Path writeTemp(byte[] data) throws IOException {
        Path t = dir.resolve("tmp-model.raw");
        Files.write(t, data);
        return t;
    }

    @SuppressWarnings("unchecked")
    static List<Map<String, Object>> mapJson(Path d, String img) {
        return (List<Map<String, Object>>) Json.parse(Qemu.img(d, "map", "--output=json", img));
    }

    static long num(Map<String, Object> e, String k) {
        return ((BigDecimal) e.get(k)).longValueExact();
    }

    /**
     * qemu-img map without host offsets, adjacent records with the same flags merged (offsets differ by tool). A
     * range that reads as zeros without data is one record whatever its "present" says: qemu-img's write-zeroes sets
     * the zero flag on an unallocated cluster of an image without a backing file (present: true) where ours leaves it
     * unallocated (present: false); both read zeros, and no backing file can show through either.
     */
    static List<String> normalizedMap(Path d, String img) {
        List<String> out = new ArrayList<>();
        long curStart = -1, curLen = 0;
        String curKey = null;
        for (Map<String, Object> e : mapJson(d, img)) {
            boolean zeroOnly = Boolean.TRUE.equals(e.get("zero")) && !Boolean.TRUE.equals(e.get("data"));
            String key = "depth=" + e.get("depth") + (zeroOnly ? "" : " present=" + e.get("present")) + " zero=" + e.get("zero")
                    + " data=" + e.get("data");
            if (key.equals(curKey) && curStart + curLen == num(e, "start")) {
                curLen += num(e, "length");
                continue;
            }
            if (curKey != null) {
                out.add(curStart + "+" + curLen + " " + curKey);
            }
            curKey = key;
            curStart = num(e, "start");
            curLen = num(e, "length");
        }
        if (curKey != null) {
            out.add(curStart + "+" + curLen + " " + curKey);
        }
        return out;
    }

    static Map<String, Object> extentAt(List<Map<String, Object>> map, long off) {
        for (Map<String, Object> e : map) {
            if (num(e, "start") <= off && off < num(e, "start") + num(e, "length")) {
                return e;
            }
        }
        throw new AssertionError("no map extent covers " + off + ": " + map);
    }

    /** Fills with random bytes, one repeated byte, or compressible "text" (words from a small vocabulary). */
    static void fillData(Random r, byte[] b, int off, int len) {
        switch (r.nextInt(3)) {
            case 0 -> {
                byte[] t = new byte[len];
                r.nextBytes(t);
                System.arraycopy(t, 0, b, off, len);
            }
            case 1 -> Arrays.fill(b, off, off + len, (byte) (1 + r.nextInt(255)));
            default -> words(r, b, off, len);
        }
    }

    private static final String[] VOCAB = ("qcow2 cluster refcount table snapshot backing file header extension "
            + "compressed zlib zstd guest host offset L1 L2 subcluster allocated zero data image chain commit rebase "
            + "resize shrink grow the a of to in and is for with static int long void return if else while").split(" ");

    static void words(Random r, byte[] b, int off, int len) {
        int p = off, end = off + len;
        while (p < end) {
            byte[] w = (VOCAB[r.nextInt(VOCAB.length)] + (r.nextInt(12) == 0 ? "\n" : " ")).getBytes(StandardCharsets.US_ASCII);
            int n = Math.min(w.length, end - p);
            System.arraycopy(w, 0, b, p, n);
            p += n;
        }
    }

    static long lengthFor(Random r, long cs) {
        return switch (r.nextInt(5)) {
            case 0 -> 1 + r.nextInt(700);
            case 1 -> cs;
            case 2 -> 512L * (1 + r.nextInt(16));
            case 3 -> cs * (1 + r.nextInt(2)) + (r.nextBoolean() ? 0 : r.nextInt(4096));
            default -> 1 + r.nextInt((int) Math.min(3 * cs + 1000, 1 << 20));
        };
    }

    /** Random writes, write-zeroes, discards and flushes in [0, limit) through the library, mirrored in the model. */
    static void randomOps(Qcow2Image q, byte[] model, Random r, int n, long limit, long cs) throws IOException {
        for (int i = 0; i < n; i++) {
            int kind = r.nextInt(10);
            long off = WriterModelTest.randomOffset(r, limit, cs);
            long len = Math.min(limit - off, lengthFor(r, cs));
            if (kind < 6) {
                byte[] data = new byte[(int) len];
                fillData(r, data, 0, data.length);
                q.write(ByteBuffer.wrap(data), off);
                System.arraycopy(data, 0, model, (int) off, (int) len);
            } else if (kind < 8) {
                q.writeZeroes(off, len, r.nextBoolean());
                Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
            } else if (kind < 9) {
                q.discard(off, len);
                Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
            } else {
                q.flush();
            }
            if (i % 40 == 0) {
                long ro = WriterModelTest.randomOffset(r, model.length, cs);
                long rl = Math.min(model.length - ro, lengthFor(r, cs) * 2);
                WriterModelTest.assertRange(q, model, ro, rl);
            }
        }
    }

    static void write(Qcow2Image q, byte[] model, long off, byte[] data) throws IOException {
        q.write(ByteBuffer.wrap(data), off);
        System.arraycopy(data, 0, model, (int) off, data.length);
    }

    static Qcow2Image open(String img) throws IOException {
        return Images.openWritable(img, OpenOptions.defaults());
    }

    /** Content of a backing file: the first 60% all data (text or random), the rest a mix of data and zeros. */
    static byte[] backingContent(Random r, int size) {
        byte[] b = new byte[size];
        int chunk = 64 << 10;
        for (int off = 0; off < size; off += chunk) {
            int n = Math.min(chunk, size - off);
            if (off < size * 6L / 10) {
                if (r.nextBoolean()) {
                    words(r, b, off, n);
                } else {
                    byte[] t = new byte[n];
                    r.nextBytes(t);
                    System.arraycopy(t, 0, b, off, n);
                }
            } else if (r.nextInt(3) != 0) {
                fillData(r, b, off, n);
            }
        }
        return b;
    }

    /** Whether qemu-img can take a snapshot of (a copy of) the image: the oracle for refcount overflow. */
    boolean qemuCanSnapshot(String img) throws IOException {
        Path copy = dir.resolve("oracle-copy.qcow2");
        Files.copy(Path.of(img), copy, StandardCopyOption.REPLACE_EXISTING);
        int rc = Qemu.imgRaw(dir, "snapshot", "-c", "oracle", copy.toString()).exit();
        Files.delete(copy);
        return rc == 0;
    }

    // ---- 1. the matrix ------------------------------------------------------------------------------------------

    /**
     * One configuration.
     *
     * @param backing     null, "qcow2" or "raw"
     * @param compression null, "zlib" or "zstd" (the image is then made by {@code convert -c})
     * @param snapshots   snapshot attempts (refcount widths 1 and 2 refuse some: checked against qemu-img)
     */
    record Cfg(String name, int bits, int version, int refBits, boolean extL2, String compression, String backing, int snapshots) {
        @Override
        public String toString() {
            return name;
        }
    }

    static Stream<Arguments> matrix() {
        List<Cfg> l = new ArrayList<>();
        String[] backings = {null, "qcow2", "raw"};
        int k = 0;
        for (int bits : new int[]{9, 12, 16, 21}) {
            for (int v : new int[]{2, 3}) {
                String b = backings[k++ % 3];
                l.add(new Cfg("cs=" + (1 << bits) + " v" + v + " backing=" + b, bits, v, 16, false, null, b, 3));
            }
        }
        for (int rb = 1; rb <= 64; rb *= 2) {
            String b = rb == 4 ? "qcow2" : rb == 32 ? "raw" : null;
            l.add(new Cfg("cs=65536 refcount_bits=" + rb + " backing=" + b, 16, 3, rb, false, null, b, 3));
        }
        l.add(new Cfg("extended_l2 cs=16384 backing=qcow2", 14, 3, 16, true, null, "qcow2", 2));
        l.add(new Cfg("extended_l2 cs=65536 backing=raw", 16, 3, 16, true, null, "raw", 2));
        l.add(new Cfg("extended_l2 cs=65536 backing=none", 16, 3, 16, true, null, null, 2));
        l.add(new Cfg("extended_l2 cs=2097152 backing=qcow2", 21, 3, 16, true, null, "qcow2", 2));
        for (String c : new String[]{"zlib", "zstd"}) {
            for (int bits : new int[]{12, 16, 21}) {
                l.add(new Cfg("convert -c " + c + " cs=" + (1 << bits), bits, 3, 16, false, c, null, 2));
            }
        }
        l.add(new Cfg("convert -c zlib cs=65536 v2", 16, 2, 16, false, "zlib", null, 2));
        l.add(new Cfg("convert -c zstd cs=65536 extended_l2", 16, 3, 16, true, "zstd", null, 2));
        return l.stream().map(Arguments::of);
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("matrix")
    void matrixImagesAreCleanAndMatchTheModel(Cfg c) throws Exception {
        long cs = 1L << c.bits;
        long size = c.bits == 21 ? 24L << 20 : c.bits == 9 ? 3L << 20 : 4L << 20;
        int ops = c.bits == 21 ? 100 : 240;
        Random r = new Random(SEED ^ c.name.hashCode());
        byte[] model = new byte[(int) size];
        String img = p("t.qcow2");
        String opts = "cluster_size=" + cs + ",compat=" + (c.version == 2 ? "0.10" : "1.1") + ",refcount_bits=" + c.refBits
                + (c.extL2 ? ",extended_l2=on" : "");

        // Backing file, written by QEMU (qcow2) or as a plain file (raw).
        if (c.backing != null) {
            int bsize = (int) (size * 3 / 4) & ~511;
            byte[] b = backingContent(r, bsize);
            System.arraycopy(b, 0, model, 0, bsize);
            Files.write(dir.resolve("base.raw"), b);
            if (c.backing.equals("qcow2")) {
                Qemu.img(dir, "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", p("base.raw"), p("base.qcow2"));
                Files.delete(dir.resolve("base.raw"));
            }
        }

        if (c.compression != null) {
            // The image starts as `convert -c` of compressible data.
            Path src = dir.resolve("src.raw");
            for (long off = 0; off < size; off += 64 << 10) {
                int n = (int) Math.min(64 << 10, size - off);
                switch (r.nextInt(6)) {
                    case 0 -> { } // zeros
                    case 1 -> fillData(r, model, (int) off, n);
                    default -> words(r, model, (int) off, n);
                }
            }
            Files.write(src, model);
            cli("convert", "-c", "-O", "qcow2", "-o", opts + ",compression_type=" + c.compression, src.toString(), img).ok();
            Files.delete(src);
            Object chk = Json.parse(Qemu.img(dir, "check", "--output=json", img));
            Object compressed = Json.at(chk, "compressed-clusters");
            assertThat(compressed).as("compressed-clusters in qemu-img check --output=json after convert -c: %s", chk).isNotNull();
            assertThat(((BigDecimal) compressed).longValue()).as("compressed-clusters").isPositive();
            Object info = infoJson(dir, img);
            assertThat(Json.at(info, "format-specific", "data", "compression-type")).as("compression type")
                    .isEqualTo(c.compression);
            assertClean(dir, img);
            assertContent(img, model, "after convert -c");
            // Partial overwrites of compressed clusters: the rest of each cluster must survive decompression.
            try (Qcow2Image q = open(img)) {
                for (int i = 0; i < 8; i++) {
                    long off = (long) (r.nextDouble() * (size / cs)) * cs + 1000 + r.nextInt(2000);
                    byte[] d = new byte[100 + r.nextInt(1500)];
                    fillData(r, d, 0, d.length);
                    write(q, model, Math.min(off, size - d.length), d);
                }
            }
            assertClean(dir, img);
            assertContent(img, model, "after partial writes into compressed clusters");
        } else if (c.backing != null) {
            String bname = c.backing.equals("qcow2") ? "base.qcow2" : "base.raw";
            cli("create", "-f", "qcow2", "-o", opts, "-b", bname, "-F", c.backing, img, Long.toString(size)).ok();
        } else {
            cli("create", "-f", "qcow2", "-o", opts, img, Long.toString(size)).ok();
        }

        if (c.extL2 && c.compression == null) {
            // (A compressed cluster is all or nothing: writes into one allocate every subcluster.)
            extendedL2PartialWrites(c, img, model, cs, r);
        }

        // Refcount widths 1 and 2: a cluster written once and never again keeps a refcount that grows with every
        // snapshot, so refusals below are certain, not luck.
        boolean narrow = c.refBits <= 2;
        long limit = narrow ? size - cs : size;
        List<String> taken = new ArrayList<>();
        Map<String, byte[]> snapModels = new LinkedHashMap<>();
        if (c.refBits == 1) {
            // An empty 1-bit image can take a snapshot (no cluster gains a reference).
            attemptSnapshot(img, "empty", true, taken, snapModels, model);
        }
        if (narrow) {
            try (Qcow2Image q = open(img)) {
                byte[] d = new byte[(int) cs];
                words(r, d, 0, d.length);
                write(q, model, size - cs, d);
            }
        }
        int attempts = c.refBits == 1 ? 1 : c.snapshots;
        int done = 0;
        for (int k = 1; k <= attempts + 1; k++) {
            int upto = ops * k / (attempts + 1);
            if (c.refBits == 2 && k == 3) {
                upto = done; // the third attempt right after the second: the pinned cluster is at refcount 3
            }
            try (Qcow2Image q = open(img)) {
                randomOps(q, model, r, upto - done, limit, cs);
            }
            done = upto;
            if (k <= attempts) {
                boolean allowed = c.refBits > 2 || (c.refBits == 2 && k <= 2);
                attemptSnapshot(img, "s" + k, allowed, taken, snapModels, model);
                assertClean(dir, img);
            }
        }
        if (done < ops) {
            try (Qcow2Image q = open(img)) {
                randomOps(q, model, r, ops - done, limit, cs);
            }
        }
        assertClean(dir, img);
        assertContent(img, model, "after the random workload");
        for (String s : taken) {
            assertSnapshot(img, s, snapModels.get(s));
        }
        if (taken.isEmpty()) {
            return;
        }
        String first = taken.get(0);
        if (c.refBits == 2) {
            // The pinned cluster is at refcount 3 (s1, s2, active): applying s1 would need a 4th reference first.
            attemptApply(img, first, false);
            String last = taken.remove(taken.size() - 1);
            cli("snapshot", "-d", last, img).ok();
            assertClean(dir, img);
            assertContent(img, model, "after snapshot -d " + last);
            assertSnapshot(img, first, snapModels.get(first));
        }
        // Apply the oldest snapshot: the active layer is that snapshot again; then write over it.
        attemptApply(img, first, true);
        model = snapModels.get(first).clone();
        assertClean(dir, img);
        assertContent(img, model, "after snapshot -a " + first);
        try (Qcow2Image q = open(img)) {
            randomOps(q, model, r, ops / 4, limit, cs);
        }
        assertClean(dir, img);
        assertContent(img, model, "after writes following snapshot -a " + first);
        for (String s : taken) {
            assertSnapshot(img, s, snapModels.get(s));
        }
        // Delete them all, the applied one first; the active layer and the others stay intact.
        for (int i = 0; i < taken.size(); i++) {
            String s = taken.get(i);
            cli("snapshot", "-d", s, img).ok();
            assertClean(dir, img);
            assertContent(img, model, "after snapshot -d " + s);
            for (String rest : taken.subList(i + 1, taken.size())) {
                assertSnapshot(img, rest, snapModels.get(rest));
            }
        }
        assertThat(Qemu.img(dir, "snapshot", "-l", img)).as("qemu-img snapshot -l after deleting all").isEmpty();
        if (narrow) {
            // Without snapshots the 2-bit image has room again.
            try (Qcow2Image q = open(img)) {
                randomOps(q, model, r, 20, limit, cs);
            }
            assertClean(dir, img);
            assertContent(img, model, "after the last writes");
        }
    }

    private void attemptSnapshot(String img, String name, boolean allowed, List<String> taken, Map<String, byte[]> snapModels,
                                 byte[] model) throws IOException {
        assertThat(qemuCanSnapshot(img)).as("qemu-img snapshot -c %s on a copy succeeds (the oracle agrees the width allows it)",
                name).isEqualTo(allowed);
        if (allowed) {
            cli("snapshot", "-c", name, img).ok();
            taken.add(name);
            snapModels.put(name, model.clone());
            return;
        }
        byte[] before = Files.readAllBytes(Path.of(img));
        cli("snapshot", "-c", name, img).failsWithOneLine();
        assertThat(Arrays.mismatch(before, Files.readAllBytes(Path.of(img)))).as("image unchanged by the refused snapshot -c %s",
                name).isEqualTo(-1);
        assertClean(dir, img);
    }

    private void attemptApply(String img, String name, boolean allowed) throws IOException {
        Path copy = dir.resolve("oracle-copy.qcow2");
        Files.copy(Path.of(img), copy, StandardCopyOption.REPLACE_EXISTING);
        int rc = Qemu.imgRaw(dir, "snapshot", "-a", name, copy.toString()).exit();
        Files.delete(copy);
        assertThat(rc == 0).as("qemu-img snapshot -a %s on a copy succeeds (the oracle agrees the width allows it)", name)
                .isEqualTo(allowed);
        if (allowed) {
            cli("snapshot", "-a", name, img).ok();
            return;
        }
        byte[] before = Files.readAllBytes(Path.of(img));
        cli("snapshot", "-a", name, img).failsWithOneLine();
        assertThat(Arrays.mismatch(before, Files.readAllBytes(Path.of(img)))).as("image unchanged by the refused snapshot -a %s",
                name).isEqualTo(-1);
        assertClean(dir, img);
    }

    /** Subcluster writes leave clusters partly allocated; the rest still reads from the backing file (or zeros). */
    private void extendedL2PartialWrites(Cfg c, String img, byte[] model, long cs, Random r) throws IOException {
        long sub = cs / 32;
        byte[] one = new byte[(int) sub];
        Arrays.fill(one, (byte) 0xa1);
        byte[] small = new byte[300];
        r.nextBytes(small);
        byte[] half = new byte[(int) (sub / 2)];
        words(r, half, 0, half.length);
        try (Qcow2Image q = open(img)) {
            write(q, model, 2 * cs + 5 * sub, one);         // one whole subcluster in the middle of cluster 2
            write(q, model, 3 * cs + 100, small);           // unaligned, inside subcluster 0 of cluster 3
            write(q, model, 4 * cs + sub, half);            // two separate subclusters of cluster 4
            write(q, model, 4 * cs + 20 * sub + 7, half);
        }
        assertClean(dir, img);
        assertContent(img, model, "after subcluster writes");
        List<Map<String, Object>> map = mapJson(dir, img);
        assertThat(map).as("qemu-img map has extents that are not cluster-aligned: %s", map)
                .anyMatch(e -> num(e, "start") % cs != 0 || num(e, "length") % cs != 0);
        Map<String, Object> w = extentAt(map, 2 * cs + 5 * sub);
        assertThat(List.of(num(w, "start"), num(w, "length"), num(w, "depth"), w.get("data")))
                .as("map extent of the written subcluster: %s", w).isEqualTo(List.of(2 * cs + 5 * sub, sub, 0L, true));
        long[] unwritten = {2 * cs, 2 * cs + 6 * sub, 3 * cs + sub, 4 * cs + 2 * sub};
        for (long u : unwritten) {
            Map<String, Object> e = extentAt(map, u);
            if (c.backing != null) {
                assertThat(num(e, "depth")).as("unwritten subcluster at %d reads from the backing file: %s", u, e).isEqualTo(1);
                assertThat(e.get("present")).as("backing data present at %d: %s", u, e).isEqualTo(true);
            } else {
                assertThat(e.get("data")).as("unwritten subcluster at %d holds no data: %s", u, e).isEqualTo(false);
            }
        }
    }

    // ---- 2. snapshots across the tools --------------------------------------------------------------------------

    private static String qemuList(Path d, String img) {
        return Qemu.img(d, "snapshot", "-l", img);
    }

    private void assertSameListing(String img) {
        String q = qemuList(dir, img);
        String ours = cli("snapshot", "-l", img).ok().out();
        assertThat(ours).as("snapshot -l: qdedup vs qemu-img").isEqualTo(q);
    }

    @ParameterizedTest(name = "v{0}")
    @ValueSource(ints = {2, 3})
    void qemuListsAppliesAndDeletesOurSnapshots(int version) throws Exception {
        long size = 4L << 20, cs = 4096;
        Random r = new Random(SEED + version);
        byte[] model = new byte[(int) size];
        String img = p("ours.qcow2");
        cli("create", "-o", "cluster_size=4k,compat=" + (version == 2 ? "0.10" : "1.1"), img, "4M").ok();
        Map<String, byte[]> snaps = new LinkedHashMap<>();
        for (String s : new String[]{"s1", "second snapshot"}) {
            try (Qcow2Image q = open(img)) {
                randomOps(q, model, r, 150, size, cs);
            }
            cli("snapshot", "-c", s, img).ok();
            snaps.put(s, model.clone());
        }
        try (Qcow2Image q = open(img)) {
            randomOps(q, model, r, 150, size, cs);
        }
        assertClean(dir, img);
        assertSameListing(img);
        assertThat(qemuList(dir, img)).contains("s1").contains("second snapshot");

        Qemu.img(dir, "snapshot", "-a", "s1", img);
        model = snaps.get("s1").clone();
        assertClean(dir, img);
        assertContent(img, model, "after qemu-img snapshot -a s1");
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x42 4096 70000", "write -z 1048576 65536", "write -P 0x17 3000000 5000"));
        Arrays.fill(model, 4096, 4096 + 70000, (byte) 0x42);
        Arrays.fill(model, 1048576, 1048576 + 65536, (byte) 0);
        Arrays.fill(model, 3000000, 3005000, (byte) 0x17);
        assertClean(dir, img);
        assertContent(img, model, "after qemu-io writes over our applied snapshot");

        Qemu.img(dir, "snapshot", "-d", "second snapshot", img);
        assertClean(dir, img);
        assertSnapshot(img, "s1", snaps.get("s1"));
        assertContent(img, model, "after qemu-img snapshot -d");
        assertSameListing(img);
        Qemu.img(dir, "snapshot", "-d", "s1", img);
        assertClean(dir, img);
        assertContent(img, model, "after deleting the last snapshot");
        assertSameListing(img);
    }

    @ParameterizedTest(name = "v{0}")
    @ValueSource(ints = {2, 3})
    void weListApplyAndDeleteQemuSnapshots(int version) throws Exception {
        long size = 4L << 20, cs = 4096;
        Random r = new Random(SEED * 3 + version);
        byte[] model = new byte[(int) size];
        String img = p("qemu.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "cluster_size=4096,compat=" + (version == 2 ? "0.10" : "1.1"), img, "4M");
        Map<String, byte[]> snaps = new LinkedHashMap<>();
        for (String s : new String[]{"q1", "q2"}) {
            Qemu.io(dir, "qcow2", img, qemuWrites(r, model, 40));
            Qemu.img(dir, "snapshot", "-c", s, img);
            snaps.put(s, model.clone());
        }
        Qemu.io(dir, "qcow2", img, qemuWrites(r, model, 40));
        assertSameListing(img);
        // Ours next to QEMU's, listed by both.
        cli("snapshot", "-c", "o3", img).ok();
        snaps.put("o3", model.clone());
        assertClean(dir, img);
        assertSameListing(img);
        assertThat(qemuList(dir, img)).contains("o3");

        cli("snapshot", "-a", "q1", img).ok();
        model = snaps.get("q1").clone();
        assertClean(dir, img);
        assertContent(img, model, "after our snapshot -a q1");
        try (Qcow2Image q = open(img)) {
            randomOps(q, model, r, 120, size, cs);
        }
        assertClean(dir, img);
        assertContent(img, model, "after our writes over QEMU's applied snapshot");
        for (String s : snaps.keySet()) {
            assertSnapshot(img, s, snaps.get(s));
        }
        cli("snapshot", "-d", "q2", img).ok();
        assertClean(dir, img);
        assertSnapshot(img, "q1", snaps.get("q1"));
        assertSnapshot(img, "o3", snaps.get("o3"));
        assertSameListing(img);
        cli("snapshot", "-d", "q1", img).ok();
        cli("snapshot", "-d", "o3", img).ok();
        assertClean(dir, img);
        assertContent(img, model, "after deleting every snapshot");
        assertThat(qemuList(dir, img)).as("qemu-img snapshot -l after our deletes").isEmpty();
        assertSameListing(img);
        // QEMU keeps writing into the result.
        Qemu.io(dir, "qcow2", img, qemuWrites(r, model, 20));
        assertClean(dir, img);
        assertContent(img, model, "after QEMU's last writes");
    }

    /** qemu-io write commands (patterns, zeroes; aligned and not), applied to the model as well. */
    static List<String> qemuWrites(Random r, byte[] model, int n) {
        List<String> cmds = new ArrayList<>();
        long size = model.length;
        for (int i = 0; i < n; i++) {
            long off = r.nextInt(3) == 0 ? (long) (r.nextDouble() * size) : (long) (r.nextDouble() * size) & ~511L;
            long len = Math.min(size - off, r.nextInt(4) == 0 ? 65536 : 1 + r.nextInt(150_000));
            if (r.nextInt(5) == 0) {
                cmds.add("write -z " + off + " " + len);
                Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
            } else {
                int pat = 1 + r.nextInt(255);
                cmds.add("write -P " + pat + " " + off + " " + len);
                Arrays.fill(model, (int) off, (int) (off + len), (byte) pat);
            }
        }
        return cmds;
    }

    // ---- 3. commit and rebase against qemu-img ------------------------------------------------------------------

    /** The same chain in two directories: {@code qemu/} for qemu-img, {@code ours/} for qdedup. */
    record Pair(Path qemu, Path ours) {
        String q(String name) {
            return qemu.resolve(name).toString();
        }

        String o(String name) {
            return ours.resolve(name).toString();
        }
    }

    /**
     * base (qcow2 or raw, 4 MiB) {@literal <-} [mid] {@literal <-} top (qcow2, 5 MiB: bigger than the base), and an
     * alternative backing file {@code base2.qcow2} / {@code base2.raw} that shares part of base's content; all
     * written by QEMU. Then copied, byte for byte, into the second directory.
     */
    Pair chain(String baseFmt, boolean threeDeep, long seed) throws IOException {
        Path a = dir.resolve("src");
        Files.createDirectories(a);
        Random r = new Random(seed);
        String base = "base." + baseFmt;
        Qemu.img(a, "create", "-f", baseFmt, base, "4M");
        Qemu.io(a, baseFmt, base, qemuWrites(r, new byte[4 << 20], 30));
        Qemu.img(a, "convert", "-f", baseFmt, "-O", baseFmt, base, "base2." + baseFmt);
        Qemu.io(a, baseFmt, "base2." + baseFmt, qemuWrites(r, new byte[4 << 20], 12));
        String below = base;
        String belowFmt = baseFmt;
        if (threeDeep) {
            Qemu.img(a, "create", "-f", "qcow2", "-o", "cluster_size=65536", "-b", base, "-F", baseFmt, "mid.qcow2", "4M");
            Qemu.io(a, "qcow2", "mid.qcow2", qemuWrites(r, new byte[4 << 20], 30));
            below = "mid.qcow2";
            belowFmt = "qcow2";
        }
        Qemu.img(a, "create", "-f", "qcow2", "-o", "cluster_size=65536", "-b", below, "-F", belowFmt, "top.qcow2", "5M");
        Qemu.io(a, "qcow2", "top.qcow2", qemuWrites(r, new byte[5 << 20], 30));
        return twoCopies(a);
    }

    /**
     * Copies every file of {@code from} into both directories of the pair in the same way (Files.copy: holes filled).
     * The two copies then have the same bytes and the same file layout, which matters: qemu-img map reports holes of
     * raw files, and of qcow2 files whose allocated size looks like metadata preallocation.
     */
    Pair twoCopies(Path from) throws IOException {
        Path a = dir.resolve("qemu"), b = dir.resolve("ours");
        Files.createDirectories(a);
        Files.createDirectories(b);
        List<Path> files;
        try (Stream<Path> l = Files.list(from)) {
            files = l.toList();
        }
        for (Path f : files) {
            Files.copy(f, a.resolve(f.getFileName()));
            Files.copy(f, b.resolve(f.getFileName()));
        }
        for (Path f : files) {
            String n = f.getFileName().toString();
            assertThat(Files.mismatch(a.resolve(n), b.resolve(n))).as("copies of %s", n).isEqualTo(-1);
            assertSameMap(normalizedMap(dir, a.resolve(n).toString()), normalizedMap(dir, b.resolve(n).toString()), "copies of " + n);
        }
        return new Pair(a, b);
    }

    /** Guest view of an image, as a raw file converted by qemu-img. */
    Path snapshotOf(Path d, String img, String out) {
        Path raw = dir.resolve(out);
        Qemu.img(d, "convert", "-O", "raw", img, raw.toString());
        return raw;
    }

    /** Same content (and size) of an image in both directories, both clean when qcow2; same map when asked. */
    void assertSame(Pair pr, String img, String fmt, boolean compareMap) {
        String qa = pr.q(img), ob = pr.o(img);
        Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-f", fmt, "-F", fmt, qa, ob);
        assertThat(cmp.exit()).as("%s: content after qemu-img vs after qdedup: %s%s", img, cmp.out(), cmp.err()).isZero();
        assertThat(virtualSize(dir, ob)).as("%s: virtual size", img).isEqualTo(virtualSize(dir, qa));
        if (fmt.equals("qcow2")) {
            assertClean(dir, qa);
            assertClean(dir, ob);
        }
        if (compareMap) {
            assertSameMap(normalizedMap(dir, qa), normalizedMap(dir, ob), img);
        }
    }

    static void assertSameMap(List<String> qemu, List<String> ours, String what) {
        if (qemu.equals(ours)) {
            return;
        }
        int i = 0;
        while (i < Math.min(qemu.size(), ours.size()) && qemu.get(i).equals(ours.get(i))) {
            i++;
        }
        fail("%s: qemu-img map (host offsets left out) differs from record %d on:%n  after qemu-img: %s%n  after qdedup:   %s",
                what, i, qemu.subList(i, Math.min(qemu.size(), i + 4)), ours.subList(i, Math.min(ours.size(), i + 4)));
    }

    void assertGuestView(String img, Path expected, String what) {
        Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-F", "raw", img, expected.toString());
        assertThat(cmp.exit()).as("%s: %s reads as before: %s%s", what, img, cmp.out(), cmp.err()).isZero();
    }

    static Stream<Arguments> commitCases() {
        return Stream.of(
                Arguments.of("commit (top emptied), qcow2 base", "qcow2", false, List.<String>of()),
                Arguments.of("commit (top emptied), raw base", "raw", false, List.<String>of()),
                Arguments.of("commit -d", "qcow2", false, List.of("-d")),
                Arguments.of("commit (top emptied), 3-deep chain", "qcow2", true, List.<String>of()),
                Arguments.of("commit -b base, 3-deep chain", "qcow2", true, List.of("-b", "BASE")),
                Arguments.of("commit -b base, 3-deep chain, raw base", "raw", true, List.of("-b", "BASE")));
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("commitCases")
    void commitLikeQemu(String name, String baseFmt, boolean threeDeep, List<String> flags) throws Exception {
        Pair pr = chain(baseFmt, threeDeep, SEED + name.hashCode());
        Path before = snapshotOf(pr.qemu(), pr.q("top.qcow2"), "top-before.raw");
        List<String> qArgs = new ArrayList<>(List.of("commit"));
        List<String> oArgs = new ArrayList<>(List.of("commit"));
        for (String f : flags) {
            qArgs.add(f.equals("BASE") ? pr.q("base." + baseFmt) : f);
            oArgs.add(f.equals("BASE") ? pr.o("base." + baseFmt) : f);
        }
        qArgs.add(pr.q("top.qcow2"));
        oArgs.add(pr.o("top.qcow2"));
        Qemu.img(dir, qArgs.toArray(String[]::new));
        cli(oArgs.toArray(String[]::new)).ok();
        assertSame(pr, "base." + baseFmt, baseFmt, false);
        if (threeDeep) {
            assertSame(pr, "mid.qcow2", "qcow2", true);
        }
        assertSame(pr, "top.qcow2", "qcow2", true);
        assertGuestView(pr.o("top.qcow2"), before, name);
        if (flags.isEmpty()) {
            // Emptied: the top holds nothing of its own any more.
            assertThat(mapJson(dir, pr.o("top.qcow2"))).as("map of the emptied top").allMatch(e -> num(e, "depth") > 0
                    || !Boolean.TRUE.equals(e.get("present")));
        }
        if (!threeDeep || flags.contains("-b")) {
            // The base now shows what the top showed (within the base's size, which commit grew to the top's).
            assertThat(virtualSize(dir, pr.o("base." + baseFmt))).isEqualTo(5L << 20);
            Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-f", baseFmt, "-F", "raw", pr.o("base." + baseFmt), before.toString());
            assertThat(cmp.exit()).as("base after commit reads as the top did: %s%s", cmp.out(), cmp.err()).isZero();
        }
    }

    static Stream<Arguments> rebaseCases() {
        return Stream.of(
                Arguments.of("rebase onto another qcow2", "qcow2", "base2.qcow2", "qcow2", false),
                Arguments.of("rebase onto another raw", "raw", "base2.raw", "raw", false),
                Arguments.of("rebase from raw onto qcow2", "raw", "base2.qcow2", "qcow2", false),
                Arguments.of("rebase onto \"\" (no backing)", "qcow2", "", null, false),
                Arguments.of("rebase -u onto another qcow2", "qcow2", "base2.qcow2", "qcow2", true),
                Arguments.of("rebase -u onto \"\"", "qcow2", "", null, true));
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("rebaseCases")
    void rebaseLikeQemu(String name, String baseFmt, String newBacking, String newFmt, boolean unsafe) throws Exception {
        Pair pr = chain(baseFmt, false, SEED + name.hashCode());
        if (newFmt != null && !newBacking.endsWith(baseFmt)) {
            // A backing file of the other format with the same kind of content.
            for (Path d : List.of(pr.qemu(), pr.ours())) {
                Qemu.img(d, "convert", "-f", baseFmt, "-O", newFmt, "base2." + baseFmt, newBacking);
            }
        }
        Path before = snapshotOf(pr.qemu(), pr.q("top.qcow2"), "top-before.raw");
        List<String> args = new ArrayList<>(List.of("rebase"));
        if (unsafe) {
            args.add("-u");
        }
        args.add("-b");
        args.add(newBacking);
        if (newFmt != null) {
            args.add("-F");
            args.add(newFmt);
        }
        List<String> qArgs = new ArrayList<>(args);
        qArgs.add(pr.q("top.qcow2"));
        List<String> oArgs = new ArrayList<>(args);
        oArgs.add(pr.o("top.qcow2"));
        Qemu.img(dir, qArgs.toArray(String[]::new));
        cli(oArgs.toArray(String[]::new)).ok();
        assertSame(pr, "top.qcow2", "qcow2", true);
        Object qi = infoJson(dir, pr.q("top.qcow2")), oi = infoJson(dir, pr.o("top.qcow2"));
        for (String k : List.of("backing-filename", "backing-filename-format", "full-backing-filename")) {
            Object qv = Json.at(qi, k), ov = Json.at(oi, k);
            if (k.equals("full-backing-filename") && qv != null) {
                qv = Path.of((String) qv).getFileName().toString();
                ov = ov == null ? null : Path.of((String) ov).getFileName().toString();
            }
            assertThat(ov).as("%s of the rebased top (qemu-img: %s)", k, qv).isEqualTo(qv);
        }
        if (!unsafe) {
            assertGuestView(pr.o("top.qcow2"), before, name);
        }
    }

    // ---- 4. resize against qemu-img -----------------------------------------------------------------------------

    static Stream<Arguments> resizeCases() {
        return Stream.of(
                Arguments.of(9, 3, false, false),
                Arguments.of(12, 2, false, false),
                Arguments.of(16, 3, false, false),
                Arguments.of(16, 3, true, false),
                Arguments.of(16, 3, false, true),
                Arguments.of(14, 3, true, true),
                Arguments.of(21, 3, false, false));
    }

    @ParameterizedTest(name = "cluster_bits={0} v{1} snapshot={2} longer backing file={3}")
    @MethodSource("resizeCases")
    void resizeLikeQemu(int bits, int version, boolean withSnapshot, boolean withBacking) throws Exception {
        long cs = 1L << bits;
        long size = bits == 21 ? 24L << 20 : 3L << 20;
        Random r = new Random(SEED ^ (bits * 17L + version + (withSnapshot ? 5 : 0) + (withBacking ? 11 : 0)));
        Path b = dir.resolve("src");
        Files.createDirectories(b);
        String img = "r.qcow2";
        byte[] model = new byte[(int) size];
        List<String> create = new ArrayList<>(List.of("create", "-o", "cluster_size=" + cs + ",compat=" + (version == 2 ? "0.10" : "1.1")));
        if (withBacking) {
            // A backing file longer than the image: growing must not make its data past the old end visible.
            long bsize = 2 * size + (80L << 20);
            Qemu.img(b, "create", "-f", "qcow2", "base.qcow2", Long.toString(bsize));
            Qemu.io(b, "qcow2", "base.qcow2", List.of("write -P 0x66 0 " + bsize));
            Arrays.fill(model, (byte) 0x66);
            create.addAll(List.of("-b", "base.qcow2", "-F", "qcow2"));
        }
        create.add(b.resolve(img).toString());
        create.add(Long.toString(size));
        cli(create.toArray(String[]::new)).ok();
        try (Qcow2Image q = open(b.resolve(img).toString())) {
            randomOps(q, model, r, 150, size, cs);
            byte[] tail = new byte[(int) cs];
            words(r, tail, 0, tail.length);
            write(q, model, size - cs, tail); // data right up to the end
        }
        byte[] snapModel = model.clone();
        if (withSnapshot) {
            cli("snapshot", "-c", "before-resize", b.resolve(img).toString()).ok();
        }
        Pair pr = twoCopies(b);
        Path a = pr.qemu();
        b = pr.ours();

        // Grow, far enough that the L1 table needs more clusters (small clusters).
        long grown = size + (bits == 21 ? 40L << 20 : 61L << 20);
        resizeBoth(pr, img, "+" + (grown - size), false);
        model = Arrays.copyOf(model, (int) grown);
        assertSame(pr, img, "qcow2", true);
        assertContent(pr.o(img), model, "after grow");

        // Shrink to a size inside a cluster that holds data; with a snapshot (and no backing file) to a cluster
        // boundary instead, so that nothing is written first and the L2 table the snapshot shares is cut on a copy.
        boolean alignedCut = withSnapshot && !withBacking;
        long cut = (size / 2 / cs) * cs + (alignedCut ? 0 : (cs > 1024 ? 3 * 512 : 0) + 512);
        resizeBoth(pr, img, Long.toString(cut), true);
        model = Arrays.copyOf(model, (int) cut);
        assertSame(pr, img, "qcow2", true);
        assertContent(pr.o(img), model, "after --shrink");

        // Grow again: our image reads zeros past the shrink point.
        long regrown = size + 5 * 512;
        resizeBoth(pr, img, Long.toString(regrown), false);
        model = Arrays.copyOf(model, (int) regrown);
        assertContent(pr.o(img), model, "after shrink and grow again (zeros past the old shrink point)");
        assertClean(dir, pr.o(img));
        assertClean(dir, pr.q(img));
        assertThat(virtualSize(dir, pr.o(img))).isEqualTo(virtualSize(dir, pr.q(img)));
        // qemu-img 7.2 leaves the old bytes of the cut cluster visible past the shrink point; outside that tail the
        // two agree byte for byte.
        byte[] qv = Files.readAllBytes(snapshotOf(a, pr.q(img), "qemu-view.raw"));
        byte[] ov = Files.readAllBytes(snapshotOf(b, pr.o(img), "ours-view.raw"));
        long tailEnd = Math.min(regrown, (cut + cs - 1) / cs * cs);
        assertThat(Arrays.mismatch(qv, 0, (int) cut, ov, 0, (int) cut)).as("before the shrink point").isEqualTo(-1);
        assertThat(Arrays.mismatch(qv, (int) tailEnd, qv.length, ov, (int) tailEnd, ov.length)).as("past the cut cluster")
                .isEqualTo(-1);
        if (withSnapshot) {
            // The snapshot keeps everything it had, at its own size.
            Path sa = dir.resolve("snap-q.raw"), sb = dir.resolve("snap-o.raw");
            Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=before-resize", pr.q(img), sa.toString());
            Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=before-resize", pr.o(img), sb.toString());
            assertThat(Files.mismatch(sa, sb)).as("snapshot content after resizes: qemu-img vs ours").isEqualTo(-1);
            // (qemu-img convert -l gives the snapshot at the image's current virtual size; past the snapshot's own
            // size it reads whatever lies below, the same for both images, compared above.)
            byte[] got = Files.readAllBytes(sb);
            assertThat(Arrays.mismatch(got, 0, snapModel.length, snapModel, 0, snapModel.length))
                    .as("snapshot content after resizes vs the model").isEqualTo(-1);

        }
    }

    void resizeBoth(Pair pr, String img, String sizeArg, boolean shrink) {
        List<String> args = new ArrayList<>(List.of("resize"));
        if (shrink) {
            args.add("--shrink");
        }
        List<String> qa = new ArrayList<>(args), oa = new ArrayList<>(args);
        qa.add(pr.q(img));
        qa.add(sizeArg);
        oa.add(pr.o(img));
        oa.add(sizeArg);
        Qemu.img(dir, qa.toArray(String[]::new));
        cli(oa.toArray(String[]::new)).ok();
    }

    // ---- 5. convert -c of a real file system ------------------------------------------------------------------

    @Test
    void convertCompressedMatchesQemuOnAnExt4Image() throws Exception {
        String mke2fs = Qemu.mke2fs(dir);
        Path tree = dir.resolve("tree");
        long budget = 180L << 20;
        long copied = 0;
        for (String src : List.of("/usr/include", "/usr/share/doc")) {
            Path root = Path.of(src);
            if (!Files.isDirectory(root)) {
                continue;
            }
            try (Stream<Path> walk = Files.walk(root)) {
                for (Path f : (Iterable<Path>) walk.sorted()::iterator) {
                    if (copied >= budget) {
                        break;
                    }
                    if (!Files.isRegularFile(f, LinkOption.NOFOLLOW_LINKS) || !Files.isReadable(f)) {
                        continue;
                    }
                    Path to = tree.resolve(root.getFileName().toString()).resolve(root.relativize(f).toString());
                    Files.createDirectories(to.getParent());
                    Files.copy(f, to);
                    copied += Files.size(f);
                }
            }
        }
        assertThat(copied).as("bytes of files copied for the file system").isGreaterThan(32L << 20);
        Path raw = dir.resolve("fs.raw");
        Qemu.exec(dir, List.of(mke2fs, "-q", "-F", "-t", "ext4", "-d", tree.toString(), raw.toString(), "256M")).ok();
        Qemu.exec(dir, List.of("rm", "-rf", tree.toString())).ok();
        for (String c : List.of("zlib", "zstd")) {
            String opts = "cluster_size=65536,compression_type=" + c;
            Path q = dir.resolve("qemu-" + c + ".qcow2"), o = dir.resolve("ours-" + c + ".qcow2");
            long t0 = System.nanoTime();
            Qemu.img(dir, "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", opts, raw.toString(), q.toString());
            long t1 = System.nanoTime();
            cli("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", opts, raw.toString(), o.toString()).ok();
            long t2 = System.nanoTime();
            long qs = Files.size(q), os = Files.size(o);
            double ratio = (double) os / qs;
            System.out.printf("convert -c %s, 64 KiB clusters, 256 MiB ext4 holding %.1f MiB of files: qemu-img %d bytes "
                    + "(%.2f s), qdedup %d bytes (%.2f s), qdedup/qemu-img size %.4f%n", c, copied / 1048576.0, qs,
                    (t1 - t0) / 1e9, os, (t2 - t1) / 1e9, ratio);
            assertClean(dir, o.toString());
            Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", o.toString(), raw.toString());
            assertThat(cmp.exit()).as("%s: our compressed image vs the raw file system: %s%s", c, cmp.out(), cmp.err()).isZero();
            cmp = Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "qcow2", o.toString(), q.toString());
            assertThat(cmp.exit()).as("%s: ours vs qemu-img's: %s%s", c, cmp.out(), cmp.err()).isZero();
            Object chk = Json.parse(Qemu.img(dir, "check", "--output=json", o.toString()));
            assertThat(((BigDecimal) Json.at(chk, "compressed-clusters")).longValue()).as("%s: compressed clusters", c).isPositive();
            assertThat(Json.at(infoJson(dir, o.toString()), "format-specific", "data", "compression-type")).isEqualTo(c);
            assertThat(ratio).as("%s: our file size %d vs qemu-img's %d", c, os, qs).isBetween(0.90, 1.10);
            Files.delete(q);
            Files.delete(o);
        }
    }
}
